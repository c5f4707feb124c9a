"""mHC's Triton kernels (``model.attention.backend="triton"``, ``model/_mhc_triton.py``) against the torch ops of
``mhc.py``: mappings, collapse, expand and every gradient, then a whole model. On CPU they run in Triton's
interpreter (conftest sets TRITON_INTERPRET; on a GPU machine the same tests run the compiled kernels)."""

from __future__ import annotations


import pytest
import torch

from moesaic.configs import ConfigError, load_config
from moesaic.model import Transformer, _mhc_triton, mhc

from numerics import assert_close_scaled
from test_mhc import tiny_cfg
from triton_sm90 import run_script

pytestmark = pytest.mark.numerics
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NAMES = ("post", "comb", "collapse", "collapse of given pre", "expand", "head collapse",
         *(f"gradient of {n}" for n in ("x", "y", "fn", "base", "scale", "head fn", "head base", "head scale")))


def site(n: int, D: int, seed: int, B: int = 2, S: int = 13) -> list[torch.Tensor]:
    """Streams x [B, S, n, D] (S = 13: a partial token tile), a sublayer output y, and the parameters of a
    sublayer site and a head with non-trivial values (comb logits of std ~1, pre/post away from 1/2)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, S, n, D, generator=g), torch.randn(B, S, D, generator=g)
    fn = torch.randn((2 + n) * n, n * D, generator=g) / (n * D) ** 0.5
    base, scale = torch.randn((2 + n) * n, generator=g), 0.5 + torch.rand(3, generator=g)
    head_fn, head_base = torch.randn(n, n * D, generator=g) / (n * D) ** 0.5, torch.randn(n, generator=g)
    return [x, y, fn, base, scale, head_fn, head_base, 0.5 + torch.rand(1, generator=g)]


def run(tensors: list[torch.Tensor], backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """One sublayer site and a head collapse, forward and backward: streams in ``dtype``, parameters fp32."""
    x, y, *params = (t.to(DEVICE, dtype if i < 2 else torch.float32).requires_grad_() for i, t in enumerate(tensors))
    fn, base, scale, head_fn, head_base, head_scale = params
    spec = mhc.HCSpec(x.shape[-2], 20, 1e-6, 1e-6, backend)
    col, post, comb = mhc.sublayer_collapse(x, fn, base, scale, spec)
    col_pre = mhc.collapse(x, mhc.sublayer_mappings(x, fn, base, scale, spec)[0], backend)
    new = mhc.expand(y * col, x, post, comb, backend)  # y * col: the sublayer output depends on the collapse
    head = mhc.head_collapse(new, head_fn, head_base, head_scale, spec)
    g = torch.Generator().manual_seed(1)
    w_new, w_head, w_pre = (torch.randn(t.shape, generator=g).to(DEVICE) for t in (new, head, col_pre))
    loss = (new.float() * w_new).sum() + (head.float() * w_head).sum() + (col_pre.float() * w_pre).sum()
    grads = torch.autograd.grad(loss, (x, y, *params))
    return [t.detach().cpu() for t in (post, comb, col, col_pre, new, head, *grads)]


@pytest.mark.parametrize("n,D,S", [(4, 32, 13), (4, 40, 40), (3, 64, 13)])
def test_fp32_kernels_equal_the_torch_ops(n: int, D: int, S: int) -> None:
    """fp32 streams: the same sums in other orders (the projection's dot, the per-token reductions), amplified by
    20 Sinkhorn rounds in comb and its gradients (observed: at most ~10 eps of each tensor's scale).
    D = 40 leaves a partial tile along D, and its 80 tokens take dphi's kernel through several token tiles;
    n = 3 pads the stream axis."""
    tensors = site(n, D, seed=n + D, S=S)
    got, want = run(tensors, "triton", torch.float32), run(tensors, "torch", torch.float32)
    for name, a, b in zip(NAMES, got, want, strict=True):
        assert a.dtype == b.dtype, name
        assert_close_scaled(a, b, 48, name)


def assert_16bit_streams_round_once(tensors: list[torch.Tensor], dtype: torch.dtype, eps_allowed: float) -> None:
    """16-bit streams, fp32 mappings, against the fp32 torch run on the same (16-bit-valued) inputs: the kernels
    sum in fp32 and round each output once, the torch ops round pre/post/comb to ``dtype`` before mixing. The
    kernels stay within ``eps_allowed`` of ``dtype``'s eps of each tensor's scale, and never further off than the
    torch ops by more than one such eps."""
    eps = torch.finfo(dtype).eps
    tensors = [t.to(dtype).float() if i < 2 else t for i, t in enumerate(tensors)]
    exact = run(tensors, "torch", torch.float32)
    got, torch16 = run(tensors, "triton", dtype), run(tensors, "torch", dtype)
    for name, a, b, ref in zip(NAMES, got, torch16, exact, strict=True):
        assert a.dtype == b.dtype, name
        scale = ref.abs().max().item()
        err, err_torch = (a.double() - ref).abs().max().item(), (b.double() - ref).abs().max().item()
        assert err <= eps_allowed * eps * scale, f"{name}: {err / (eps * scale):.2f} {dtype} eps of the scale"
        assert err <= err_torch + eps * scale, f"{name}: kernels {err:.3g}, torch ops {err_torch:.3g}"


def test_fp16_streams_round_once() -> None:
    """Within 6 fp16 eps (observed: up to 2.2, the head scale's gradient, a sum over all tokens; the torch ops
    3.7 there)."""
    assert_16bit_streams_round_once(site(4, 64, seed=3), torch.float16, 6)


def test_model_loss_and_gradients_equal_the_torch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny mHC Transformer (2 layers, n = 4; the first layer's streams are the embedding expanded n times, a
    stride-0 view the kernels read in place) gives the torch path's loss and gradients with the kernels on.
    Observed: loss ~1 eps; gradients up to ~20 eps of each parameter's largest gradient, except the head
    collapse's: its dpre_i = X_i . g cancels (the final RMSNorm's backward leaves g nearly orthogonal to
    the collapse, and the streams are still alike after 2 layers), so those gradients are ~100x smaller
    than their summands and differ by up to ~1500 eps of themselves (the site test above holds the head
    collapse's gradients without that cancellation to 48 eps)."""
    calls = []
    for name in ("mix_collapse", "mix_collapse_backward"):  # count the fused collapse's forward and backward
        original = getattr(_mhc_triton, name)
        monkeypatch.setattr(_mhc_triton, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 12), device=DEVICE)
    results = []
    for backend in ("triton", "torch"):
        cfg = tiny_cfg(4)
        cfg.attention.backend = backend
        torch.manual_seed(0)
        model = Transformer(cfg).to(DEVICE)
        with torch.no_grad():  # mappings as training leaves them: streams that differ, pre/post/comb away from uniform
            for name, p in model.named_parameters():
                if "hc_" in name and not name.endswith("_scale"):
                    p.normal_(0, 1 / p.shape[-1] ** 0.5 if name.endswith("_fn") else 1.0)
        assert all(layer.hc.backend == backend for layer in model.layers)
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        results.append((loss.detach(), {k: p.grad.cpu() for k, p in model.named_parameters() if p.grad is not None}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    # 2 layers x 2 sublayers + the head, each once forward and once backward (the torch run calls neither)
    assert sorted(calls) == ["mix_collapse"] * 5 + ["mix_collapse_backward"] * 5
    assert_close_scaled(loss_t, loss_r, 16, "loss")
    assert grads_t.keys() == grads_r.keys() and any("hc_" in k for k in grads_t)
    for k in grads_r:
        assert_close_scaled(grads_t[k], grads_r[k], 4096 if k.startswith("hc_head_") else 64, f"gradient of {k}")


def test_cpu_tensors_need_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the interpreter the config refuses the backend on CPU, and the kernels refuse CPU streams, each with
    one line naming the setting."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="model.attention.backend='triton' runs on CUDA, but train.device='cpu'"):
        load_config("v4_tiny", ["model.attention.backend=triton", "train.device=cpu"])
    x, pre = torch.randn(1, 2, 4, 16), torch.rand(1, 2, 4)
    with pytest.raises(ValueError, match="model.attention.backend='triton' runs CUDA tensors"):
        mhc.collapse(x, pre, "triton")
    torch.testing.assert_close(mhc.collapse(x, pre, "torch"), (pre[..., None] * x).sum(-2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU selection (auto: compiled loops)")
def test_backend_selects_the_kernels() -> None:
    """fp32 CPU streams: "auto" takes the compiled loops, "torch" the torch ops (it turns the loops off, as for
    attention), "triton" the Triton kernels; fp64 streams take the torch ops under "triton" (the kernels sum in
    fp32)."""
    x, pre = torch.randn(1, 2, 4, 16, requires_grad=True), torch.rand(1, 2, 4)
    def kind(x: torch.Tensor, backend: str) -> str:
        name = type(mhc.collapse(x, pre, backend).grad_fn).__name__
        return {"_CollapseBackward": "compiled", "CollapseBackward": "triton"}.get(name, "torch ops")

    assert [kind(x, b) for b in ("auto", "torch", "triton")] == ["compiled", "torch ops", "triton"]
    assert kind(x.double(), "triton") == "torch ops"


def test_kernels_compile_for_a_gpu_without_spills() -> None:
    """Every kernel compiles for sm_90 (Triton's own ptxas, no GPU needed; the interpreter above never lowers
    them) in fp32 and bf16 at the launch configuration, without spilling registers to the stack."""
    lines = run_script("mhc_triton_compile.py")
    kernels = {name for name in vars(_mhc_triton) if name.endswith("_kernel")}
    assert {(name, dtype) for name, dtype, *_ in lines} == {(k, d) for k in kernels for d in ("fp32", "bf16")}
    for name, dtype, *usage in lines:
        assert len(usage) == 2 and usage[0].startswith("REG:") and usage[1] == "STACK:0", (name, dtype, usage)
