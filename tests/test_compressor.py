"""CSA/HCA compressor and lightning indexer against references written from MODEL_SPEC §3-§4, §13.4."""

from __future__ import annotations

import math

import pytest
import torch

from moesaic.model.attention.compressor import Compressor, state_bytes
from moesaic.model.attention._topk_cpu import relu_weighted_topk
from moesaic.model.attention.csa import CSASpec
from moesaic.model.attention.indexer import Indexer, _exact_topk, indexer_kl_loss, selected_scores
from moesaic.model.rope import RotaryEmbedding

from numerics import assert_close_scaled, fp64, fp64_copy

pytestmark = pytest.mark.numerics

D, C, RD, EPS = 32, 16, 8, 1e-6
ROPE = dict(theta=160000.0, yarn_factor=4.0, original_max_position=32)


def make_compressor(overlap: bool, ratio: int, seed: int = 0) -> Compressor:
    """Random non-trivial weights, including ape and the norm weight (zero/one at init)."""
    torch.manual_seed(seed)
    comp = Compressor(D, C, ratio, overlap, RotaryEmbedding(RD, **ROPE), RD, EPS)
    with torch.no_grad():
        comp.ape.normal_()
        comp.norm.weight.uniform_(0.5, 1.5)
    return comp


def rotate_tail_complex(e: torch.Tensor, pos: int, rope: RotaryEmbedding) -> torch.Tensor:
    """RoPE written as complex multiplication of interleaved pairs (2i, 2i+1) by exp(i*pos*freq)."""
    z = torch.view_as_complex(e[..., -RD:].reshape(*e.shape[:-1], RD // 2, 2).contiguous())
    z = z * torch.polar(torch.ones_like(rope.inv_freq), pos * rope.inv_freq)
    return torch.cat([e[..., :-RD], torch.view_as_real(z).flatten(-2)], dim=-1)


def naive_compress(comp: Compressor, x: torch.Tensor) -> torch.Tensor:
    """One entry at a time, slot by slot, exactly as MODEL_SPEC §3.1 (overlap) / §4 (no overlap)."""
    m, c = comp.ratio, comp.out_dim
    Cv, Z, B = x @ comp.wkv.weight.T, x @ comp.wgate.weight.T, comp.ape
    entries = []
    for w in range(x.shape[1] // m):
        vals, logits = [], []
        if comp.overlap:
            for j in range(m):  # look-back slots: previous window, first half of the channels
                if w == 0:
                    vals.append(x.new_zeros(x.shape[0], c))
                    logits.append(x.new_full((x.shape[0], c), float("-inf")))
                else:
                    t = (w - 1) * m + j
                    vals.append(Cv[:, t, :c])
                    logits.append(Z[:, t, :c] + B[j, :c])
            for j in range(m, 2 * m):  # current slots: own window, second half
                t = w * m + j - m
                vals.append(Cv[:, t, c:])
                logits.append(Z[:, t, c:] + B[j - m, c:])
        else:
            for j in range(m):
                t = w * m + j
                vals.append(Cv[:, t])
                logits.append(Z[:, t] + B[j])
        weights = torch.stack(logits, 1).softmax(dim=1)  # [B, slots, c], per channel
        e = (weights * torch.stack(vals, 1)).sum(1)
        e = e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + EPS) * comp.norm.weight
        entries.append(rotate_tail_complex(e, w * m, comp.rope))
    return torch.stack(entries, 1)


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 4), (False, 8)])
def test_compressor_matches_naive_forward_and_grad(overlap: bool, ratio: int) -> None:
    comp = make_compressor(overlap, ratio)
    x = torch.randn(2, 5 * ratio + 3, D)  # trailing partial window dropped
    out = comp(x)
    assert out.shape == (2, 5, C)
    assert_close_scaled(out, naive_compress(fp64_copy(comp), *fp64(x)), 16, "output")
    # Gradients in fp64 (the module pools in max(input dtype, fp32)), to a few fp32 eps of each
    # gradient's largest entry: what remains is the fp32 rounding of model.rope.apply_rope.
    comp, x = comp.double(), x.double().requires_grad_()
    out, ref = comp(x), naive_compress(comp, x)
    assert_close_scaled(out, ref, 4, "fp64 output")
    probe = torch.randn_like(out)
    inputs = [x, comp.wkv.weight, comp.wgate.weight, comp.ape, comp.norm.weight]
    grads = torch.autograd.grad((out * probe).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * probe).sum(), inputs)
    for name, g, r in zip(("x", "wkv", "wgate", "ape", "norm"), grads, ref_grads, strict=True):
        assert_close_scaled(g, r, 8, name)


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 4)])
def test_compressor_receptive_field(overlap: bool, ratio: int) -> None:
    """Entry w changes iff a token in [(w-1)m, (w+1)m) (CSA) / [wm, (w+1)m) (HCA) changes."""
    comp = make_compressor(overlap, ratio)
    x = torch.randn(1, 6 * ratio, D)
    base = comp(x)
    for t in range(x.shape[1]):
        x2 = x.clone()
        x2[:, t] += torch.randn(D)
        diff = (comp(x2) - base).abs().amax(dim=(0, 2))  # [N]
        first = t // ratio
        expected = {first, first + 1} if overlap else {first}
        for w in range(base.shape[1]):
            if w in expected:
                assert diff[w] > 1e-4, (t, w)
            else:
                assert diff[w] == 0, (t, w)


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 4), (False, 8)])
def test_prefill_then_steps_equals_prefill(overlap: bool, ratio: int) -> None:
    comp = make_compressor(overlap, ratio)
    S = 4 * ratio + 3
    x = torch.randn(2, S, D)
    full, full_state = comp.prefill(x)
    # Rounding only: prefill projects the trailing partial window too, and BLAS may pick other kernels
    # for GEMMs of other shapes.
    assert_close_scaled(full, comp(x), 8, "prefill entries")
    for start in sorted({0, 1, ratio - 1, ratio, ratio + 1, 2 * ratio + 2, S - 1}):
        entries, state = comp.prefill(x[:, :start])
        pieces = [entries]
        for pos in range(start, S):
            new = comp.step(state, x[:, pos : pos + 1], pos)
            assert (new is not None) == ((pos + 1) % ratio == 0)
            if new is not None:
                pieces.append(new)
        assert_close_scaled(torch.cat(pieces, 1), full, 16, "entries")
        filled = S % ratio  # open-window slots written so far; the rest are stale by design
        assert_close_scaled(state.kv[:, :filled], full_state.kv[:, :filled], 16, "kv")
        assert_close_scaled(state.score[:, :filled], full_state.score[:, :filled], 16, "score")
        if overlap:
            assert_close_scaled(state.prev_kv, full_state.prev_kv, 16, "prev_kv")
            assert_close_scaled(state.prev_score, full_state.prev_score, 16, "prev_score")


def test_state_bytes() -> None:
    """CSA: open window [m, 2c] values + logits, look-back [m, c] values + logits; HCA: [m, c] x 2."""
    B, m = 3, 4
    _, csa = make_compressor(True, m).prefill(torch.randn(B, 7, D))
    _, hca = make_compressor(False, m).prefill(torch.randn(B, 7, D))
    assert state_bytes(csa) == B * 4 * (2 * m * 2 * C + 2 * m * C)
    assert state_bytes(hca) == B * 4 * (2 * m * C)


# ----------------------------------------------------------------------------------------------
# Lightning indexer

M, HEADS, IDX_DIM, QR = 4, 4, 16, 16


def make_indexer(topk: int = 5, chunk: int = 1024, seed: int = 0) -> Indexer:
    spec = CSASpec(q_lora_rank=QR, index_heads=HEADS, index_head_dim=IDX_DIM, rope_head_dim=RD, ratio=M,
                   index_topk=topk, query_chunk=chunk)
    torch.manual_seed(seed)
    idx = Indexer(spec, D, 1e-6, RotaryEmbedding(RD, **ROPE), "auto")
    with torch.no_grad():
        idx.compressor.ape.normal_()
    return idx


def inputs(S: int, seed: int = 1, zero_queries: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (q_lat, x); listed queries get q_lat = 0, so every score of theirs is exactly 0 (a tie)."""
    g = torch.Generator().manual_seed(seed)
    q_lat, x = torch.randn(2, S, QR, generator=g), torch.randn(2, S, D, generator=g)
    q_lat[:, list(zero_queries)] = 0
    return q_lat, x


def naive_scores(ix: Indexer, q_lat: torch.Tensor, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """I[t,s] = sum_h (w[t,h] n_I^-1/2) ReLU(q[t,h].K[s]) c_I^-1/2, q rotated at t (MODEL_SPEC §3.2)."""
    q = (q_lat @ ix.wq_b.weight.T).unflatten(-1, (HEADS, IDX_DIM))
    q = torch.stack([rotate_tail_complex(q[:, t], t, ix.rope) for t in range(q.shape[1])], 1)
    w = x @ ix.weights_proj.weight.T
    dots = torch.einsum("bthc,bsc->bths", q, keys).relu()
    return torch.einsum("bth,bths->bts", w * HEADS**-0.5, dots) * IDX_DIM**-0.5


def naive_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: visible entries w < (t+1)//m sorted by (score desc, index asc), padded with -1."""
    B, S, N = scores.shape
    idx = torch.full((B, S, k), -1, dtype=torch.long)
    val = torch.full((B, S, k), float("-inf"))
    for b in range(B):
        for t in range(S):
            cand = sorted(((scores[b, t, s].item(), s) for s in range(min(N, (t + 1) // M))),
                          key=lambda p: (-p[0], p[1]))[:k]
            for j, (v, s) in enumerate(cand):
                idx[b, t, j], val[b, t, j] = s, v
    return idx, val


def test_index_scores_match_naive_einsum() -> None:
    ix = make_indexer()
    q_lat, x = inputs(23)
    keys = ix.keys(x)
    positions = torch.arange(23)
    naive = naive_scores(fp64_copy(ix), *fp64(q_lat, x, keys))
    assert_close_scaled(ix.scores(*ix.queries(q_lat, x, positions), keys), naive, 16, "scores")
    idx, scores = ix.select(*ix.queries(q_lat, x, positions), keys, 0, M)
    ref = naive.gather(-1, idx.clamp_min(0))
    assert_close_scaled(scores[idx >= 0], ref[idx >= 0], 16, "selected scores")


PATHS = pytest.mark.parametrize("backend", ["cpu", "torch"], ids=["compiled", "torch-ops"])


@PATHS
def test_topk_ties_break_toward_lower_index(backend: str) -> None:
    ix = make_indexer(topk=5)
    ix.backend = backend
    S = 48
    q_lat, x = inputs(S, zero_queries=(20, 33, 47))
    keys = torch.randn(2, S // M, IDX_DIM)
    keys[:, [2, 5, 9]] = 0  # score exactly 0 for every query
    keys[:, 7] = keys[:, 3]  # duplicated entry: equal scores
    with torch.no_grad():
        ix.weights_proj.weight[1] = 0  # a dead head
    positions = torch.arange(S)
    scores = ix.scores(*ix.queries(q_lat, x, positions), keys)
    idx, val = ix.select(*ix.queries(q_lat, x, positions), keys, 0, M)
    ref_idx, ref_val = naive_topk(scores, 5)
    assert torch.equal(idx, ref_idx)
    assert_close_scaled(val, ref_val, 8, "scores")  # the compiled path sums heads in order
    # The ties are real: the k-th pick often equals the best unpicked visible score.
    boundary_ties = 0
    for b in range(2):
        for t in range(S):
            n = (t + 1) // M
            if n > 5:
                rest = [scores[b, t, s].item() for s in range(n) if s not in idx[b, t].tolist()]
                boundary_ties += int(val[b, t, -1].item() == max(rest))
    assert boundary_ties >= 6
    assert (idx[:, 47] == torch.arange(5)).all()  # all 12 visible scores are 0: the 5 lowest indices


@PATHS
def test_chunked_selection_equals_unchunked_exactly(backend: str) -> None:
    ix = make_indexer(topk=5)
    ix.backend = backend
    q_lat, x = inputs(45, zero_queries=(11, 30))
    keys = ix.keys(x)
    positions = torch.arange(45)
    idx, val = ix.select(*ix.queries(q_lat, x, positions), keys, 0, M)
    for chunk in (1, 3, 16):
        ix.query_chunk = chunk
        idx_c, val_c = ix.select(*ix.queries(q_lat, x, positions), keys, 0, M)
        assert torch.equal(idx_c, idx)
        # Scores agree to rounding only: each chunk scores only the entries it can see (a narrower GEMM).
        assert_close_scaled(val_c, val, 8, f"scores, chunk {chunk}")


@PATHS
@pytest.mark.parametrize("topk", [3, 16])
def test_selection_independent_of_sequence_length(topk: int, backend: str) -> None:
    ix = make_indexer(topk=topk)
    ix.backend = backend
    q_lat, x = inputs(41, zero_queries=(9, 18, 29))
    short = 26
    idx_long, val_long = ix(q_lat, x)[:2]
    idx_short, val_short = ix(q_lat[:, :short], x[:, :short])[:2]
    k = idx_short.shape[-1]
    assert torch.equal(idx_long[:, :short, :k], idx_short)
    # Scores agree to rounding only: the projections are GEMMs over different row counts.
    assert_close_scaled(val_long[:, :short, :k], val_short, 8, "scores")
    assert (idx_long[:, :short, k:] == -1).all()  # a longer sequence only adds invisible picks


@PATHS
@pytest.mark.parametrize("S", [3, 4, 17, 40])
def test_causal_mask(S: int, backend: str) -> None:
    ix = make_indexer(topk=6)
    ix.backend = backend
    idx = ix(*inputs(S))[0]
    t = torch.arange(S)[None, :, None]
    visible = (t + 1) // M
    assert ((idx == -1) | (idx < visible)).all()
    assert ((idx >= 0).sum(-1) == visible[..., 0].clamp(max=idx.shape[-1])).all()
    for row in idx.flatten(0, 1).tolist():
        picked = [i for i in row if i >= 0]
        assert len(set(picked)) == len(picked)


@PATHS
def test_decode_steps_select_as_prefill(backend: str) -> None:
    ix = make_indexer(topk=4)
    ix.backend = backend
    S, start = 37, 13
    q_lat, x = inputs(S, zero_queries=(15, 24))
    idx_full, val_full, keys_full = ix(q_lat, x)
    with torch.no_grad():
        keys, state = ix.compressor.prefill(x[:, :start])
    for pos in range(start, S):
        idx, val, keys = ix.step(state, keys, q_lat[:, pos : pos + 1], x[:, pos : pos + 1], pos)
        k = idx.shape[-1]
        assert torch.equal(idx[:, 0], idx_full[:, pos, :k])
        assert (idx_full[:, pos, k:] == -1).all()
        # A score sums the heads' terms, which cancel: their rounding remains (observed: 7 eps).
        assert_close_scaled(val[:, 0], val_full[:, pos, :k], 32, f"scores at {pos}")
    assert_close_scaled(keys, keys_full, 8, "keys")


@pytest.mark.parametrize("n, k", [(5, 8), (64, 8), (300, 16), (1000, 64)])
def test_compiled_selection_equals_torch_ops_on_exact_scores(n: int, k: int) -> None:
    """The compiled CPU kernel against the torch ops it replaces (ReLU, head-weighted sum, mask, exact top-k):
    integer-valued dots and weights make every score exact in both, so picks and scores must be identical,
    with many ties (values in -3..3) and per-row visibility limits, some below k and some 0."""
    gen = torch.Generator().manual_seed(n)
    rows, heads = 40, 4
    dots = torch.randint(-3, 4, (rows, heads, n), generator=gen).float()
    w = torch.randint(-2, 3, (rows, heads), generator=gen).float()
    limit = torch.randint(0, n + 1, (rows,), generator=gen)
    limit[:3] = torch.tensor([0, 1, n])
    picked, scores = torch.empty(rows, k, dtype=torch.long), torch.empty(rows, k)
    relu_weighted_topk(dots.numpy(), w.numpy(), limit.numpy(), picked.numpy(), scores.numpy())
    score = torch.einsum("rh,rhn->rn", w, dots.relu()).masked_fill(torch.arange(n) >= limit[:, None], float("-inf"))
    want = _exact_topk(score[None], min(k, n))[0]  # [rows, <=k]
    want = torch.cat([want, want.new_full((rows, k - want.shape[1]), n)], dim=1)  # pad as "invisible"
    want = want.masked_fill(want >= limit[:, None], -1)
    assert torch.equal(picked, want)
    assert torch.equal(scores, score.gather(1, want.clamp(min=0)).masked_fill(want < 0, float("-inf")))
    if n > k:  # the tie rule was exercised where it matters: the k-th score shared with an unpicked entry
        tied = (score == scores[:, -1:]).sum(-1) > 1  # [rows]
        assert (tied & (limit > k)).sum() >= 5


# ----------------------------------------------------------------------------------------------
# Indexer KL loss (V3.2 recipe)


def test_kl_loss_hand_computed() -> None:
    scores = torch.tensor([[[1.0, 2.0, 0.5], [0.3, -1.0, float("-inf")], [float("-inf")] * 3]])
    probs = torch.tensor([[[0.2, 0.6, 0.2], [0.9, 0.3, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[[True, True, True], [True, True, False], [False, False, False]]])

    def kl(p: list[float], s: list[float]) -> float:
        p = [v / sum(p) for v in p]
        z = sum(math.exp(v) for v in s)
        return sum(pi * math.log(pi / (math.exp(si) / z)) for pi, si in zip(p, s))

    expected = (kl([0.2, 0.6, 0.2], [1.0, 2.0, 0.5]) + kl([0.9, 0.3], [0.3, -1.0])) / 2
    assert indexer_kl_loss(scores, probs, valid).item() == pytest.approx(expected, rel=1e-5)  # fp32 loss


def test_kl_loss_zero_when_distributions_match() -> None:
    p = torch.rand(2, 5, 4) + 0.1
    valid = torch.rand(2, 5, 4) > 0.3
    scores = torch.log(p / p.sum(-1, keepdim=True)) + 3.0  # softmax is shift invariant
    assert indexer_kl_loss(scores, p, valid).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_gradient_reaches_only_the_indexer() -> None:
    ix = make_indexer(topk=4)
    torch.manual_seed(2)
    S = 30
    emb = torch.nn.Parameter(torch.randn(2, S, D))  # backbone stand-ins
    wq_a = torch.nn.Linear(D, QR, bias=False)
    main = torch.nn.Linear(D, 4, bias=False)
    q_lat = wq_a(emb)
    idx, _, keys = ix(q_lat, emb)  # selection: no gradient; the loss rescores the picks, as CSA does
    scores = selected_scores(*ix.queries(q_lat, emb, torch.arange(S)), keys, idx, 8)
    valid = idx >= 0
    main_probs = main(emb).softmax(-1).masked_fill(~valid, 0)  # stand-in head-summed attention mass
    loss = indexer_kl_loss(scores, main_probs, valid)
    assert loss.item() > 0
    loss.backward()
    for name, p in ix.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert emb.grad is None and wq_a.weight.grad is None and main.weight.grad is None


@pytest.mark.parametrize("chunk", [3, 64])
def test_selected_scores_equal_dense_scores_at_the_picks(chunk: int) -> None:
    """The chunked, regathering scores of the picks equal Indexer.scores gathered at them, in value and in
    the gradients of q, w and keys (reference: plain autograd through the dense scores), to fp32 rounding."""
    ix = make_indexer(topk=4)
    q_lat, x = inputs(23)
    positions = torch.arange(23)
    keys = ix.keys(x).detach().requires_grad_()
    q, w = (t.detach().requires_grad_() for t in ix.queries(q_lat, x, positions))
    with torch.no_grad():
        idx, _ = ix.select(*ix.queries(q_lat, x, positions), keys, 0, M)  # [B,S,k], -1 where fewer than k are visible
    valid = idx >= 0
    got = selected_scores(q, w, keys, idx, chunk).masked_fill(~valid, 0.0)
    want = ix.scores(q, w, keys).gather(-1, idx.clamp(min=0)).masked_fill(~valid, 0.0)
    assert_close_scaled(got, want, 8, "scores")
    cot = torch.randn(got.shape, generator=torch.Generator().manual_seed(3))
    grads = torch.autograd.grad(got, (q, w, keys), cot), torch.autograd.grad(want, (q, w, keys), cot)
    for name, g_got, g_want in zip(("q", "w", "keys"), *grads, strict=True):
        assert_close_scaled(g_got, g_want, 8, name)
    assert valid.any() and not valid.all()  # both kinds of picks were exercised
