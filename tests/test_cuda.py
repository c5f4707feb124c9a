"""On a CUDA device moesaic computes what it computes on CPU, where the other tests hold it to references:
the attention kernel, the indexer's selection (the torch ops there, the compiled kernel here), a whole
model's loss and gradients, the decode cache, and bf16 training.

Also: the grouped-GEMM experts, the MoE layer without host syncs (``torch.cuda.set_sync_debug_mode``), and
activation checkpointing on the device. CI has no GPU, so these skip there; on a GPU machine run
``python -m pytest -q tests/test_cuda.py``.
fp32 comparisons run with TF32 off; tolerances are stated per test (GPU reductions sum in other orders).
"""

from __future__ import annotations

from typing import Iterator, Optional

import pytest
import torch

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention import CompressedKV, window_attention
from moesaic.model.attention.presets import v4_attention

from test_attention_compressed import cached_logits
from test_compressor import M, inputs, make_indexer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (CI has none)")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls() -> Iterator[None]:
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def v4_config(**overrides) -> ModelConfig:
    """Every layer type, mHC with 4 streams, a hash-routed MoE layer, routed + shared experts and MTP."""
    a = v4_attention(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
                     window=8, query_chunk=16, csa_ratio=4, hca_ratio=8, index_heads=4, index_head_dim=16,
                     index_topk=4)
    fields = dict(vocab_size=128, hidden_size=48, num_layers=4, layer_types=["swa", "csa", "hca", "csa"],
                  ffn_types=["moe"] * 4, hc_mult=4, mtp_layers=1, attention=a,
                  moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32, num_hash_layers=1))
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.mark.parametrize("mode", [None, "idx", "mask"])
def test_kernel_equals_cpu(mode: Optional[str]) -> None:
    """window_attention's output, selected mass and gradients agree between CPU and CUDA to 1e-5 over several
    query blocks, with selected (idx, -1 slots included) or masked compressed entries."""
    g = torch.Generator().manual_seed(0)
    B, S, H, c, N, k = 2, 300, 4, 32, 40, 8
    tensors = [torch.randn(B, S, H, c, generator=g), torch.randn(B, S, c, generator=g), torch.randn(H, generator=g),
               torch.randn(B, N, c, generator=g)]
    idx = torch.randint(-1, N, (B, S, k), generator=g)
    mask = torch.rand(B, S, N, generator=g) > 0.5
    cot = torch.randn(B, S, H, c, generator=g)

    def run(device: torch.device) -> list[torch.Tensor]:
        q, kv, sink, entries = (t.to(device).requires_grad_() for t in tensors)
        extra = {None: None, "idx": CompressedKV(entries, idx=idx.to(device)),
                 "mask": CompressedKV(entries, mask=mask.to(device))}[mode]
        out, mass = window_attention(q, kv, sink, window=16, scale=c**-0.5, query_chunk=64, extra=extra)
        inputs_ = [q, kv, sink] + ([entries] if mode else [])
        return [out, *torch.autograd.grad(out, inputs_, cot.to(device))] + ([mass] if mass is not None else [])

    for want, got in zip(run(torch.device("cpu")), run(CUDA), strict=True):
        torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_selection_equals_cpu() -> None:
    """The indexer picks the same entries on CUDA (torch ops) as on CPU (compiled kernel), ties included:
    queries with q_lat = 0 score every entry exactly 0."""
    ix = make_indexer(topk=5)
    q_lat, x = inputs(45, zero_queries=(11, 30))
    idx, val, keys = ix(q_lat, x)
    ix.to(CUDA)
    idx_gpu, val_gpu, keys_gpu = ix(q_lat.to(CUDA), x.to(CUDA))
    assert torch.equal(idx_gpu.cpu(), idx)
    torch.testing.assert_close(val_gpu.cpu(), val, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(keys_gpu.cpu(), keys, atol=1e-5, rtol=1e-5)
    assert (idx >= 0).any() and (idx[:, :M - 1] == -1).all()  # queries t < m - 1 see no entry


def test_model_loss_and_gradients_as_accurate_as_cpu() -> None:
    """A V4-shaped model's loss (LM + MTP + indexer + balance terms) and every gradient in fp32, CUDA and CPU,
    against the same model in fp64 on CPU (its kernels' softmax still runs in fp32): the loss to 1e-5, and
    per parameter CUDA's gradient error at most 4x CPU's + 2e-5 of the norm. Norm-wise and relative to CPU
    because gradients summed over all tokens cancel: the mHC scales' fp32 error reaches ~4e-4 of their
    norm on CPU too."""
    torch.manual_seed(0)
    model = Transformer(v4_config())
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))

    def run(device: torch.device, dtype: torch.dtype) -> tuple[float, dict[str, torch.Tensor]]:
        model.to(device, dtype).zero_grad(set_to_none=True)
        out = model(ids.to(device), labels=ids.to(device))
        out.loss.backward()
        # Copies: model.to() moves the .grad tensors of the parameters along with them.
        return out.loss.item(), {n: p.grad.to("cpu", torch.float64, copy=True) for n, p in model.named_parameters()
                                 if p.grad is not None}

    loss_ref, ref = run(torch.device("cpu"), torch.float64)
    loss_cpu, grads_cpu = run(torch.device("cpu"), torch.float32)
    loss_gpu, grads_gpu = run(CUDA, torch.float32)
    assert abs(loss_gpu - loss_ref) <= 1e-5 and abs(loss_cpu - loss_ref) <= 1e-5
    assert grads_gpu.keys() == grads_cpu.keys() == ref.keys() and len(ref) > 50

    def error(grads: dict[str, torch.Tensor], name: str) -> float:
        return ((grads[name] - ref[name]).norm() / ref[name].norm().clamp_min(1e-30)).item()

    errors = {name: (error(grads_gpu, name), error(grads_cpu, name)) for name in ref}
    print("largest gradient errors vs fp64 (cuda, cpu):", sorted(errors.items(), key=lambda kv: -kv[1][0])[:3])
    for name, (gpu, cpu) in errors.items():
        assert gpu <= 4 * cpu + 2e-5, f"{name}: cuda error {gpu:.3g} vs cpu error {cpu:.3g} of the fp64 gradient"


def test_prefill_then_decode_equals_full_forward_on_cuda() -> None:
    """The decode cache on CUDA: prefill(35) + 6 decode steps give the full forward's logits to 1e-5."""
    torch.manual_seed(0)
    model = Transformer(v4_config(mtp_layers=0)).to(CUDA).eval()
    ids = torch.randint(0, 128, (2, 41), generator=torch.Generator().manual_seed(2)).to(CUDA)
    with torch.no_grad():
        full = model(ids).logits
    torch.testing.assert_close(cached_logits(model, ids, [35] + [1] * 6), full, atol=1e-5, rtol=1e-5)


def test_bf16_training_on_cuda() -> None:
    """bf16 weights and activations: the initial loss is within 2 % of fp32's, and 40 AdamW steps on one batch
    bring it down by more than 1.5 nats, every loss finite."""
    torch.manual_seed(0)
    model = Transformer(v4_config()).to(CUDA)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(3)).to(CUDA)
    with torch.no_grad():
        loss_fp32 = model(ids, labels=ids).loss.item()
    model.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    print("bf16 losses", [round(v, 3) for v in losses[::5]], "fp32 initial", round(loss_fp32, 4))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - loss_fp32) < 0.02 * loss_fp32
    assert losses[-1] < losses[0] - 1.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_experts_on_cuda_match_cpu_with_empty_experts(dtype: torch.dtype) -> None:
    """grouped_mm on CUDA (bf16: the grouped GEMM kernel; fp32: ATen's fallback) against the fp32 CPU result:
    outputs and gradients within the dtype's rounding, empty experts' weight gradients exactly 0."""
    from moesaic.model.moe import GroupedExperts

    experts = GroupedExperts(4, 64, 32, swiglu_limit=1.0, init_std=0.2, seed=3)
    counts = torch.tensor([37, 0, 91, 0])
    g = torch.Generator().manual_seed(0)
    x, cot = torch.randn(128, 64, generator=g), torch.randn(128, 64, generator=g)

    def run(device: torch.device, dt: torch.dtype) -> list[torch.Tensor]:
        ex = GroupedExperts(4, 64, 32, swiglu_limit=1.0, seed=3).to(device, dt)
        ex.load_state_dict(experts.state_dict())
        xd = x.to(device, dt).requires_grad_()
        y = ex(xd, counts.to(device))
        return [y, *torch.autograd.grad(y, [xd, ex.w1, ex.w3, ex.w2], cot.to(device, dt))]

    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    for name, want, got in zip(("y", "x", "w1", "w3", "w2"), run(torch.device("cpu"), torch.float32),
                               run(CUDA, dtype), strict=True):
        torch.testing.assert_close(got.float().cpu(), want, atol=tol * want.abs().max().item(), rtol=0, msg=name)
        if name.startswith("w"):
            assert torch.count_nonzero(got[[1, 3]]) == 0, f"{name}: empty experts"


def test_moe_layer_does_not_sync_on_cuda() -> None:
    """Router, dispatch, bf16 grouped experts and combine, forward and backward, with CUDA's sync check on error."""
    from moesaic.model.moe import MoE

    moe_cfg = MoEConfig(num_experts=8, top_k=2, intermediate_size=32, bias_update_rate=0.01)
    cfg = ModelConfig(hidden_size=64, moe=moe_cfg)
    moe = MoE(cfg, 0).to(CUDA, torch.bfloat16).train()
    x = torch.randn(2, 64, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    moe(x)[0].sum().backward()  # warm-up: lazy initialisations may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = moe(x)
        (y.float().square().mean() + aux).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert moe.experts.w1.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["block", "selective"])
def test_activation_checkpointing_on_cuda_keeps_loss_and_gradients(mode: str) -> None:
    """The recompute on CUDA (autograd's device thread) gives the loss and gradients of no checkpointing, and
    leaves the routers' load counts as the forward counted them."""
    from moesaic.model.checkpointing import apply_activation_checkpointing

    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1)).to(CUDA)

    def run(checkpointing: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
        torch.manual_seed(0)
        model = Transformer(v4_config()).to(CUDA).train()
        apply_activation_checkpointing(model, checkpointing)
        out = model(ids, labels=ids)
        out.loss.backward()
        return (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                [r.load_counts.clone() for r in model.routers()])

    loss, grads, loads = run("none")
    loss_c, grads_c, loads_c = run(mode)
    torch.testing.assert_close(loss_c, loss, atol=1e-6, rtol=1e-6)
    assert grads_c.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, atol=1e-6 * g.abs().max().item(), rtol=0, msg=name)
    assert all(torch.equal(a, b) for a, b in zip(loads_c, loads, strict=True))


@pytest.mark.parametrize("mode", [None, "idx", "mask"])
def test_triton_window_attention_as_accurate_as_torch_at_a_realistic_shape(mode: Optional[str]) -> None:
    """``window_attention`` with backend "triton" in bf16 at 2k tokens (8 heads of 128, window 128; 64 picks of 512
    entries with -1 slots, or HCA's causal mask of ratio 16): output, mass and gradients no further from the fp32
    torch path on the same bf16 inputs than the bf16 torch ops are (2x theirs + 1e-3 of each tensor's scale)."""
    g = torch.Generator().manual_seed(0)
    B, S, H, c, N, k, window = 1, 2048, 8, 128, 512 if mode == "idx" else 128, 64, 128
    tensors = [torch.randn(B, S, H, c, generator=g), torch.randn(B, S, c, generator=g), torch.randn(H, generator=g),
               torch.randn(B, N, c, generator=g), torch.randn(B, S, H, c, generator=g)]
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(S)])[None]
    idx[:, ::3, ::5] = -1
    mask = (torch.arange(N)[None, None, :] < ((torch.arange(S) + 1) // 16)[None, :, None])

    def run(backend: str, dtype: torch.dtype) -> list[torch.Tensor]:
        q, kv, sink, entries, cot = [t.to(CUDA, dtype if t.dim() > 1 else torch.float32, copy=True).requires_grad_()
                                     for t in tensors]
        extra = None if mode is None else CompressedKV(entries, idx=idx.to(CUDA) if mode == "idx" else None,
                                                       mask=mask.to(CUDA) if mode == "mask" else None)
        out, mass = window_attention(q, kv, sink, window, c ** -0.5, 256, extra, None, backend)
        (out.float() * cot.float()).sum().backward()
        got = [out, q.grad, kv.grad, sink.grad] + ([] if mode is None else [entries.grad])
        return [t.float() for t in got + ([] if mass is None else [mass])]

    ref = run("torch", torch.float32)
    torch.cuda.synchronize()
    for want, torch_bf16, triton_bf16 in zip(ref, run("torch", torch.bfloat16), run("triton", torch.bfloat16),
                                             strict=True):
        scale = want.abs().max().item()
        err_torch, err_triton = ((t - want).abs().max().item() for t in (torch_bf16, triton_bf16))
        assert err_triton <= 2 * err_torch + 1e-3 * scale, f"{err_triton:.3g} vs the torch ops' {err_torch:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mhc_triton_kernels_equal_the_torch_ops_on_cuda(dtype: torch.dtype) -> None:
    """mHC's compiled Triton kernels (``model.attention.backend="triton"``) against the torch ops at a realistic
    width (4 streams of D = 1024, 2 x 1000 tokens: partial tiles), one sublayer site and a head collapse, forward
    and all gradients. fp32: rounding only, the projection's K = 4096 sums in other orders (256 eps of each
    tensor's scale); bf16: as ``test_mhc_triton``'s fp16 check, within 6 bf16 eps."""
    from numerics import assert_close_scaled
    from test_mhc_triton import NAMES, assert_16bit_streams_round_once, run, site

    tensors = site(4, 1024, seed=0, B=2, S=1000)
    if dtype == torch.bfloat16:
        assert_16bit_streams_round_once(tensors, dtype, 6)
        return
    for name, got, want in zip(NAMES, run(tensors, "triton", dtype), run(tensors, "torch", dtype), strict=True):
        assert_close_scaled(got, want, 256, name)


# A fresh process (DeepSpeed keeps global state) trains tiny on CUDA; its quiet steps run with the sync check on error.
QUIET_SCRIPT = r"""
import sys, torch
from moesaic.configs import load_config
from moesaic.trainer import loop
original = loop.Trainer.train_step
def train_step(self, stats=None):
    quiet = self.step + 1 in (2, 4)  # step 1 warms up; 3 and 5 log, 5 also evaluates and saves
    if quiet:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
    try:
        return original(self, stats)
    finally:
        torch.cuda.set_sync_debug_mode("default")
loop.Trainer.train_step = train_step
print("final", loop.train(load_config("tiny", sys.argv[1:])).step)
"""


@pytest.mark.parametrize("zero", [1, 2])
def test_quiet_training_steps_do_not_sync_on_cuda(tmp_path, zero: int) -> None:
    """The trainer's step on CUDA: micro-batch copies, forward, backward, DeepSpeed's ZeRO step with the guarded
    clip and skip (``trainer/step_guard.py``) and the router-bias update, with CUDA's sync check on error."""
    import subprocess
    import sys

    from trainrun import env

    overrides = [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.device=cuda",
                 f"train.zero_stage={zero}", "train.dtype=bf16", "train.steps=5", "train.log_every=3",
                 "train.eval_every=5", "checkpoint.every=5", "train.sample_tokens=0", "logging.wandb=disabled",
                 "logging.progress_bar=false"]
    proc = subprocess.run([sys.executable, "-c", QUIET_SCRIPT, *overrides], capture_output=True, text=True,
                          env=env(), timeout=600)
    assert proc.returncode == 0 and "final 5" in proc.stdout, proc.stderr[-4000:]
