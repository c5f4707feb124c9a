"""mHC (MODEL_SPEC §5): mappings against a literal per-token reading of the spec, doubly stochastic
comb, the plain-residual start, and a short training run against the plain residual."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer, mhc
from moesaic.model._cpu_compiled import applies
from moesaic.model.attention.presets import v4_attention

from numerics import assert_close_scaled
from test_attention_compressed import cached_logits

pytestmark = pytest.mark.numerics

N, D = 4, 16


def spec(iters: int = 20) -> mhc.HCSpec:
    return mhc.HCSpec(N, iters, 1e-6, 1e-6)


def random_site(scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fn = torch.randn((2 + N) * N, N * D, generator=g)
    return fn, torch.randn((2 + N) * N, generator=g), torch.rand(3, generator=g) * scale


def reference_sinkhorn(m: torch.Tensor, iters: int, eps: float = 1e-6) -> torch.Tensor:
    """Step 7 of MODEL_SPEC §5 on [..., n, n], plain autograd."""
    comb = m.softmax(dim=-1) + eps
    comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
    return comb


def reference_token(xt: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                    iters: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 1-7 of MODEL_SPEC §5 for one token's streams xt [n, D], written out literally."""
    flat = xt.reshape(-1)
    r = (flat.pow(2).mean() + 1e-6).rsqrt()
    mix = r * (fn @ flat)
    pre = torch.sigmoid(scale[0] * mix[:N] + base[:N]) + eps
    post = 2 * torch.sigmoid(scale[1] * mix[N:2 * N] + base[N:2 * N])
    m = (scale[2] * mix[2 * N:] + base[2 * N:]).view(N, N)
    return pre, post, reference_sinkhorn(m, iters, eps)


def test_mappings_and_stream_update_match_the_spec_token_by_token() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, N, D, dtype=torch.float64)  # the mappings themselves run in fp32
    fn, base, scale = (t.double() for t in random_site(2.0))
    pre, post, comb = mhc.sublayer_mappings(x, fn, base, scale, spec())
    y = torch.randn(2, 5, D, dtype=torch.float64)
    new = mhc.expand(y, x, post, comb)
    for b in range(2):
        for t in range(5):
            p, q, c = reference_token(x[b, t], fn, base, scale, 20)
            # The mappings in fp32, comb through 20 Sinkhorn iterations (observed: up to 5 eps).
            assert_close_scaled(pre[b, t], p, 32, "pre")
            assert_close_scaled(post[b, t], q, 32, "post")
            assert_close_scaled(comb[b, t], c, 32, "comb")
            assert_close_scaled(mhc.collapse(x, pre)[b, t], (p[:, None] * x[b, t]).sum(0), 16, "collapse")
            # X'_j = post_j y + sum_i comb[i, j] X_i: comb is applied transposed.
            expect = torch.stack([q[j] * y[b, t] + sum(c[i, j] * x[b, t, i] for i in range(N)) for j in range(N)])
            assert_close_scaled(new[b, t], expect, 16, "expand")


def test_compiled_cpu_mixing_equals_the_matmuls() -> None:
    """collapse/expand on fp32 CPU streams (compiled loops, ``_mhc_cpu``) against the same functions on fp64
    (per-token matmuls: the path GPUs and other dtypes take): values and all gradients to fp32 rounding. comb
    is a permuted view, as ``sinkhorn`` returns it."""
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(2, 7, N, D, generator=g), torch.randn(2, 7, D, generator=g)
    pre, post = torch.rand(2, 7, N, generator=g), torch.rand(2, 7, N, generator=g)
    comb = torch.rand(N, N, 2, 7, generator=g).permute(2, 3, 0, 1)  # [2,7,N,N], not contiguous
    w_out, w_col = torch.randn(2, 7, N, D, generator=g), torch.randn(2, 7, D, generator=g)

    def run(dtype: torch.dtype) -> list[torch.Tensor]:
        xs, ys, pres, posts, combs = (t.to(dtype).requires_grad_() for t in (x, y, pre, post, comb))
        out, col = mhc.expand(ys, xs, posts, combs), mhc.collapse(xs, pres)
        loss = (out * w_out.to(dtype)).sum() + (col * w_col.to(dtype)).sum()
        return [out, col, *torch.autograd.grad(loss, (xs, ys, pres, posts, combs))]

    assert applies(x) and not applies(x.double())
    names = ["expand", "collapse", *(f"gradient of {n}" for n in ("x", "y", "pre", "post", "comb"))]
    for name, got, want in zip(names, run(torch.float32), run(torch.float64), strict=True):
        assert_close_scaled(got, want, 16, name)


def assert_doubly_stochastic(comb: torch.Tensor, what: str) -> None:
    rows, cols = comb.sum(dim=-1), comb.sum(dim=-2)
    print(f"{what}: max |row sum - 1| {(rows - 1).abs().max():.1e}, max |col sum - 1| {(cols - 1).abs().max():.1e}")
    assert (comb >= 0).all()
    torch.testing.assert_close(rows, torch.ones_like(rows), atol=1e-4, rtol=0)
    torch.testing.assert_close(cols, torch.ones_like(cols), atol=1e-4, rtol=0)
    assert torch.linalg.matrix_norm(comb.double(), ord=2).max() <= 1 + 1e-4  # non-expansive mixing


def test_comb_is_doubly_stochastic() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 64, N, D)
    fn, base, scale = random_site(1.0)
    _, post, comb = mhc.sublayer_mappings(x, fn * 0.05, base * 0.5, scale, spec())
    assert ((post > 0) & (post < 2)).all()
    assert_doubly_stochastic(comb, "comb from random mappings")
    assert_doubly_stochastic(mhc.sinkhorn(torch.randn(4096, N, N) * 0.5, 20, 1e-6), "Sinkhorn of N(0, 0.5) logits")
    # V4's fixed 20 iterations leave sharply peaked logits short of convergence (transformers alike):
    for std in (1.0, 2.0):
        rows = mhc.sinkhorn(torch.randn(4096, N, N) * std, 20, 1e-6).sum(dim=-1)
        print(f"logits N(0, {std}): max |row sum - 1| after 20 iterations {(rows - 1).abs().max():.1e}")


def test_mix_handwritten_backward_passes_gradcheck() -> None:
    """The mapping projection phi . x~ / rms(x~): its written-out backward against finite differences (fp64)."""
    g = torch.Generator().manual_seed(5)
    flat = torch.randn(2, 5, N * 8, dtype=torch.float64, generator=g).requires_grad_()
    fn = torch.randn((2 + N) * N, N * 8, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: mhc._Mix.apply(a, b, 1e-6), (flat, fn))


@pytest.mark.parametrize("iters", [1, 2, 20])
def test_sinkhorn_handwritten_backward_matches_autograd(iters: int) -> None:
    logits = (torch.randn(2, 7, N, N, dtype=torch.float64) * 2).requires_grad_()
    weights = torch.randn(2, 7, N, N, dtype=torch.float64)
    out, ref = mhc.sinkhorn(logits, iters, 1e-6), reference_sinkhorn(logits, iters)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad((out * weights).sum(), logits)
    (expect,) = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(grad, expect, rtol=1e-10, atol=1e-12)


def tiny_cfg(hc_mult: int, **kw: object) -> ModelConfig:
    a = v4_attention(num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8,
                     window=8)
    fields = dict(vocab_size=64, hidden_size=32, num_layers=2, hc_mult=hc_mult, attention=a,
                  moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32))
    fields.update(kw)
    return ModelConfig(**fields)


def test_hc_mult_1_is_the_plain_residual_without_hc_parameters() -> None:
    keys = Transformer(tiny_cfg(1)).state_dict().keys()
    assert not [k for k in keys if "hc_" in k]
    hc_keys = set(Transformer(tiny_cfg(4)).state_dict().keys()) - set(keys)
    assert hc_keys == {"hc_head_fn", "hc_head_base", "hc_head_scale"} | {
        f"layers.{i}.hc_{site}_{p}" for i in range(2) for site in ("attn", "ffn") for p in ("fn", "base", "scale")}


def test_initialisation_starts_as_the_plain_residual() -> None:
    """The documented init: with phi = 0 (its mean), b = 0 and a = 1, streams stay equal, pre = 1/2,
    post = 1 and comb = 1/n, so the mHC model computes what the plain-residual model does (the
    sublayers read 2x the stream, the same after their RMS norm once the norm's eps is negligible:
    hence embeddings of RMS ~1 here rather than init_std)."""
    torch.manual_seed(0)
    plain = Transformer(tiny_cfg(1)).eval()
    with torch.no_grad():
        plain.embed.weight.mul_(50)
    model = Transformer(tiny_cfg(4)).eval()
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("hc_" in k for k in missing)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_fn"):
                assert abs(p.std().item() - 0.02) < 0.005  # N(0, init_std) as documented
                p.zero_()
    ids = torch.randint(0, 64, (2, 24))
    torch.testing.assert_close(model(ids).logits, plain(ids).logits, atol=1e-5, rtol=1e-5)


def markov_batches(steps: int, batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """Token streams from a fixed random sparse Markov chain: learnable, never memorised."""
    g = torch.Generator().manual_seed(0)
    successors = torch.randint(0, vocab, (vocab, 3), generator=g)
    out = []
    for _ in range(steps):
        tok = torch.randint(0, vocab, (batch,), generator=g)
        rows = [tok]
        for _ in range(seq):
            tok = successors[tok, torch.randint(0, 3, (batch,), generator=g)]
            rows.append(tok)
        out.append(torch.stack(rows, dim=1))
    return out


STEPS = 100


def train_losses(hc_mult: int, batches: list[torch.Tensor]) -> tuple[list[float], Transformer]:
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(hc_mult))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for batch in batches:
        out = model(batch[:, :-1], labels=batch[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(out.lm_loss.item())
    return losses, model


def test_training_with_mhc_is_stable_and_no_worse_than_the_plain_residual(monkeypatch: pytest.MonkeyPatch) -> None:
    batches = markov_batches(steps=STEPS, batch=8, seq=32, vocab=64)
    (plain, _), (streams, model) = train_losses(1, batches), train_losses(4, batches)
    tail = slice(-10, None)
    plain_end, mhc_end = sum(plain[tail]) / 10, sum(streams[tail]) / 10
    print(f"LM loss, mean of the last 10 of {STEPS} steps: plain residual {plain_end:.4f}, mHC (n=4) {mhc_end:.4f} "
          f"(start {plain[0]:.3f} / {streams[0]:.3f}; ln 3 = {math.log(3):.3f} is the chain's entropy floor)")
    assert all(math.isfinite(v) for v in streams)
    assert max(streams[1:]) < streams[0] + 0.1  # no blow-up along the way
    assert mhc_end < streams[0] - 1.0  # it learns
    assert mhc_end <= plain_end + 0.02  # and is no worse than the plain residual
    combs, sinkhorn = [], mhc.sinkhorn
    monkeypatch.setattr(mhc, "sinkhorn", lambda *args: combs.append(sinkhorn(*args)) or combs[-1])
    with torch.no_grad():
        model(batches[0][:, :-1])
    comb = torch.cat([c.flatten(0, -3) for c in combs])
    rows, cols = comb.sum(dim=-1), comb.sum(dim=-2)
    # Training sharpens the comb logits, and V4's fixed 20 Sinkhorn iterations then leave the rows
    # short of 1 (the last step normalises columns, so those stay exact); transformers alike.
    print(f"trained model's comb: max |row sum - 1| {(rows - 1).abs().max():.1e}, "
          f"max |col sum - 1| {(cols - 1).abs().max():.1e}")
    torch.testing.assert_close(cols, torch.ones_like(cols), atol=1e-4, rtol=0)
    assert (rows - 1).abs().max() < 0.1


def test_gradients_reach_every_mhc_parameter() -> None:
    model = Transformer(tiny_cfg(4))
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        if "hc_" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prefill_then_decode_with_mhc_equals_the_full_forward() -> None:
    """The decode caches carry only attention state: the streams are rebuilt from each token's embedding."""
    a = v4_attention(num_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_groups=2, o_lora_rank=8,
                     window=8, csa_ratio=4, hca_ratio=8, index_heads=16, index_head_dim=16, index_topk=3)
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(4, num_layers=3, layer_types=["swa", "csa", "hca"], attention=a,
                                 moe=MoEConfig(num_experts=4, top_k=2, intermediate_size=32, num_hash_layers=1))).eval()
    ids = torch.randint(0, 64, (2, 36))
    with torch.no_grad():
        full = model(ids).logits
    assert_close_scaled(cached_logits(model, ids, [28] + [1] * 8), full, 16, "cached logits")
