"""V4 sliding-window attention: the chunked kernel against a naive full-softmax reference, window
semantics, causality, position-shift invariance, the decode cache and linear memory."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moesaic.configs.schema import ModelConfig
from moesaic.model.attention import CompressedKV, ForwardContext, SWACache, build_attention, window_attention
from moesaic.model.attention.presets import v4_attention

from numerics import assert_close_scaled, fp64

pytestmark = pytest.mark.numerics


def tiny_cfg(window: int = 8, query_chunk: int = 5, **attn) -> ModelConfig:
    a = v4_attention(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
                     window=window, query_chunk=query_chunk, **attn)
    return ModelConfig(vocab_size=64, hidden_size=48, num_layers=1, ffn_types=["dense"], attention=a)


def naive_probs(q, kv, sink, window, scale, extra_kv=None, extra_visible=None):
    """Full [B, H, S, T (+ N)] softmax probabilities with a window mask and a sink column dropped
    after the softmax (MODEL_SPEC §2.4).

    q [B,S,H,c] are the last S positions of kv [B,T,c]; extra_kv [B,N,c] with extra_visible [B,S,N].
    """
    B, S, H, c = q.shape
    T = kv.shape[1]
    q_row = torch.arange(T - S, T).unsqueeze(1)
    k_row = torch.arange(T).unsqueeze(0)
    visible = (k_row <= q_row) & (k_row > q_row - window)  # [S,T]
    scores = torch.einsum("bshc,btc->bhst", q, kv) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    if extra_kv is not None:
        ex = torch.einsum("bshc,bnc->bhsn", q, extra_kv) * scale
        scores = torch.cat([scores, ex.masked_fill(~extra_visible[:, None], float("-inf"))], dim=-1)
    scores = torch.cat([scores, sink.view(1, H, 1, 1).expand(B, H, S, 1)], dim=-1)
    return scores.softmax(dim=-1)[..., :-1]  # drop the sink column


def naive_attention(q, kv, sink, window, scale, extra_kv=None, extra_visible=None):
    """The reference output: ``naive_probs`` times the window keys and extra entries as values."""
    values = kv if extra_kv is None else torch.cat([kv, extra_kv], dim=1)
    return torch.einsum("bhsk,bkc->bshc", naive_probs(q, kv, sink, window, scale, extra_kv, extra_visible), values)


@pytest.fixture(params=["cpu", "torch"], ids=["compiled", "torch-ops"])
def attend(request):
    """``window_attention`` on each CPU backend: the compiled loops and the torch ops (the GPU path)."""
    return functools.partial(window_attention, backend=request.param)


def _inputs(B, S, T, H, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, S, H, c, generator=g).requires_grad_()
    kv = torch.randn(B, T, c, generator=g).requires_grad_()
    sink = torch.randn(H, generator=g).requires_grad_()
    return q, kv, sink


def _assert_same_with_grads(out: torch.Tensor, ref: torch.Tensor, tensors: tuple[torch.Tensor, ...],
                            rtol_eps: float = 32) -> None:
    """The fp32 kernel against the fp64 reference, in value and in the gradients of ``tensors``, to
    ``rtol_eps`` fp32 eps of each one's largest entry (observed: up to 7 eps)."""
    assert_close_scaled(out, ref, rtol_eps, "output")
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(out, tensors, cot)
    ref_grads = torch.autograd.grad(ref, tensors, cot.double())
    for i, (got, want) in enumerate(zip(grads, ref_grads, strict=True)):
        assert_close_scaled(got, want, rtol_eps, f"gradient of input {i}")


@pytest.mark.parametrize("S,past,window,chunk", [
    (1, 0, 4, 3),
    (17, 0, 5, 4),  # chunk does not divide S
    (33, 0, 8, 8),
    (40, 0, 64, 7),  # window longer than the sequence
    (20, 0, 1, 6),  # each query sees only itself
    (13, 6, 4, 5),  # past keys before the queries, as with a decode cache
    (1, 8, 8, 1024),  # one decode step over a full window
])
def test_window_kernel_matches_naive(S, past, window, chunk, attend):
    B, H, c = 2, 3, 16
    q, kv, sink = _inputs(B, S, past + S, H, c)
    scale = c ** -0.5
    out, _ = attend(q, kv, sink, window, scale, chunk)
    ref = naive_attention(*fp64(q, kv, sink), window, scale)
    _assert_same_with_grads(out, ref, (q, kv, sink))


@pytest.mark.parametrize("mode", ["idx", "mask"])
@pytest.mark.parametrize("chunk", [4, 64])
def test_compressed_entries_join_the_same_softmax(mode, chunk, attend):
    B, S, H, c, N, window, k = 2, 19, 2, 16, 6, 4, 3
    q, kv, sink = _inputs(B, S, S, H, c, seed=1)
    g = torch.Generator().manual_seed(2)
    extra_kv = torch.randn(B, N, c, generator=g).requires_grad_()
    # Distinct entries per query, about a third of the slots unused (-1).
    idx = torch.stack([torch.randperm(N, generator=g)[:k] for _ in range(B * S)]).view(B, S, k)
    idx = idx.masked_fill(torch.rand(B, S, k, generator=g) < 0.35, -1)
    visible = torch.zeros(B, S, N, dtype=torch.bool)
    for b in range(B):
        for s in range(S):
            visible[b, s, idx[b, s][idx[b, s] >= 0]] = True
    extra = CompressedKV(extra_kv, idx=idx) if mode == "idx" else CompressedKV(extra_kv, mask=visible)
    scale = c ** -0.5
    out, mass = attend(q, kv, sink, window, scale, chunk, extra)
    ref = naive_attention(*fp64(q, kv, sink), window, scale, extra_kv.double(), visible)
    _assert_same_with_grads(out, ref, (q, kv, sink, extra_kv))
    if mode == "idx":  # each pick's probability summed over heads, from the same softmax
        ref_probs = naive_probs(*fp64(q, kv, sink), window, scale, extra_kv.double(), visible)[..., S:]  # [B,H,S,N]
        ref_mass = ref_probs.sum(dim=1).gather(-1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)  # [B,S,k]
        assert_close_scaled(mass, ref_mass, 16, "selected mass")
    else:
        assert mass is None
    # The extra entries must matter, or the comparison above proves nothing about them.
    assert (out - attend(q, kv, sink, window, scale, chunk)[0]).abs().max() > 1e-2


def test_dense_entries_across_query_blocks(attend):
    """HCA-shaped visibility (entry w seen by query t iff w < (t + 1) // 16) over 1100 queries: the
    compiled path's entry GEMMs run in blocks of 512 queries, each over its own prefix of entries, and
    are merged with the window's softmax by log-sum-exp; output and gradients equal the naive softmax."""
    B, S, H, c, window, ratio = 2, 1100, 2, 16, 32, 16
    q, kv, sink = _inputs(B, S, S, H, c, seed=3)
    entries = torch.randn(B, S // ratio, c, generator=torch.Generator().manual_seed(4)).requires_grad_()
    visible = (torch.arange(S // ratio) < ((torch.arange(S) + 1) // ratio).unsqueeze(-1)).unsqueeze(0)  # [1,S,N]
    out, _ = attend(q, kv, sink, window, c ** -0.5, 64, CompressedKV(entries, mask=visible))
    ref = naive_attention(*fp64(q, kv, sink), window, c ** -0.5, entries.double(), visible.expand(B, -1, -1))
    # The sink's and an entry's gradients sum over up to 1100 queries in fp32 (observed: 11 eps).
    _assert_same_with_grads(out, ref, (q, kv, sink, entries), rtol_eps=64)


def test_compressed_kv_needs_exactly_one_selector():
    with pytest.raises(ValueError):
        CompressedKV(torch.zeros(1, 2, 4))
    with pytest.raises(ValueError):
        CompressedKV(torch.zeros(1, 2, 4), idx=torch.zeros(1, 1, 1, dtype=torch.long),
                     mask=torch.ones(1, 1, 2, dtype=torch.bool))


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_kernel_memory_is_linear_in_sequence_length(attend):
    B, S, H, c, window, chunk = 1, 512, 1, 4, 16, 32
    q, kv, sink = _inputs(B, S, S, H, c)
    with _MaxNumel() as mode:
        attend(q.detach(), kv.detach(), sink.detach(), window, 0.5, chunk)
    # A full score matrix has S*S = 262K elements; the chunked kernel's largest tensors are q, kv and
    # the output (S*H*c = 2K elements).
    assert mode.max_numel <= 4 * S * H * c


def test_window_semantics_and_causality():
    """Query t depends on inputs t-window+1..t only."""
    torch.manual_seed(0)
    window = 6
    attn = build_attention(tiny_cfg(window=window, query_chunk=4), 0)
    x = torch.randn(2, 30, 48)
    j = 10
    x2 = x.clone()
    x2[:, j] += torch.randn(2, 48)
    y, aux = attn(x)
    y2, _ = attn(x2)
    changed = (y - y2).abs().amax(dim=(0, 2)) > 1e-6  # [S]
    expected = torch.zeros(30, dtype=torch.bool)
    expected[j:j + window] = True
    assert torch.equal(changed, expected), changed.nonzero().flatten().tolist()
    assert aux.item() == 0.0


def test_outputs_invariant_to_a_global_position_shift():
    """RoPE on q and k plus de-rotating the output by -position(query) leaves only relative offsets."""
    torch.manual_seed(0)
    attn = build_attention(tiny_cfg(window=8, query_chunk=16), 0)
    with torch.no_grad():
        attn.attn_sink.normal_()
    x = torch.randn(2, 20, 48)
    y0, _ = attn(x)
    cache = SWACache(2, 8, 32, start_pos=300)
    y1, _ = attn(x, ForwardContext(caches=[cache]))
    # Rounding only: RoPE angles at 300+ are other fp32 numbers than at 0+.
    assert_close_scaled(y1, y0, 16, "output at positions 300+")


def test_prefill_then_decode_equals_full_forward():
    torch.manual_seed(0)
    window, S = 8, 29
    attn = build_attention(tiny_cfg(window=window, query_chunk=5), 0)
    x = torch.randn(2, S, 48)
    with torch.no_grad():
        full, _ = attn(x)
        cache = attn.make_cache(2)
        ctx = ForwardContext(caches=[cache])
        parts = [attn(x[:, :11], ctx)[0], attn(x[:, 11:20], ctx)[0]]  # prefill, then a multi-token step
        parts += [attn(x[:, t:t + 1], ctx)[0] for t in range(20, S)]  # single-token decode
    assert_close_scaled(torch.cat(parts, dim=1), full, 16, "cached output")
    assert cache.pos == S


def test_cache_holds_exactly_the_window():
    window, head_dim = 8, 32
    attn = build_attention(tiny_cfg(window=window), 0)
    cache = attn.make_cache(1)
    with torch.no_grad():
        for t in range(3 * window):
            kv_before = cache.kv
            attn(torch.randn(1, 1, 48), ForwardContext(caches=[cache]))
            assert cache.nbytes() == window * head_dim * 4
        # The buffer holds the last `window` positions: its oldest row is the newest of `window` steps ago.
        assert torch.equal(cache.kv[:, :-1], kv_before[:, 1:])
    assert cache.length == window


def test_grouped_output_projection_is_block_diagonal():
    """Output group i reads only heads i*H/g..(i+1)*H/g-1 (MODEL_SPEC §2.6)."""
    torch.manual_seed(0)
    attn = build_attention(tiny_cfg(), 0)
    g, d_g = attn.o_groups, attn.o_lora_rank
    assert attn.wo_a.weight.shape == (g * d_g, attn.num_heads * attn.head_dim // g)
    x = torch.randn(1, 6, 48)
    with torch.no_grad():
        y0, _ = attn(x)
        attn.wo_a.weight.view(g, d_g, -1)[1].zero_()  # silence group 1
        y1, _ = attn(x)
        attn.wo_b.weight[:, d_g:].zero_()  # and drop its columns of wo_b: group 0 alone gives y1
        y2, _ = attn(x)
    assert (y0 - y1).abs().max() > 1e-3
    torch.testing.assert_close(y2, y1)


def test_official_parameter_names():
    attn = build_attention(tiny_cfg(), 0)
    names = {n for n, _ in attn.named_parameters()}
    assert names == {"wq_a.weight", "q_norm.weight", "wq_b.weight", "wkv.weight", "kv_norm.weight",
                     "wo_a.weight", "wo_b.weight", "attn_sink"}
    assert attn.attn_sink.dtype == torch.float32 and not attn.attn_sink.any()


@pytest.mark.parametrize("mode", ["idx", "mask"])
def test_backward_keeps_no_probabilities(mode, attend):
    """Flash-style: what autograd keeps is the inputs, the output and one fp32 number per query-head,
    not the [S, keys] probabilities or the gathered [S, k, c] entries."""
    B, S, H, c, N, window, k, chunk = 1, 256, 4, 8, 64, 32, 16, 64
    q, kv, sink = _inputs(B, S, S, H, c)
    entries = torch.randn(B, N, c, requires_grad=True)
    idx = torch.stack([torch.randperm(N)[:k] for _ in range(S)]).view(B, S, k)
    extra = (CompressedKV(entries, idx=idx) if mode == "idx"
             else CompressedKV(entries, mask=torch.ones(1, S, N, dtype=torch.bool)))
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out, _ = attend(q, kv, sink, window, 0.5, chunk, extra)
    inputs = {t.data_ptr() for t in (q, kv, sink, entries, extra.idx if mode == "idx" else extra.mask)}
    new_numel = sum(t.numel() for t in saved if t.data_ptr() not in inputs)
    assert new_numel == out.numel() + B * S * H  # the output and the per-row log-sum-exp
