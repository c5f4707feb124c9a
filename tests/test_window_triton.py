"""``window_attention``'s Triton kernels (``model.attention.backend="triton"``) against the torch path, on CPU in
Triton's interpreter (conftest sets TRITON_INTERPRET; on a GPU machine the same tests run the compiled kernels)."""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from moesaic.configs import ConfigError, load_config
from moesaic.model import Transformer
from moesaic.model.attention import CompressedKV, window_attention
from moesaic.model.attention._window_triton import _blocks
from moesaic.model.attention.stats import AttentionStats

from numerics import FP32_EPS, assert_close_scaled
from test_checkpointing import v4_tiny
from triton_sm90 import run_script

pytestmark = pytest.mark.numerics
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# The interpreter mis-handles bf16 tl.dot (triton issue 11584): bf16 on a GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


class Shape(NamedTuple):
    """Batch, queries, past rows of kv (T > S), heads, head width, window, compressed entries, picks per query,
    and the HCA mask's ratio (query t sees entries w < (t + 1) // ratio)."""
    B: int = 2
    S: int = 24
    past: int = 6
    H: int = 3
    C: int = 16
    window: int = 8
    N: int = 6
    K: int = 4
    ratio: int = 4


SMALL = Shape()  # every loop in one tile; 3 heads (not a power of 2: padded rows in the kernels)
# Wide heads split a query's heads over programs (as V4-Flash's 64 heads of 512 do): 40 heads of 256 run as 2
# groups of 32 rows forward and 3 of 16 backward, the last padded, adding mass and key / entry gradients
# atomically; keys come in tiles of 32 forward and 16 backward, so the window (40), the picks (40, tiles of 16)
# and the visible entries (up to 48) each span several tiles of the online softmax.
WIDE = Shape(B=1, S=40, H=40, C=256, window=40, N=48, K=40, ratio=1)


def _inputs(dtype: torch.dtype, extra: Optional[str],
            shape: Shape = SMALL) -> tuple[list[torch.Tensor], Optional[CompressedKV]]:
    """q, kv, sink, entries, cotangent; picks with -1 slots (a whole tile of them for every other query from
    the 17th pick on) and no repeats, or a causal mask (ratio 4: the first queries see no entry)."""
    B, S, H, C, N, K = shape.B, shape.S, shape.H, shape.C, shape.N, shape.K
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(B, S, H, C, generator=g), torch.randn(B, shape.past + S, C, generator=g)
    sink, entries = torch.randn(H, generator=g), torch.randn(B, N, C, generator=g)
    cot = torch.randn(B, S, H, C, generator=g)
    tensors = [t.to(dtype) for t in (q, kv)] + [sink, entries.to(dtype), cot.to(dtype)]
    if extra == "idx":
        idx = torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(S)]) for _ in range(B)])
        idx[:, ::3, 1] = -1
        idx[:, ::5, 3] = -1
        idx[:, ::2, 16:32] = -1
        return tensors, CompressedKV(tensors[3], idx=idx)
    if extra == "mask":
        mask = torch.arange(N)[None, None, :] < ((torch.arange(S) + 1) // shape.ratio)[None, :, None]
        return tensors, CompressedKV(tensors[3], mask=mask)
    return tensors, None


def _run(tensors: list[torch.Tensor], extra: Optional[CompressedKV], backend: str, device: torch.device,
         window: int) -> dict[str, torch.Tensor]:
    """Output, mass, statistics and the gradients of q, kv, sink (and entries) of one backend."""
    q, kv, sink, entries, cot = [t.detach().to(device).requires_grad_() for t in tensors]
    if extra is not None:
        extra = CompressedKV(entries, idx=None if extra.idx is None else extra.idx.to(device),
                             mask=None if extra.mask is None else extra.mask.to(device))
    stats = AttentionStats()
    out, mass = window_attention(q, kv, sink, window, 0.3, 8, extra, stats, backend)
    (out.float() * cot.float()).sum().backward()
    got = {"out": out, "d_q": q.grad, "d_kv": kv.grad, "d_sink": sink.grad}
    got.update({name: total / count for name, (total, count) in stats.means.items()})
    got["max_logit"] = stats.maxima["max_logit"]
    if mass is not None:
        got["mass"] = mass
    if extra is not None:
        got["d_entries"] = entries.grad
    return {k: v.detach().cpu().double() for k, v in got.items()}


@pytest.mark.parametrize("shape,dtype", [(SMALL, d) for d in DTYPES] + [(WIDE, torch.float32)],
                         ids=[f"small-{str(d)[6:]}" for d in DTYPES] + ["wide-float32"])
@pytest.mark.parametrize("extra", [None, "idx", "mask"], ids=["swa", "csa", "hca"])
def test_kernels_match_the_fp64_torch_path(extra: Optional[str], shape: Shape, dtype: torch.dtype) -> None:
    """Output, selected mass, statistics and all four gradients against the torch path in fp64 on the same
    (rounded) inputs. fp32 to 16 fp32 eps of each tensor's scale; 16-bit inputs round the probabilities (as the
    torch path does) and the scaled gradients to their dtype: 4 eps of it, and within 2x the torch path's own
    16-bit error plus 16 fp32 eps."""
    tensors, ex = _inputs(dtype, extra, shape)
    ref = _run([t.double() for t in tensors], ex and CompressedKV(tensors[3].double(), idx=ex.idx, mask=ex.mask),
               "torch", torch.device("cpu"), shape.window)
    got = _run(tensors, ex, "triton", DEVICE, shape.window)
    assert got.keys() == ref.keys()
    if dtype == torch.float32:
        for name in ref:
            assert_close_scaled(got[name], ref[name], 16, f"{name} {dtype}")
        return
    same_dtype = _run(tensors, ex, "torch", torch.device("cpu"), shape.window)
    dtype_eps = torch.finfo(dtype).eps / FP32_EPS
    for name in ref:
        scale = ref[name].abs().max().item()
        torch_err = (same_dtype[name] - ref[name]).abs().max().item() / (FP32_EPS * scale)
        assert_close_scaled(got[name], ref[name], min(4 * dtype_eps, 2 * torch_err + 16), f"{name} {dtype}")


def test_wide_shape_splits_heads_and_keys() -> None:
    """``WIDE`` keeps taking the paths it is there for: (head groups, key tile) forward and backward."""
    probe = torch.empty(1, 1, WIDE.H, WIDE.C)
    assert [(-(-WIDE.H // h), n) for h, n, _ in (_blocks(probe, WIDE.window, t) for t in (8192, 4096))] == \
        [(2, 32), (3, 16)]


def test_tiny_model_loss_and_grads_as_accurate_as_the_torch_backend() -> None:
    """SWA, CSA and HCA layers (and the MTP block) of a tiny V4 model in fp32 with the Triton kernels (indexer
    scores included) and with the torch ops, against the torch ops in fp64: the loss to 1e-5; all gradients
    together (norm-wise) within 4x the torch ops' error + 1e-6 (observed: 4.8e-7 on both paths on CPU; a 10%
    error in the sinks' gradients alone gives 1e-4), and each parameter's within 4x theirs + 1e-2, which any
    wrong gradient term exceeds: gradients summed over all tokens cancel, and the MTP block's mHC scales' fp32
    error alone ranges over 3e-4..4e-3 of their norm on both paths, with the CPU's vector width."""
    torch.manual_seed(0)
    model = Transformer(v4_tiny())
    ids = torch.randint(0, 128, (1, 32), generator=torch.Generator().manual_seed(1))

    def run(backend: str, device: torch.device, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
        for module in model.modules():
            if hasattr(module, "backend"):  # the attention layers and indexers keep the config's choice
                module.backend = backend
        model.to(device, dtype).zero_grad(set_to_none=True)
        out = model(ids.to(device), labels=ids.to(device))
        out.loss.backward()
        return out.loss.item(), {n: p.grad.to("cpu", torch.float64, copy=True) for n, p in model.named_parameters()
                                 if p.grad is not None}

    loss_ref, ref = run("torch", torch.device("cpu"), torch.float64)
    loss_torch, grads_torch = run("torch", torch.device("cpu"), torch.float32)
    loss_triton, grads_triton = run("triton", DEVICE, torch.float32)
    assert abs(loss_triton - loss_ref) <= 1e-5 and abs(loss_torch - loss_ref) <= 1e-5
    assert grads_triton.keys() == grads_torch.keys() == ref.keys() and any("attn_sink" in n for n in ref)
    flat = {key: torch.cat([g[name].flatten() for name in ref]) for key, g in
            (("ref", ref), ("torch", grads_torch), ("triton", grads_triton))}
    err_torch, err_triton = ((flat[key] - flat["ref"]).norm().item() / flat["ref"].norm().item()
                             for key in ("torch", "triton"))
    assert err_triton <= 4 * err_torch + 1e-6, f"all gradients: {err_triton:.3g} vs the torch ops' {err_torch:.3g}"
    for name, want in ref.items():
        norm = want.norm().item()
        err_torch, err_triton = ((g[name] - want).norm().item() / norm for g in (grads_torch, grads_triton))
        assert err_triton <= 4 * err_torch + 1e-2, f"{name}: {err_triton:.3g} vs the torch ops' {err_torch:.3g}"


def test_kernels_compile_for_a_gpu_without_spills() -> None:
    """Both kernels, with each kind of extra entries, compile for sm_90 in bf16 (Triton's own ptxas, no GPU
    needed; the interpreter above never lowers them) at the launch configurations of 16 heads of 128 and of
    V4-Flash's 64 heads of 512, without spilling registers to the stack."""
    lines = run_script("window_triton_compile.py")
    assert sorted((name, c, extra) for name, c, extra, *_ in lines) == sorted(
        (name, c, extra) for name in ("_forward_kernel", "_backward_kernel") for c in ("128", "512") for extra in "012")
    for name, c, extra, *usage in lines:
        assert len(usage) == 2 and usage[0].startswith("REG:") and usage[1] == "STACK:0", (name, c, extra, usage)


def test_config_checks_the_head_dim() -> None:
    with pytest.raises(ConfigError, match="head_dim a power of 2"):
        load_config("v4_tiny", ["model.attention.backend=triton", "model.attention.common.head_dim=48"])
