"""CSA and HCA layers: a naive full-logit reference (forward, gradients, indexer loss), causality,
prefill + decode with mixed layouts, cache bytes vs MODEL_SPEC §8.2, memory that scales, training
and config errors. CPU fp32 against fp64 references; gradients in fp64."""

from __future__ import annotations

import pytest
import torch
from test_attention_swa import _MaxNumel

from moesaic.configs import ConfigError, load_config
from moesaic.configs.schema import AttentionConfig, ModelConfig
from moesaic.model import Transformer
from moesaic.model.attention import build_attention
from moesaic.model.attention.compressor import state_bytes
from moesaic.model.attention.csa import CSASpec
from moesaic.model.attention.hca import HCASpec
from moesaic.model.attention.indexer import indexer_kl_loss
from moesaic.model.attention.presets import v4_attention
from moesaic.model.attention.swa import SWASpec
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.norm import rms_normalize
from moesaic.model.rope import rope_tail

from numerics import assert_close_scaled, fp64, fp64_copy

pytestmark = pytest.mark.numerics

D, WINDOW, CSA, HCA, TOPK = 48, 8, 4, 8, 3


def make_cfg(layer_types: list[str], query_chunk: int = 5, **attn) -> ModelConfig:
    """Small ratios so short sequences cross many compression boundaries; 16 index heads avoid top-k ties."""
    fields = dict(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
                  window=WINDOW, query_chunk=query_chunk, csa_ratio=CSA, hca_ratio=HCA, index_heads=16,
                  index_head_dim=16, index_topk=TOPK, indexer_loss_coef=1.0, yarn_factor=4.0,
                  yarn_original_max_position=16)
    fields.update(attn)
    return ModelConfig(vocab_size=128, hidden_size=D, num_layers=len(layer_types), layer_types=layer_types,
                       ffn_types=["dense"] * len(layer_types), dense_intermediate_size=64,
                       attention=v4_attention(**fields))


def make_layer(kind: str, seed: int = 0, **attn) -> torch.nn.Module:
    """A layer with non-trivial sink, position biases and norm weights (zero / one at init)."""
    torch.manual_seed(seed)
    return randomise_layer(build_attention(make_cfg([kind], **attn), 0))


@torch.no_grad()
def randomise_layer(layer: torch.nn.Module) -> torch.nn.Module:
    for name, p in layer.named_parameters():
        if name.endswith("ape") or name == "attn_sink":
            p.normal_()
        elif name.endswith("norm.weight"):
            p.uniform_(0.5, 1.5)
    return layer


def naive_index_scores(attn: torch.nn.Module, qr: torch.Tensor, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor) -> torch.Tensor:
    """I[t,s] = sum_h w[t,h] n_I^-1/2 ReLU(q[t,h].K[s]) c_I^-1/2 against all N entries (MODEL_SPEC §3.2): [B,S,N]."""
    ix = attn.indexer
    q = rope_tail(ix.wq_b(qr).unflatten(-1, (ix.n_heads, ix.head_dim)), cos[:, None], sin[:, None], attn.rope_dim)
    dots = torch.einsum("bthc,bsc->bths", q, ix.compressor(x)).relu()
    return torch.einsum("bth,bths->bts", ix.weights_proj(x), dots) * (ix.n_heads * ix.head_dim) ** -0.5


def naive_layer(attn: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer with full [S, S + N] logits: window mask on the raw keys, visibility of the entries,
    a sink column, one softmax. CSA's picks are the top-k of the naive index scores; SWA has no entries."""
    B, S, _ = x.shape
    H, c, rd, g = attn.num_heads, attn.head_dim, attn.rope_dim, attn.o_groups
    pos = torch.arange(S)
    cos, sin = attn.rope(pos)
    qr = attn.q_norm(attn.wq_a(x))
    q = rope_tail(rms_normalize(attn.wq_b(qr).unflatten(-1, (H, c)), attn.eps), cos[:, None], sin[:, None], rd)
    kv = rope_tail(attn.kv_norm(attn.wkv(x)), cos, sin, rd)  # [B,S,c]
    entries = attn.compressor(x) if hasattr(attn, "compressor") else kv[:, :0]  # [B,N,c]
    t, entry = pos[:, None], torch.arange(entries.shape[1])[None, :]
    in_window = ((pos[None, :] <= t) & (pos[None, :] > t - attn.window)).expand(B, S, S)
    visible = (entry < (t + 1) // getattr(attn, "ratio", 1)).expand(B, S, -1)  # [B,S,N]
    if hasattr(attn, "indexer"):
        k = attn.indexer.topk
        index_scores = naive_index_scores(attn, qr.detach(), x.detach(), cos, sin).masked_fill(~visible, float("-inf"))
        top = index_scores.sort(dim=-1, descending=True).values
        assert (top[..., k - 1] - top[..., k] > 1e-4)[torch.isfinite(top[..., k - 1])].all()  # no ties
        visible = visible & (index_scores >= top[..., k - 1:k])
    values = torch.cat([kv, entries], dim=1)  # [B, S + N, c]
    logits = torch.einsum("bshc,btc->bhst", q, values) * attn.softmax_scale
    logits = logits.masked_fill(~torch.cat([in_window, visible], dim=-1)[:, None], float("-inf"))
    logits = torch.cat([logits, attn.attn_sink.view(1, H, 1, 1).expand(B, H, S, 1)], dim=-1)
    probs = logits.softmax(dim=-1)[..., :-1]  # [B,H,S,S+N], sink column dropped
    o = rope_tail(torch.einsum("bhst,btc->bshc", probs, values), cos[:, None], sin[:, None], rd, inverse=True)
    o = torch.einsum("bsgd,grd->bsgr", o.reshape(B, S, g, -1), attn.wo_a.weight.view(g, attn.o_lora_rank, -1))
    out = attn.wo_b(o.flatten(2))
    if not hasattr(attn, "indexer"):
        return out, x.new_zeros(())
    picks = index_scores.masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices  # [B,S,k]
    valid = visible.gather(-1, picks)
    mass = probs[..., S:].sum(dim=1).gather(-1, picks)  # head-summed main probability of each pick
    return out, attn.indexer_loss_coef * indexer_kl_loss(index_scores.gather(-1, picks), mass, valid)


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_layer_matches_naive_reference(kind: str) -> None:
    S = 37  # 9 CSA / 4 HCA entries; query_chunk 5 does not divide S
    layer = make_layer(kind)
    x = torch.randn(2, S, D)
    out, aux = layer(x)
    ref, ref_aux = naive_layer(fp64_copy(layer), *fp64(x))
    assert_close_scaled(out, ref, 16, "output")
    assert_close_scaled(aux, ref_aux, 16, "indexer loss")
    if kind == "csa":
        assert aux.item() > 1e-3
    # Gradients in fp64 (the kernel's softmax and RoPE still round to fp32, ~1e-7 relative), to a few
    # fp32 eps of each gradient's largest entry; the loss includes the indexer's KL.
    layer, x = layer.double(), x.double().requires_grad_()
    probe = torch.randn(2, S, D, dtype=torch.float64)
    inputs = [x, *layer.parameters()]
    out, aux = layer(x)
    ref, ref_aux = naive_layer(layer, x)
    grads = torch.autograd.grad((out * probe).sum() + aux, inputs, allow_unused=True)
    ref_grads = torch.autograd.grad((ref * probe).sum() + ref_aux, inputs, allow_unused=True)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, ref_grads):
        assert (got is None) == (want is None), name
        if want is not None:
            assert_close_scaled(got, want, 16, name)


def test_layers_of_one_model_take_their_own_menu_entries() -> None:
    """Windows, head counts, ratios and top-k differ per layer: each layer is built from its own menu entry,
    its cache holds that entry's KV bytes (the formula, by hand), and it matches the naive reference of its
    own shape (in fp64, to 1e-6 of the output's size: the kernel's softmax still rounds to fp32)."""
    base = dict(rope_head_dim=8, q_lora_rank=24, o_lora_rank=16, query_chunk=5)
    compressed = dict(base, yarn_factor=4.0, yarn_original_max_position=16)
    index = dict(compressed, index_heads=16, index_head_dim=16)
    menu = {"local": SWASpec(**base, num_heads=2, head_dim=16, o_groups=1, window=4),
            "near": CSASpec(**index, num_heads=4, head_dim=32, o_groups=2, window=8, ratio=4, index_topk=2),
            "far": CSASpec(**index, num_heads=8, head_dim=32, o_groups=4, window=16, ratio=4, index_topk=5),
            "coarse": HCASpec(**compressed, num_heads=2, head_dim=16, o_groups=2, window=6, ratio=8)}
    cfg = ModelConfig(vocab_size=128, hidden_size=D, num_layers=4, layer_types=["local", "near", "far", "coarse"],
                      ffn_types=["dense"] * 4, dense_intermediate_size=64, attention=AttentionConfig(menu=menu))
    torch.manual_seed(1)
    model = Transformer(cfg)
    layers = [block.attn for block in model.layers]
    assert [(a.window, a.num_heads, a.head_dim) for a in layers] == [(4, 2, 16), (8, 4, 32), (16, 8, 32), (6, 2, 16)]
    assert [layers[1].indexer.topk, layers[2].indexer.topk, layers[3].ratio] == [2, 5, 8]

    B, N = 2, 37
    caches = model.make_caches(B)
    with torch.no_grad():
        model(torch.randint(0, 128, (B, N)), caches=caches)
    by_hand = [4 * 16 * 4, 8 * 32 * 4 + (N // 4) * (32 + 16) * 4, 16 * 32 * 4 + (N // 4) * (32 + 16) * 4,
               6 * 16 * 4 + (N // 8) * 16 * 4]
    assert [layer.total for layer in layer_kv_bytes(cfg, N, "fp32", "fp32")] == by_hand
    assert [cache.kv_bytes() for cache in caches] == [B * n for n in by_hand]

    x = torch.randn(B, N, D, dtype=torch.float64)
    for attn in layers:
        attn = randomise_layer(attn).double()
        with torch.no_grad():
            out, _ = attn(x)
            ref, _ = naive_layer(attn, x)
        assert (out - ref).abs().max() <= 1e-6 * ref.abs().max(), attn.layer_idx


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_entries_join_the_window_softmax(kind: str) -> None:
    """Beyond the window only compressed entries carry information: a token far in the past still
    changes the output, which a plain SWA layer cannot do."""
    layer = make_layer(kind)
    x = torch.randn(1, 40, D)
    x2 = x.clone()
    x2[:, 1] += 1.0
    with torch.no_grad():
        diff = (layer(x)[0] - layer(x2)[0]).abs().amax(dim=(0, 2))  # [S]
    assert diff[WINDOW + 1:].min() > 1e-6 if kind == "hca" else diff[WINDOW + 1:].max() > 1e-4


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_layer_causality(kind: str) -> None:
    """Changing tokens after t changes nothing at <= t: t at window edges and compression boundaries."""
    layer = make_layer(kind)
    S = 40
    x = torch.randn(1, S, D)
    with torch.no_grad():
        base = layer(x)[0]
        for t in (2, 3, 4, WINDOW - 1, WINDOW, 15, 16, 23, 31, 32, 38):
            x2 = x.clone()
            x2[:, t + 1:] = torch.randn(1, S - t - 1, D)
            out = layer(x2)[0]
            assert (out[:, :t + 1] - base[:, :t + 1]).abs().max() <= 1e-6, t
            assert (out[:, t + 1] - base[:, t + 1]).abs().max() > 1e-4, t


def tiny_model(layer_types: list[str], seed: int = 0, **attn) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(make_cfg(layer_types, **attn))


MIXED = ["swa", "csa", "hca", "csa"]


def cached_logits(model: Transformer, ids: torch.Tensor, pieces: list[int]) -> torch.Tensor:
    """Feed ids through one set of caches in pieces of the given lengths (1 = a decode step)."""
    caches = model.make_caches(ids.shape[0])
    starts = [sum(pieces[:i]) for i in range(len(pieces))]
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + n], caches=caches).logits for s, n in zip(starts, pieces)], dim=1)


@pytest.mark.parametrize("pieces", [
    [40, 1], [35] + [1] * 6, [22] + [1] * 19,  # prefill(S - k) + k decode steps
    [11, 15] + [1] * 15,  # a multi-token chunk after a prefix, then decode steps
])
def test_prefill_then_decode_equals_full_forward(pieces: list[int]) -> None:
    S = 41  # crosses 10 CSA and 5 HCA boundaries
    model = tiny_model(MIXED)
    ids = torch.randint(0, 128, (2, S), generator=torch.Generator().manual_seed(len(pieces)))
    with torch.no_grad():
        full = model(ids).logits
    assert_close_scaled(cached_logits(model, ids, pieces), full, 16, "cached logits")


def test_cache_bytes_match_the_kv_formula() -> None:
    """kv_bytes = window rows + entries + indexer keys = layer_kv_bytes(fp32, fp32) for N = 1..41
    (crossing the window at 8, CSA boundaries every 4, HCA every 8); state bytes are constant."""
    model = tiny_model(["swa", "csa", "hca"])
    cfg = model.cfg
    a = cfg.attention.menu["csa"]
    B, c, ci = 2, a.head_dim, a.index_head_dim
    caches = model.make_caches(B)
    ids = torch.randint(0, 128, (B, 41))
    expected_state = [0, 4 * B * (CSA * 2 * c * 2 + CSA * c * 2 + CSA * 2 * ci * 2 + CSA * ci * 2),
                      4 * B * HCA * c * 2]
    with torch.no_grad():
        model(ids[:, :5], caches=caches)
        for n in range(5, 42):
            formula = layer_kv_bytes(cfg, n, "fp32", "fp32")
            assert [cache.kv_bytes() for cache in caches] == [B * layer.total for layer in formula], n
            assert [cache.state_bytes() for cache in caches] == expected_state
            allocated = [B * WINDOW * c * 4 + B * layer.compressed_bytes + s
                         for layer, s in zip(formula, expected_state)]
            assert [cache.nbytes() for cache in caches] == allocated
            if n < 41:
                model(ids[:, n:n + 1], caches=caches)
    assert expected_state[1] == state_bytes(caches[1].main.state) + state_bytes(caches[1].index.state)


def test_indexer_loss_trains_only_the_indexer() -> None:
    layer = make_layer("csa")
    x = torch.randn(2, 30, D, requires_grad=True)
    out, aux = layer(x)
    aux.backward(retain_graph=True)
    for name, p in layer.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    assert x.grad is None
    layer.zero_grad(set_to_none=True)
    out.square().sum().backward()  # the LM side: reaches everything but the indexer
    for name, p in layer.named_parameters():
        assert (p.grad is None) == name.startswith("indexer."), name


@pytest.mark.parametrize("kind", ["csa", "hca"])
def test_memory_scales(kind: str) -> None:
    """No S x S and no S x N x heads tensor in forward or backward (N = S/4 entries for CSA)."""
    S = 2048
    layer = make_layer(kind, query_chunk=32, hca_ratio=64, index_heads=4)
    x = torch.randn(1, S, D, requires_grad=True)
    with _MaxNumel() as mode:
        out, aux = layer(x)
        (out.sum() + aux).backward()
    assert mode.max_numel <= S * S // 8  # largest legitimate tensors: x and q, S x 4 heads x 32 = S * S / 16


def test_tiny_compressed_model_trains() -> None:
    model = tiny_model(["csa", "hca", "swa"], seed=1)
    ids = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(ids[:, :-1], labels=ids[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
        assert torch.isfinite(out.aux_loss) and out.aux_loss.item() > 0
    assert losses[-1] < losses[0] - 0.5, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("overrides, message", [
    (["data.seq_len=130"], "data.seq_len=130 must be divisible by model.attention.menu.csa.ratio=4"),
    (["model.attention.menu.csa.index_topk=40"],
     "model.attention.menu.csa.index_topk=40 exceeds the 32 compressed entries"),
    (["model.attention.menu.hca.ratio=48"], "data.seq_len=128 must be divisible by model.attention.menu.hca.ratio=48"),
    (["model.attention.menu.csa.index_head_dim=8"],
     "model.attention.menu.csa.index_head_dim=8 must be >= rope_head_dim=16"),
    (["model.attention.common.rope_head_dim=15"], "model.attention.menu.swa.rope_head_dim=15 must be even"),
    (["model.attention.menu.csa.ratio=1"], "model.attention.menu.csa.ratio=1 must be > 1"),
])
def test_bad_shapes_are_config_errors(overrides: list[str], message: str) -> None:
    base = ["model.layer_types=[swa,csa,hca,csa]", "data.seq_len=128", "model.attention.menu.csa.ratio=4",
            "model.attention.menu.hca.ratio=16", "model.attention.common.rope_head_dim=16",
            "model.attention.menu.csa.index_head_dim=32", "model.attention.menu.csa.index_topk=8"]
    assert load_config("tiny", base).model.layer_types == ["swa", "csa", "hca", "csa"]  # valid as it stands
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [*base, *overrides])
