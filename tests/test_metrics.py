"""The metrics panel on constructed inputs: forced router loads, the kernel's attention statistics
against a naive softmax, FLOPs and KV sizes by hand, the heatmap's JSONL form and config checks;
and the same MoE metrics from one process and from two expert-parallel ones."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moesaic.configs import Config, ConfigError, load_config, validate
from moesaic.configs.schema import ModelConfig, MoEConfig
from moesaic.model import Transformer
from moesaic.model.attention import AttentionStats, CompressedKV, layer_specs, resolve_menu, window_attention
from moesaic.model.attention.presets import v4_attention
from moesaic.model.sequence import WHOLE
from moesaic.model.kv_accounting import dense_kv_bytes, layer_kv_bytes
from moesaic.model.moe import Router
from moesaic.trainer.metrics import (
    Heatmap,
    MetricsPanel,
    balance_metrics,
    context_label,
    flops_per_token,
    kv_metrics,
    moe_aggregates,
    router_metrics,
)
from moesaic.trainer.sinks import MetricSinks
from trainrun import FAST, train

pytestmark = pytest.mark.numerics


def one_hot_router(num_experts: int = 4) -> Router:
    """A top-1 softmax router whose token x = one_hot(e) scores expert e highest."""
    cfg = ModelConfig(hidden_size=num_experts, moe=MoEConfig(num_experts=num_experts, top_k=1, score_func="softmax"))
    router = Router(cfg, layer_idx=0)
    with torch.no_grad():
        router.weight.copy_(5.0 * torch.eye(num_experts))
    return router


def test_forced_router_loads_give_known_maxvio_cv_entropy_and_dead_experts() -> None:
    router = one_hot_router()
    tokens = torch.eye(4)[[0, 0, 0, 1, 0, 0, 0, 1]].view(2, 4, 4)  # loads [6, 2, 0, 0]
    router.eval()
    router(tokens)
    assert router.stat_counts.sum().item() == 0, "eval forwards must not count"
    router.train()
    router(tokens)
    assert router.stat_counts.tolist() == [6.0, 2.0, 0.0, 0.0]
    p = torch.softmax(torch.tensor([5.0, 0.0, 0.0, 0.0]), dim=0)
    entropy = -(p * p.log()).sum().item()  # the same for every token, by symmetry
    values = router_metrics(router.stat_counts[None], router.stat_sums[None], router.expert_bias[None], top_k=1,
                            ep=1, seq_aux=False)
    assert values["maxvio"].item() == pytest.approx(6 / 2 - 1)
    assert values["cv"].item() == pytest.approx(math.sqrt(6) / 2)  # deviations 4, 0, -2, -2 around 2
    assert values["dead"].item() == 2
    assert values["load_min"].item() == 0
    assert values["entropy"].item() == pytest.approx(entropy / math.log(4), rel=1e-5)
    router.reset_stats()
    assert router.stat_counts.sum().item() == 0 and router.stat_sums.abs().sum().item() == 0


def test_router_stats_switch_off() -> None:
    router = one_hot_router()
    router.track_stats = False
    router.train()
    router(torch.eye(4)[None])
    assert router.stat_counts.sum().item() == 0 and router.load_counts.sum().item() == 4


def test_ep_load_and_layer_aggregates() -> None:
    counts = torch.tensor([[4.0, 4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    values = balance_metrics(counts, ep=2)
    assert values["ep_load"].tolist() == [2.0, 1.0]  # rank 0 owns experts 0-1 and got everything
    assert values["maxvio"].tolist() == [1.0, 0.0] and values["dead"].tolist() == [2.0, 0.0]
    assert "ep_load" not in balance_metrics(counts, ep=1)
    layers = torch.arange(11.0)
    agg = moe_aggregates({"maxvio": layers, "entropy": layers, "dead": layers})
    assert agg["moe/maxvio/max"] == 10 and agg["moe/maxvio/p90"] == pytest.approx(9)
    assert agg["moe/entropy/min"] == 0 and agg["moe/entropy/p10"] == pytest.approx(1)
    assert agg["moe/dead/total"] == 55


def tiny_config(**logging: object) -> Config:
    cfg = load_config(None, ["model.hidden_size=32", "model.num_layers=2", "model.ffn_types=[moe,moe]",
                             "model.vocab_size=64", "model.attention.common.num_heads=2",
                             "model.attention.common.head_dim=16",
                             "model.attention.common.rope_head_dim=8", "model.attention.common.q_lora_rank=16",
                             "model.attention.common.o_lora_rank=16", "model.attention.common.window=4",
                             "model.moe.num_experts=4", "model.moe.intermediate_size=16", "data.seq_len=8",
                             "parallel.ep=2", "model.moe.seq_aux_loss_coef=0.01", "train.log_every=1"])
    for key, value in logging.items():
        setattr(cfg.logging, key, value)
    return cfg


def test_panel_on_a_tiny_model_with_forced_routing() -> None:
    cfg = tiny_config(moe_heatmap_every=2, kv_contexts=[64])
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    routed_inputs = []
    for router in model.routers():
        with torch.no_grad():
            router.expert_bias.copy_(torch.tensor([100.0, 100.0, 0.0, 0.0]))  # every token -> experts 0 and 1
        router.register_forward_hook(lambda mod, args, out: routed_inputs.append((mod, args[0])))
    panel = MetricsPanel(model, cfg, torch.device("cpu"), world_size=1)
    ids = torch.randint(0, 64, (3, 8))
    plain = model(ids, labels=ids).loss
    for router in model.routers():
        router.reset_stats()
    routed_inputs.clear()
    armed = model(ids, labels=ids, stats=panel.arm()).loss
    assert torch.equal(plain, armed), "collecting statistics must not change the numerics"
    out = panel.collect(step=2, tokens_per_s=1000.0)

    for layer in ("L00", "L01"):
        assert out[f"moe_layers/{layer}/maxvio"] == pytest.approx(1.0)  # loads [T, T, 0, 0] / mean T/2
        assert out[f"moe_layers/{layer}/cv"] == pytest.approx(1.0)
        assert out[f"moe_layers/{layer}/dead"] == 2 and out[f"moe_layers/{layer}/load_min"] == 0
        assert out[f"moe_layers/{layer}/ep_load"] == pytest.approx(2.0)
        assert out[f"moe_layers/{layer}/bias_max"] == 100 and out[f"moe_layers/{layer}/bias_min"] == 0
        assert out[f"attn_layers/{layer}/mass_window"] + out[f"attn_layers/{layer}/mass_sink"] == pytest.approx(1.0)
        assert out[f"attn_layers/{layer}/max_logit"] > 0
    for (router, x), layer in zip(routed_inputs, ("L00", "L01")):
        scores = router.scores(x).detach().flatten(0, 1)
        p = scores / scores.sum(-1, keepdim=True)
        want = (-(p * p.log()).sum(-1)).mean().item() / math.log(4)
        assert out[f"moe_layers/{layer}/entropy"] == pytest.approx(want, rel=1e-5)
        aux = router.eval()(x).aux_loss.item()  # eval: no counting
        assert out[f"moe_layers/{layer}/aux_loss"] == pytest.approx(aux, rel=1e-5)
    assert out["moe/maxvio/max"] == pytest.approx(1.0) and out["moe/dead/total"] == 4
    assert out["moe/expert_load"].loads == [[2.0, 2.0, 0.0, 0.0]] * 2
    assert out["perf/flops_per_token"] == flops_per_token(model, cfg)
    assert out["perf/tflops_per_device"] == pytest.approx(flops_per_token(model, cfg) * 1000 / 1e12)
    assert "perf/mfu" not in out and out["perf/peak_mem_gib"] > 0
    assert "kv/64/gib" in out

    again = panel.collect(step=3, tokens_per_s=1000.0)  # a window without forwards: reset, no constants
    assert again["moe_layers/L00/dead"] == 4 and "kv/64/gib" not in again
    assert "moe/expert_load" not in again and not any(k.startswith("attn") for k in again)


def naive_stats(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, window: int, scale: float,
                entries: torch.Tensor, visible: torch.Tensor) -> dict[str, float]:
    """Per (batch, query, head): one softmax over its window keys, visible entries and the sink."""
    B, S, H, _ = q.shape
    masses = torch.zeros(3)
    top = -math.inf
    for b in range(B):
        for t in range(S):
            keys = kv[b, max(0, t - window + 1):t + 1]
            ents = entries[b][visible[0, t]]
            for h in range(H):
                logits = torch.cat([keys @ q[b, t, h] * scale, ents @ q[b, t, h] * scale])
                top = max(top, logits.max().item())
                p = torch.cat([logits, sink[h].view(1)]).softmax(0)
                masses += torch.stack([p[:len(keys)].sum(), p[len(keys):-1].sum(), p[-1]])
    masses /= B * S * H
    return {"mass_window": masses[0].item(), "mass_compressed": masses[1].item(), "mass_sink": masses[2].item(),
            "max_logit": top}


@pytest.mark.parametrize("backend", ["cpu", "torch"], ids=["compiled", "torch-ops"])
def test_kernel_statistics_match_a_naive_softmax(backend: str) -> None:
    torch.manual_seed(0)
    B, S, H, c, W, N = 2, 10, 3, 8, 4, 3
    q, kv, entries = torch.randn(B, S, H, c), torch.randn(B, S, c), torch.randn(B, N, c)
    sink = torch.randn(H)
    visible = (torch.arange(N) < ((torch.arange(S) + 1) // 3).unsqueeze(-1)).unsqueeze(0)  # [1, S, N]
    extra = CompressedKV(entries, mask=visible)
    stats = AttentionStats()
    out, _ = window_attention(q, kv, sink, W, 0.5, 3, extra, stats, backend)  # chunks of 3 queries
    assert torch.equal(out, window_attention(q, kv, sink, W, 0.5, 3, extra, backend=backend)[0])
    got = {name: (total / count).item() for name, (total, count) in stats.means.items()}
    got["max_logit"] = stats.maxima["max_logit"].item()
    want = naive_stats(q, kv, sink, W, 0.5, entries, visible)
    assert got == pytest.approx(want, rel=1e-5)
    swa = AttentionStats()
    window_attention(q, kv, sink, W, 0.5, 3, stats=swa, backend=backend)
    assert set(swa.means) == {"mass_window", "mass_sink"}


def test_indexer_selection_statistics_on_known_picks() -> None:
    """m = 4, 8 queries, 3 entries, top-2: distances, coverage and overlap counted by hand."""
    cfg = ModelConfig(hidden_size=16, num_layers=1, layer_types=["csa"],
                      attention=v4_attention(num_heads=2, head_dim=8, rope_head_dim=4, q_lora_rank=8, o_groups=1,
                                             o_lora_rank=8, window=4, csa_ratio=4, index_heads=1,
                                             index_head_dim=8, index_topk=2))
    layer = Transformer(cfg).layers[0].attn
    stats = AttentionStats()
    idx = torch.tensor([[[-1, -1]] * 3 + [[0, -1]] * 4 + [[1, 0]]])  # [1, 8, 2]; entry 2 is never picked
    layer._record_selection(stats, WHOLE, idx, torch.arange(8), num_entries=3)
    got = {name: (total / count).item() for name, (total, count) in stats.means.items()}
    # Entry w ends at token 4w + 3: distances 0, 1, 2, 3 (t = 3..6, entry 0), then 0 and 4 (t = 7).
    # Overlap: of the 6 picks of queries 1..7, 4 were also the previous query's (entry 0 at t = 4, 5, 6, 7).
    assert got == pytest.approx({"index_distance": 10 / 6, "index_coverage": 2 / 3, "index_overlap": 4 / 6})


def small_attention(**kw: object) -> Config:
    cfg = Config()
    cfg.data.seq_len = 8
    cfg.model.attention = v4_attention(num_heads=2, head_dim=8, rope_head_dim=4, window=4, csa_ratio=2, hca_ratio=2,
                                       index_heads=3, index_head_dim=4, index_topk=1, **kw)
    return cfg


def attention_flops_per_token(cfg: Config, kind: str) -> float:
    """FLOPs per token of the V4 menu's entry ``kind`` at the config's sequence length."""
    return resolve_menu(cfg.model)[kind].flops_per_token(cfg.data.seq_len)


def test_attention_flops_count_only_the_keys_each_query_sees() -> None:
    cfg = small_attention()
    per_key = 12 * 2 * 8
    window = (1 + 2 + 3 + 4 * 5) / 8  # min(t + 1, 4) over t < 8
    entries = (0 + 1 + 1 + 2 + 2 + 3 + 3 + 4) / 8  # (t + 1) // 2 visible compressed entries
    selected = 7 / 8  # min(1, entries)
    assert attention_flops_per_token(cfg, "swa") == pytest.approx(per_key * window)
    assert attention_flops_per_token(cfg, "hca") == pytest.approx(per_key * (window + entries))
    index = 2 * 3 * 4
    loss = 3 * index * selected  # the indexer's scores of its picks, forward + backward
    expected = per_key * (window + selected) + index * entries + loss
    assert attention_flops_per_token(cfg, "csa") == pytest.approx(expected)
    no_loss = small_attention(indexer_loss_coef=0.0)
    assert attention_flops_per_token(no_loss, "csa") == pytest.approx(per_key * (window + selected) + index * entries)


def test_model_flops_are_six_times_active_non_embedding_params_plus_attention() -> None:
    cfg = tiny_config()
    model = Transformer(cfg.model)
    active = model.num_params(active_only=True) - model.embed.weight.numel()
    assert flops_per_token(model, cfg) == pytest.approx(6 * active + 2 * attention_flops_per_token(cfg, "swa"))
    assert model.num_params(active_only=True) < model.num_params()


def test_kv_metrics_follow_kv_accounting() -> None:
    cfg = Config()
    cfg.model.num_layers, cfg.model.layer_types, cfg.model.attention = 3, ["swa", "csa", "hca"], v4_attention()
    cfg.logging.kv_contexts = [131072, 1000]
    out = kv_metrics(cfg)
    layers = layer_kv_bytes(cfg.model, 131072, "fp32")
    total = sum(layer.total for layer in layers)
    assert out["kv/128k/gib"] == total / 2**30
    assert out["kv/128k/compression"] == pytest.approx(dense_kv_bytes(cfg.model, 131072, "fp32") / total)
    assert out["kv_layers/L01/128k/bytes_per_token"] == layers[1].total / 131072
    assert out["kv_layers/L00/128k/compression"] == pytest.approx(131072 / layer_specs(cfg.model)[0].window)
    assert "kv/1000/bytes_per_token" in out
    assert [context_label(n) for n in (131072, 1048576, 4096, 1000)] == ["128k", "1M", "4k", "1000"]


def test_heatmap_is_an_object_in_the_jsonl_and_a_table_plus_image_in_wandb(tmp_path: Path) -> None:
    cfg = Config()
    cfg.logging.wandb = "disabled"
    sinks = MetricSinks(cfg, tmp_path, resume_step=None)
    sinks.log(3, {"moe/expert_load": Heatmap([1, 2], [[1.5, 0.5], [1.0, 1.0]]), "train/loss": 1.0})
    sinks.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == {"step": 3, "moe/expert_load": {"layers": [1, 2], "load": [[1.5, 0.5], [1.0, 1.0]]},
                   "train/loss": 1.0}
    import wandb

    logged = Heatmap([1, 2], [[1.5, 0.5], [1.0, 1.0]]).to_wandb("moe/expert_load")
    assert isinstance(logged["moe/expert_load"], wandb.Table) and len(logged["moe/expert_load"].data) == 4
    assert isinstance(logged["moe/expert_load_heatmap"], wandb.Image)


@pytest.mark.parametrize("override, field", [
    ("logging.moe_heatmap_every=3", "logging.moe_heatmap_every"),
    ("logging.kv_contexts=[0]", "logging.kv_contexts"),
    ("logging.peak_flops=-1", "logging.peak_flops"),
])
def test_logging_fields_are_validated(override: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(None, ["train.log_every=2", override])
    cfg = load_config(None, ["train.log_every=2", "logging.moe_heatmap_every=4", "logging.peak_flops=1e12"])
    validate(cfg)


@pytest.mark.multiproc
def test_metrics_equal_across_ep_and_sp_layouts(tmp_path: Path) -> None:
    """Counts and means are summed over the world, so 2 processes with parallel.ep=2, or with
    parallel.sp=2 (each rank holding half of every sequence), log what 1 process logs."""
    common = FAST + [f"data.cache_dir={tmp_path / 'cache'}", "model.ffn_types=[moe,moe]", "train.steps=2",
                     "model.layer_types=[csa,hca]", "model.attention.menu.hca.ratio=8",
                     "model.attention.menu.csa.index_topk=4",
                     "train.sample_tokens=0", "logging.moe_heatmap_every=1", "train.eval_every=100"]
    train(common + [f"run_dir={tmp_path / 'one'}"])
    train(common + [f"run_dir={tmp_path / 'ep2'}", "parallel.ep=2"], nproc=2)
    train(common + [f"run_dir={tmp_path / 'sp2'}", "parallel.sp=2"], nproc=2)
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("one", "ep2", "sp2")}
    assert [r["step"] for r in rows["one"]] == [r["step"] for r in rows["ep2"]] == [r["step"] for r in rows["sp2"]]
    assert [r["step"] for r in rows["one"]] == [1, 2]
    for one, ep2, sp2 in zip(rows["one"], rows["ep2"], rows["sp2"]):
        assert one["moe/expert_load"] == ep2["moe/expert_load"] == sp2["moe/expert_load"]  # exact: integer counts
        assert set(ep2) == set(one) | {"moe/ep_load/max", "moe/ep_load/p90", "moe_layers/L00/ep_load",
                                       "moe_layers/L01/ep_load"}
        assert set(sp2) == set(one)
        if "perf/flops_per_token" in one:  # counts every expert, not a rank's share
            assert one["perf/flops_per_token"] == ep2["perf/flops_per_token"] == sp2["perf/flops_per_token"]
        moe_keys = {k for k in one if k.startswith(("moe/", "moe_layers/")) and k != "moe/expert_load"}
        assert {k: ep2[k] for k in moe_keys} == pytest.approx({k: one[k] for k in moe_keys}, rel=1e-6)
        # Attention means (masses, the CSA indexer's selection) pool per-rank sums of different query sets.
        attn_keys = {k for k in one if k.startswith(("attn/", "attn_layers/"))}
        assert "attn_layers/L00/index_overlap" in attn_keys
        for other in (ep2, sp2):
            assert {k: other[k] for k in attn_keys} == pytest.approx({k: one[k] for k in attn_keys}, rel=1e-5)
        loads = torch.tensor(one["moe/expert_load"]["load"])
        want = balance_metrics(loads, ep=2)["ep_load"].tolist()
        assert [ep2["moe_layers/L00/ep_load"], ep2["moe_layers/L01/ep_load"]] == pytest.approx(want)
