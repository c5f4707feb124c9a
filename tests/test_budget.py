"""The attention budget planner (model/budget.py, trainer/budget_costs.py, ``moesaic budget``)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from moesaic.configs import load_config, save_config
from moesaic.launch.cli import main
from moesaic.model.attention.base import layer_specs
from moesaic.model.budget import Choice, layer_choices, plan, planned_model
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.transformer import Transformer
from moesaic.trainer.budget_costs import calibration_costs, mean_loss, stats_costs

SMALL = ["model.hidden_size=32", "model.num_layers=4", "model.layer_types=[csa,hca,swa,csa]",
         "model.ffn_types=[dense,dense,dense,dense]", "model.dense_intermediate_size=32",
         "model.attention.common.num_heads=2", "model.attention.common.head_dim=16",
         "model.attention.common.rope_head_dim=8", "model.attention.common.q_lora_rank=16",
         "model.attention.common.o_lora_rank=16", "model.attention.common.window=8", "model.vocab_size=64",
         "data.seq_len=32", "model.attention.menu.csa.index_topk=4", "model.attention.menu.csa.index_head_dim=8",
         "model.attention.menu.hca.ratio=8"]


def _synthetic(rng: random.Random, layers: int, options: int) -> tuple[list[list[Choice]], list[list[float]]]:
    """Random choices with small integer bytes/FLOPs (many ties) and random costs."""
    spec = layer_specs(load_config("tiny").model)[0]
    choices = [[Choice(f"e{j}", spec, float(rng.randint(0, 6)), float(rng.randint(0, 4))) for j in range(options)]
               for _ in range(layers)]
    costs = [[float(rng.randint(0, 5)) for _ in range(options)] for _ in range(layers)]
    return choices, costs


@pytest.mark.parametrize("seed", range(6))
def test_plan_is_the_brute_force_optimum(seed: int) -> None:
    """Least total cost among all layouts within both budgets; ties: most bytes. No single layer can move to a
    choice with more bytes and no higher cost within the budgets; the same inputs give the same plan."""
    rng = random.Random(seed)
    choices, costs = _synthetic(rng, 4, 3)
    kv_budget = rng.randint(4, 16)
    flops_budget = rng.choice([math.inf, rng.randint(3, 12)])
    feasible = [p for p in itertools.product(range(3), repeat=4)
                if sum(choices[i][j].kv_bytes for i, j in enumerate(p)) <= kv_budget
                and sum(choices[i][j].flops for i, j in enumerate(p)) <= flops_budget]
    if not feasible:
        with pytest.raises(Exception, match="cannot be met"):
            plan(choices, costs, kv_budget, flops_budget)
        return
    best = min(sum(costs[i][j] for i, j in enumerate(p)) for p in feasible)
    most = max(sum(choices[i][j].kv_bytes for i, j in enumerate(p)) for p in feasible
               if sum(costs[i][j] for i, j in enumerate(p)) == best)
    chosen = plan(choices, costs, kv_budget, flops_budget)
    assert chosen.cost == best and chosen.kv_bytes == most and chosen.kv_bytes <= kv_budget
    assert chosen.flops <= flops_budget
    for i, picked in enumerate(chosen.choices):
        for j, other in enumerate(choices[i]):
            if other.kv_bytes > picked.kv_bytes and costs[i][j] <= chosen.costs[i]:
                assert (chosen.kv_bytes - picked.kv_bytes + other.kv_bytes > kv_budget
                        or chosen.flops - picked.flops + other.flops > flops_budget)
    assert plan(choices, costs, kv_budget, flops_budget) == chosen


def test_choices_follow_the_weights_and_the_registry() -> None:
    cfg = load_config("tiny", SMALL).model
    choices = layer_choices(cfg, 2**20, 32, topks=[2])
    names = [[c.entry for c in layer] for layer in choices]
    assert names == [["swa", "csa_k2", "csa"], ["swa", "hca"], ["swa"], ["swa", "csa_k2", "csa"]]
    assert [c.current for c in choices[0]] == [False, False, True]
    csa = choices[0][2]
    assert csa.kv_bytes == sum(csa.spec.kv_bytes(2**20, "bf16", "bf16"))
    assert choices[0][1].kv_bytes == csa.kv_bytes and choices[0][1].flops < csa.flops  # top-k: FLOPs only
    with pytest.raises(Exception, match="--types mamba is not the kind"):
        layer_choices(cfg, 2**20, 32, kinds=["mamba"])
    with pytest.raises(Exception, match="layer 1 .* no choice among --types csa"):
        layer_choices(cfg, 2**20, 32, kinds=["csa"])


def test_kv_shared_layers_and_their_sources_keep_their_entries() -> None:
    cfg = load_config("gemma4_tiny").model
    specs = layer_specs(cfg)[:cfg.num_layers]
    choices = layer_choices(cfg, 4096, 64)
    for i, spec in enumerate(specs):
        if spec.own_kv() != spec:
            assert [c.entry for c in choices[i]] == [cfg.attention_type(i)]
            assert [c.entry for c in choices[spec.kv_source]] == [cfg.attention_type(spec.kv_source)]


def _planned_bytes(cfg, chosen, context: int) -> float:
    return sum(layer.total for layer in layer_kv_bytes(planned_model(cfg, chosen), context))


def test_calibration_cost_is_the_loss_of_the_switched_model() -> None:
    """A layer's cost equals the loss of a whole model built with that layer's entry switched, minus the base."""
    cfg = load_config("tiny", SMALL).model
    torch.manual_seed(0)
    state = Transformer(cfg).state_dict()
    batches = [torch.randint(0, 64, (2, 33)), torch.randint(0, 64, (1, 33))]
    choices = layer_choices(cfg, 4096, 32)
    base, costs = calibration_costs(cfg, state, batches, choices)
    switched = dataclasses.replace(cfg, layer_types=["swa", "hca", "swa", "csa"])
    model = Transformer(switched)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and all(k.startswith("layers.0.attn.") for k in unexpected) and unexpected
    assert costs[0][0] == pytest.approx(mean_loss(model, batches) - base, abs=1e-9)
    assert costs[0][1] == 0.0 and costs[2] == [0.0]
    chosen = plan(choices, costs, 3 * choices[0][0].kv_bytes + choices[1][1].kv_bytes)
    assert _planned_bytes(cfg, chosen, 4096) == chosen.kv_bytes


def test_stats_cost_is_the_compressed_mass_dropped() -> None:
    cfg = load_config("tiny", SMALL).model
    choices = layer_choices(cfg, 4096, 32)
    rows = [{"attn_layers/L00/mass_compressed": 0.2, "attn_layers/L01/mass_compressed": 0.5},
            {"attn_layers/L00/mass_compressed": 0.4, "attn_layers/L01/mass_compressed": 0.1}]
    costs = stats_costs(rows, choices, layer_specs(cfg)[:4], 4096, "bf16", "bf16")
    assert costs[0] == pytest.approx([0.3, 0.0]) and costs[1] == pytest.approx([0.3, 0.0]) and costs[2] == [0.0]


def _cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``moesaic budget ARGS`` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(["budget", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_plans_from_a_runs_stats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The layer that reads more far back keeps its compressed cache; the planned config fits the budget in
    ``kv-report``'s accounting and upgrading any one layer would not. The table reaches wandb (offline) as a
    Table and ``moesaic report`` as budget.png."""
    cfg = load_config("tiny", SMALL + ["logging.wandb=offline"])
    cfg.run_dir = str(tmp_path)
    save_config(cfg, tmp_path / "config.yaml")
    rows = [{"step": 10, "attn_layers/L00/mass_compressed": 0.1, "attn_layers/L01/mass_compressed": 0.2,
             "attn_layers/L03/mass_compressed": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    context = 2**16
    per = {lk.layer: lk.total for lk in layer_kv_bytes(cfg.model, context)}
    swa = layer_kv_bytes(load_config("tiny", SMALL + ["model.layer_types=[swa,swa,swa,swa]"]).model, context)[0].total
    budget = 3 * swa + per[3]  # room for one compressed layer: the one with the most mass
    code, out, err = _cli(capsys, str(tmp_path), "--kv-budget", f"{budget:.0f}", "--context", "64k")
    assert code == 0, err
    planned = load_config(tmp_path / "budget.yaml")
    assert planned.model.layer_types == ["swa", "swa", "swa", "csa"]
    total = sum(lk.total for lk in layer_kv_bytes(planned.model, context))
    assert total <= budget and all(total - swa + per[i] > budget for i in (0, 1))
    table = json.loads((tmp_path / "budget.json").read_text())
    assert [r["choice"] for r in table["layers"]] == planned.model.layer_types and table["kv_bytes"] == total
    assert "mass dropped" in out and "wandb sync" in out
    [logged] = (tmp_path / "wandb").glob("offline-run-*/files/media/table/budget/plan_*.table.json")
    logged = json.loads(logged.read_text())
    assert logged["columns"][:3] == ["layer", "choice", "kind"]
    assert [r[1] for r in logged["data"]] == planned.model.layer_types
    assert sum(r[3] for r in logged["data"]) * 2**20 == pytest.approx(total, rel=1e-12)
    assert main(["report", str(tmp_path)]) == 0
    png = Image.open(tmp_path / "report" / "budget.png")
    assert 600 <= png.size[0] <= 1400 and 300 <= png.size[1] <= 1000
    assert len(png.convert("RGB").getcolors(maxcolors=2**24)) > 8  # bars in colour, not a blank canvas


@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "lots"], "must be a size like 8GiB"),
    (["--kv-budget", "100"], "cannot be met: the smallest layout needs"),
    (["--kv-budget", "1GiB", "--types", "mamba"], "--types mamba is not the kind"),
    (["--kv-budget", "1GiB"], "has neither attention stats"),
])
def test_cli_bad_inputs_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                     message: str) -> None:
    cfg = load_config("tiny", SMALL)
    save_config(cfg, tmp_path / "config.yaml")
    if "has neither" not in message:
        (tmp_path / "metrics.jsonl").write_text(json.dumps({"attn_layers/L00/mass_compressed": 0.1}) + "\n")
    code, _, err = _cli(capsys, str(tmp_path), *args)
    assert code == 2 and message in err.splitlines()[-1] and "Traceback" not in err
