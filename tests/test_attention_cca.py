"""The cca attention type (ZAYA1's CCA): against a naive fp64 reference written from MOSAIC_SPEC §3.2-3.3 with
torch's Conv1d (values and gradients, with and without document resets), causality through the convolution
and the value shift, prefill + decode == full forward across document starts, KV accounting and linear memory."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moesaic.configs import ConfigError, validate
from moesaic.configs.schema import AttentionConfig, Config, ModelConfig
from moesaic.model.attention import ForwardContext
from moesaic.model.attention.cca import CCASpec
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.rope import half_split_inv_freq

from numerics import assert_close_scaled
from test_attention_gqa import fp64_weights, rotate_half_rope

pytestmark = pytest.mark.numerics

D = 48
SPECS = {
    "zaya_global": CCASpec(num_heads=4, num_kv_heads=2, head_dim=16, query_chunk=5),
    "sliding": CCASpec(num_heads=4, num_kv_heads=2, head_dim=8, window=5, rope_fraction=1.0, query_chunk=4),
    "mqa_long_kernels": CCASpec(num_heads=3, num_kv_heads=1, head_dim=12, conv_kernel=3, mix_kernel=3,
                                query_chunk=7),
}


def model_cfg(spec: CCASpec, layers: int = 1, **overrides) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=D, num_layers=layers, layer_types=["a"] * layers,
                       ffn_types=["dense"] * layers, dense_intermediate_size=32,
                       attention=AttentionConfig(menu={"a": spec}), **overrides)


def build(spec: CCASpec, seed: int = 0) -> torch.nn.Module:
    """The layer with every weight random (temp too: at 0 it would hide the keys)."""
    torch.manual_seed(seed)
    layer = spec.build(model_cfg(spec), 0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.uniform_(0.5, 1.5) if name == "temp" else p.normal_(0.0, 0.3)
    return layer


def naive_qkv(spec: CCASpec, w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q [B,S,H,hd], k, v [B,S,n_kv,hd] of one document x [B,S,D]: MOSAIC_SPEC §3.2 line by line."""
    B, S, _ = x.shape
    H, n_kv, hd, g = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.num_heads // spec.num_kv_heads
    q, k = x @ w["q_proj.weight"].T, x @ w["k_proj.weight"].T
    q_res = 0.5 * (q.view(B, S, H, hd) + k.view(B, S, n_kv, 1, hd).expand(B, S, n_kv, g, hd).reshape(B, S, H, hd))
    k_res = q_res.view(B, S, n_kv, g, hd).mean(dim=3)
    z = F.pad(torch.cat([q, k], -1).transpose(1, 2), (spec.lookback, 0))  # [B,C,P+S]
    y = F.conv1d(z, w["conv_qk_depthwise.weight"], w["conv_qk_depthwise.bias"], groups=spec.channels)
    y = F.conv1d(y, w["conv_qk_grouped.weight"], w["conv_qk_grouped.bias"], groups=H + n_kv).transpose(1, 2)
    q = y[..., :H * hd].reshape(B, S, H, hd) + q_res
    k = y[..., H * hd:].reshape(B, S, n_kv, hd) + k_res
    delayed = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1) @ w["v_proj_delayed.weight"].T
    v = torch.cat([x @ w["v_proj_current.weight"].T, delayed], -1).view(B, S, n_kv, hd)
    return q, k, v


def naive(spec: CCASpec, w: dict[str, torch.Tensor], x: torch.Tensor, doc_lengths: list[int] | None = None):
    """The layer with a full [S, S] softmax; the projection restarts at each document (lengths summing to S)."""
    B, S, _ = x.shape
    H, n_kv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    parts = [naive_qkv(spec, w, piece) for piece in x.split(doc_lengths or [S], dim=1)]
    q, k, v = (torch.cat(t, dim=1) for t in zip(*parts))
    q = q * math.sqrt(hd) / q.norm(dim=-1, keepdim=True)
    k = k * math.sqrt(hd) / k.norm(dim=-1, keepdim=True) * w["temp"][:, None]
    pos = torch.arange(S)
    inv_freq = half_split_inv_freq(hd, spec.rope_theta, spec.rope_fraction, False)
    q, k = rotate_half_rope(q, inv_freq, pos), rotate_half_rope(k, inv_freq, pos)
    k, v = k.repeat_interleave(H // n_kv, dim=2), v.repeat_interleave(H // n_kv, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
    qi, ki = pos[:, None], pos[None]
    visible = (ki <= qi) & ((ki > qi - spec.window) if spec.window else True)
    o = torch.einsum("bhqk,bkhd->bqhd", logits.masked_fill(~visible, float("-inf")).softmax(-1), v)
    return o.reshape(B, S, H * hd) @ w["o_proj.weight"].T


def doc_ends(lengths: list[int], batch: int) -> torch.Tensor:
    """[B,S] True at the last token of each document but the final one."""
    ends = torch.zeros(sum(lengths), dtype=torch.bool)
    ends[torch.tensor(lengths[:-1]).cumsum(0) - 1] = True
    return ends.expand(batch, -1)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("docs", [None, [1, 6, 2, 10]], ids=["one_document", "packed"])
def test_matches_naive_reference_forward_and_backward(name, docs):
    spec = SPECS[name]
    layer = build(spec)
    x = torch.randn(2, 19, D, requires_grad=True)
    ctx = ForwardContext(doc_ends=None if docs is None else doc_ends(docs, 2))
    out, aux = layer(x, ctx)
    assert aux.item() == 0.0
    weights = fp64_weights(layer)
    x64 = x.double()
    ref = naive(spec, weights, x64, docs)
    assert_close_scaled(out, ref, 32, "output")
    g = torch.randn_like(out)
    (out * g).sum().backward()
    ref_grads = torch.autograd.grad((ref * g.double()).sum(), [x64, *weights.values()])
    assert_close_scaled(x.grad, ref_grads[0], 64, "grad x")
    for (pname, p), ref_grad in zip(layer.named_parameters(), ref_grads[1:]):
        assert_close_scaled(p.grad, ref_grad, 64, f"grad {pname}")


def test_doc_reset_off_leaks_like_transformers():
    """doc_reset: false ignores document ends (transformers' packed behaviour); on, a document's tokens see no
    earlier document through the projection, so the first tokens after an end differ."""
    spec = SPECS["zaya_global"]
    x = torch.randn(1, 12, D, dtype=torch.float64)
    ends = doc_ends([5, 7], 1)
    leaky = build(dataclasses.replace(spec, doc_reset=False)).double()
    weights = {n: p for n, p in leaky.named_parameters()}
    with torch.no_grad():
        assert_close_scaled(leaky(x, ForwardContext(doc_ends=ends))[0], naive(spec, weights, x), 32, "leaky")
        reset = build(spec).double()(x, ForwardContext(doc_ends=ends))[0]
        assert_close_scaled(reset, naive(spec, weights, x, [5, 7]), 32, "reset")
        assert (reset[0, 5:8] - leaky(x)[0][0, 5:8]).abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("name", list(SPECS))
def test_causality_through_convolution_and_value_shift(name):
    """A change of x at t moves nothing before t and does move t, t+1 and t+2 (the conv and shift reach)."""
    layer = build(SPECS[name])
    x = torch.randn(2, 16, D)
    ends = doc_ends([4, 12], 2)
    for t in (4, 9):
        x2 = x.clone()
        x2[:, t] += 1.0
        with torch.no_grad():
            a, b = (layer(v, ForwardContext(doc_ends=ends))[0] for v in (x, x2))
        assert torch.equal(a[:, :t], b[:, :t])
        assert (a[:, t:t + 3] - b[:, t:t + 3]).abs().amax(dim=(0, 2)).min() > 1e-4


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("docs", [None, [7, 1, 3, 5]], ids=["one_document", "packed"])
def test_prefill_then_decode_equals_full_forward(name, docs):
    """Prefill 7 tokens, then 1, 1, 3 and 4 more: documents start in the prefill, at a decode step and right
    after one; the cache's halo and document count carry the convolution and value shift across steps."""
    spec = SPECS[name]
    layer = build(spec)
    x = torch.randn(2, 16, D)
    ends = None if docs is None else doc_ends(docs, 2)
    with torch.no_grad():
        full = layer(x, ForwardContext(doc_ends=ends))[0]
        cache = layer.make_cache(2)
        steps, start = [], 0
        for n in (7, 1, 1, 3, 4):
            piece = slice(start, start + n)
            ctx = ForwardContext(caches=[cache], doc_ends=None if ends is None else ends[:, piece])
            steps.append(layer(x[:, piece], ctx)[0])
            start += n
    assert_close_scaled(torch.cat(steps, dim=1), full, 32, "decoded")


def test_transformer_resets_at_its_doc_end_token():
    """The model marks its ``doc_end_token`` as document ends: with it set, a document after the token is
    computed as if it started the sequence (through the projection; attention still sees the earlier one)."""
    from moesaic.model import Transformer

    spec = SPECS["zaya_global"]
    torch.manual_seed(0)
    model = Transformer(model_cfg(spec, layers=2))
    ids = torch.randint(1, 64, (1, 12))
    ids[0, 4] = 0
    with torch.no_grad():
        leaky = model(ids).logits
        model.doc_end_token = 0
        reset = model(ids).logits
    torch.testing.assert_close(leaky[:, :5], reset[:, :5], rtol=0, atol=0)
    assert (leaky[0, 5:] - reset[0, 5:]).abs().amax(-1).min() > 1e-6


def test_kv_bytes_count_the_constant_state_and_match_the_cache():
    spec = SPECS["zaya_global"]
    C, state = (4 + 2) * 16, (6 * 16 * 2 + 2 * 16 // 2) * 4  # 2 conv rows of [q ; k], one delayed value row
    assert spec.state_bytes("fp32") == state
    cfg = model_cfg(spec)
    assert layer_kv_bytes(cfg, 20, "fp32")[0].total == 20 * 2 * 2 * 16 * 4 + state
    sliding = dataclasses.replace(spec, window=6)
    assert sliding.kv_bytes(20, "bf16", "bf16") == (6 * 2 * 2 * 16 * 2 + state / 2, 0.0)
    layer = build(spec)
    cache = layer.make_cache(1)
    with torch.no_grad():
        layer(torch.randn(1, 20, D), ForwardContext(caches=[cache]))
    assert cache.kv_bytes() == layer_kv_bytes(cfg, 20, "fp32")[0].total == cache.nbytes()
    assert cache.halo.qk.shape == (1, 2, C)
    # ZAYA1-8B (MOSAIC_SPEC §3.6): 1024 B per token and 5376 B of state per layer in bf16.
    zaya = CCASpec(num_heads=8, num_kv_heads=2, head_dim=128)
    assert zaya.dense_kv_bytes_per_token("bf16") == 1024 and zaya.state_bytes("bf16") == 5376


def test_backward_keeps_nothing_quadratic_in_sequence_length():
    S = 512
    for spec in (dataclasses.replace(SPECS["zaya_global"], query_chunk=64), SPECS["sliding"]):
        layer = build(spec)
        sizes: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            layer(torch.randn(1, S, D, requires_grad=True), ForwardContext(doc_ends=torch.rand(1, S) < 0.05))
        assert max(sizes) < S * S // 4, (spec, max(sizes))


def test_bad_fields_are_one_line():
    for change, message in [({"num_kv_heads": 3}, "num_kv_heads=3 must divide"),
                            ({"num_heads": 3, "num_kv_heads": 1, "head_dim": 5}, "must be even"),
                            ({"conv_kernel": 0}, "conv_kernel=0 must be > 0"),
                            ({"rope_fraction": 0.3}, "rope_fraction=0.3 must be in (0, 1]")]:
        menu = {"c": {"kind": "cca", **change}}
        cfg = Config(model=ModelConfig(num_layers=1, layer_types=["c"], ffn_types=["dense"],
                                       attention=AttentionConfig(menu=menu)))
        with pytest.raises(ConfigError, match="model.attention.menu.c") as err:
            validate(cfg)
        assert message in str(err.value) and "\n" not in str(err.value)


# Global, sliding (window longer than a 16-token shard) and 3+3-tap (look-back 4) cca layers at S = 32, sp = 2.
SP_LAYOUT = ["model.num_layers=3", "model.layer_types=[c,cs,c3]", "model.ffn_types=[dense,moe,moe]",
             "data.seq_len=32", "model.moe.seq_aux_loss_coef=0.01",
             "model.attention.menu.c={kind: cca, num_heads: 4, num_kv_heads: 2, head_dim: 16, window: 0}",
             "model.attention.menu.cs={kind: cca, num_heads: 2, num_kv_heads: 2, head_dim: 16, window: 20, "
             "query_chunk: 5}",
             "model.attention.menu.c3={kind: cca, num_heads: 2, num_kv_heads: 1, head_dim: 32, window: 0, "
             "conv_kernel: 3, mix_kernel: 3}"]


def sp_worker(checks, layout: list[str]) -> None:
    """Harness worker: the sharded model vs whole sequences, without and with document ends at and just before
    the shard edge (position 15 ends a document, so shard 1 starts one; 14 leaves a one-token document)."""
    from moesaic.configs import ParallelConfig
    from moesaic.parallel.topology import Topology

    from test_sp import _cfg, _check_model

    topology = Topology(ParallelConfig(sp=2))
    _check_model(checks, _cfg(layout), topology, "cca, one document")
    _check_model(checks, _cfg(layout), topology, "cca, documents ending at 3, 13, 14, 15, 22", (3, 13, 14, 15, 22))


@pytest.mark.multiproc
def test_sp2_matches_one_process_with_halo_and_document_resets():
    from harness import run_workers

    run_workers(sp_worker, world=2, layout=SP_LAYOUT).assert_ok()


def test_mixed_csa_cca_and_laguna_model_trains_in_the_demo_loop(tmp_path: Path) -> None:
    """V4's CSA beside a CCA layer and two Laguna-style gated GQA layers over one KV shape, the second with four
    times the query heads of the first, in the trainer: the loss falls and each layer's panel is there."""
    from trainrun import train_briefly

    laguna = "kind: gqa, num_kv_heads: 2, head_dim: 16, rope_fraction: 0.5"
    logged = train_briefly(
        tmp_path, "mosaic_tiny", "model.num_layers=4", "model.layer_types=[csa,cca,narrow,wide]",
        "model.ffn_types=[dense,moe,moe,moe]",
        "model.attention.menu.cca={kind: cca, num_kv_heads: 2, head_dim: 16, window: 0}",
        f"model.attention.menu.narrow={{{laguna}, num_heads: 2, gate: head, window: 16}}",
        f"model.attention.menu.wide={{{laguna}, num_heads: 8, gate: element, window: 0}}")
    assert [logged[f"attn_layers/L0{i}/query_heads"] for i in (2, 3)] == [2, 8]
    for i in (2, 3):
        assert 0 < logged[f"attn_layers/L0{i}/gate_mean"] <= logged[f"attn_layers/L0{i}/gate_max"]
    assert 0 < logged["attn_layers/L01/mass_first"] < 1
    assert logged["kv_layers/L01/4k/bytes_per_token"] > 2 * 2 * 16 * 4  # K/V of 2 heads of 16 in fp32 + the state
    assert logged["kv_layers/L03/4k/bytes_per_token"] == 2 * 2 * 16 * 4
