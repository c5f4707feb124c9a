"""Elastic attention (model/attention/elastic.py) and the decoding budget controller (model/budget.py: fit_modes).

The registry-parametrised tests (test_model.py: causality, prefill + decode, generation in the eval
mode; test_sp.py: SP and SP x EP runs equal one process, with the mode schedule drawn per step) cover
the type as every other; these check what is elastic's own.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attention_types import SMALL, small_menu
from moesaic.configs import ConfigError, load_config
from moesaic.configs.schema import ModelConfig
from moesaic.model.attention.elastic import ElasticAttention, draw_modes, mode_shares
from moesaic.model.attention import layer_specs
from moesaic.model.budget import layer_choices, plan, planned_model
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.model.transformer import Transformer
from moesaic.trainer.budget_costs import calibration_costs, mean_loss
from numerics import assert_close_scaled
from test_attention_compressed import cached_logits

pytestmark = pytest.mark.numerics
MODES = list(SMALL["elastic"]["modes"])  # csa, csa1, hca, window


def _cfg(layer_types: list[str]) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=48, num_layers=len(layer_types),
                       ffn_types=["dense"] * len(layer_types),
                       dense_intermediate_size=32, layer_types=layer_types, attention=small_menu())


def _elastic_model(seed: int = 0, layers: int = 3) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(_cfg(["elastic"] * layers))


def _fixed_twin(model: Transformer, modes: list[str]) -> Transformer:
    """A model of fixed-type layers running ``modes`` with the elastic model's weights."""
    menu = {**small_menu().menu, **{m: dataclasses.replace(s) for m, s in
                                    model.layers[0].attn.spec.mode_specs().items()}}
    cfg = dataclasses.replace(model.cfg, layer_types=modes, attention=dataclasses.replace(model.cfg.attention,
                                                                                          menu=menu))
    twin = Transformer(cfg)
    state = {}
    for name, t in model.state_dict().items():
        layer, sep, rest = name.partition(".attn.modes.")
        if not sep:
            state[name] = t
        elif rest.startswith(modes[int(layer.split(".")[1])] + "."):
            state[f"{layer}.attn.{rest.partition('.')[2]}"] = t
    twin.load_state_dict(state)
    return twin


def test_modes_share_the_backbone_and_equal_their_fixed_layers() -> None:
    """Each mode's output (and aux loss, in training) equals its type's own layer with the same weights; weights of
    equal name and shape are one parameter."""
    model = _elastic_model()
    attn: ElasticAttention = model.layers[0].attn
    m = attn.modes
    assert m.window.wq_a.weight is m.hca.wq_a.weight is m.csa.wq_a.weight and m.csa1.indexer.wq_b.weight is \
        m.csa.indexer.wq_b.weight and m.hca.compressor.wkv.weight is not m.csa.compressor.wkv.weight
    unique = {id(p) for p in attn.parameters()}
    assert len(unique) == len(list(attn.parameters()))
    x = torch.randn(2, 21, 48)
    for mode, spec in attn.spec.mode_specs().items():
        fixed = spec.build(model.cfg, 0)
        fixed.load_state_dict(m[mode].state_dict())
        for training in (False, True):
            attn.train(training), fixed.train(training)
            attn.training_mode = mode
            attn.set_mode(mode)
            (out, aux), (ref, ref_aux) = attn(x), fixed(x)
            assert torch.equal(out, ref) and torch.equal(aux, ref_aux), (mode, training)


@pytest.mark.parametrize("mode", MODES)
def test_prefill_plus_decode_equals_full_forward_in_each_mode(mode: str) -> None:
    model = _elastic_model()
    for layer in model.layers:
        layer.attn.set_mode(mode)
    ids = torch.randint(0, 64, (2, 29))
    with torch.no_grad():
        full = model(ids).logits
    assert_close_scaled(cached_logits(model, ids, [22] + [1] * 7), full, 16, f"cached logits in mode {mode}")
    twin = _fixed_twin(model, [mode] * 3)
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, full)


def test_generate_fits_each_calls_budget_and_switches_modes_between_calls() -> None:
    """The controller picks the least-cost modes (list order) whose cache fits; the cache holds and reports the
    chosen modes' bytes (kv_accounting's count); tokens equal a fixed model of those modes; calls can alternate."""
    model = _elastic_model(layers=3)
    prompt = torch.randint(0, 64, (1, 9))
    new = 12
    tokens = prompt.shape[1] + new
    twins = {m: _fixed_twin(model, [m] * 3) for m in ("csa", "hca", "window")}
    fixed_bytes = {m: sum(lk.total for lk in layer_kv_bytes(twin.cfg, tokens, "fp32")) for m, twin in twins.items()}
    budgets = {"csa": fixed_bytes["csa"], "hca": fixed_bytes["hca"], "window": fixed_bytes["window"]}
    assert fixed_bytes["window"] < fixed_bytes["hca"] < fixed_bytes["csa"]
    outs = {}
    for mode in ("csa", "window", "hca", "csa"):
        out = model.generate(prompt, new, kv_budget=budgets[mode])
        assert [layer.attn.inference_mode for layer in model.layers] == [mode] * 3
        assert model.decode_kv_bytes <= budgets[mode]
        assert torch.equal(out, twins[mode].generate(prompt, new))
        outs.setdefault(mode, out)
        assert torch.equal(out, outs[mode])
    budget = fixed_bytes["window"] + (fixed_bytes["csa"] - fixed_bytes["window"]) / 3  # one layer's upgrade
    model.generate(prompt, new, kv_budget=budget)
    assert sorted(layer.attn.inference_mode for layer in model.layers) == ["csa", "window", "window"]
    model.generate(prompt, new)  # no budget: every layer back to its eval_mode
    assert [layer.attn.inference_mode for layer in model.layers] == ["csa"] * 3
    with pytest.raises(ConfigError, match="cannot be met"):
        model.generate(prompt, new, kv_budget=fixed_bytes["window"] - 1)


def test_training_draws_are_seeded_per_step_and_layer_and_logged() -> None:
    cfg = load_config("tiny", ["model.layer_types=[el,el,swa,el]",
                               "model.attention.menu.el={kind: elastic, modes: {csa: {kind: csa, ratio: 4}, "
                               "hca: {kind: hca, ratio: 16}, window: {kind: swa}}, mode_weights: {csa: 3, hca: 1, "
                               "window: 0}}"]).model
    a, b = Transformer(cfg), Transformer(cfg)
    layers = [0, 1, 3]

    def schedule(model: Transformer, seed: int) -> list[list[str]]:
        out = []
        for step in range(40):
            draw_modes(model, step, seed)
            out.append([model.layers[i].attn.training_mode for i in layers])
        return out

    drawn = schedule(a, 7)
    assert drawn == schedule(b, 7) and drawn != schedule(b, 8)
    flat = [m for row in drawn for m in row]
    assert "window" not in flat and 0.6 < flat.count("csa") / len(flat) < 0.9  # odds 3:1:0
    assert len({tuple(row) for row in drawn}) > 1 and any(len(set(row)) > 1 for row in drawn)  # per layer, per step
    shares = mode_shares(a)
    assert set(shares) == set(layers) and all(abs(sum(s.values()) - 1) < 1e-12 for s in shares.values())
    assert shares[0]["mode/csa"] == [row[0] for row in drawn].count("csa") / 40
    assert all(not s for s in mode_shares(a).values())  # counts restart after each log


def test_the_planner_offers_an_elastic_layers_modes() -> None:
    """Choices are the modes; calibration runs each mode in place: its cost is the twin model's loss increase."""
    cfg = _cfg(["elastic", "swa"])
    choices = layer_choices(cfg, 2**16, 32)
    torch.manual_seed(0)
    model = Transformer(cfg)
    batches = [torch.randint(0, 64, (2, 25))]
    base, costs = calibration_costs(cfg, model.state_dict(), batches, choices)
    hca = [c.entry for c in choices[0]].index("hca")
    assert costs[0][hca] == pytest.approx(mean_loss(_fixed_twin(model, ["hca", "swa"]), batches) - base, abs=1e-9)
    assert [c.entry for c in choices[0]] == ["window", "hca", "csa1", "csa"] and choices[0][3].current
    chosen = plan(choices, [[3.0, 1.0, 0.5, 0.0], [0.0]], choices[0][1].kv_bytes + choices[1][0].kv_bytes)
    assert [c.entry for c in chosen.choices] == ["hca", "swa"]
    assert planned_model(cfg, chosen).layer_types == ["hca", "swa"]  # the menu's "hca" is the same entry
    menu = {**cfg.attention.menu, "hca": dataclasses.replace(cfg.attention.menu["hca"], ratio=4)}
    other = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, menu=menu))
    planned = planned_model(other, chosen)  # a menu entry "hca" that differs from the mode: a new name
    assert planned.layer_types == ["hca_planned", "swa"]
    assert layer_specs(planned)[0] == choices[0][1].spec and layer_specs(planned)[1] == layer_specs(cfg)[1]


@pytest.mark.parametrize("entry, message", [
    ("{kind: elastic}", "model.attention.menu.el.modes must name at least one mode"),
    ("{kind: elastic, modes: {a: {kind: swa}}, eval_mode: b}", "menu.el.eval_mode='b' is not a mode (a)"),
    ("{kind: elastic, modes: {a: {kind: swa}}, mode_weights: {b: 1}}", "menu.el.mode_weights.b is not a mode"),
    ("{kind: elastic, modes: {a: {kind: swa, window: 0}}}", "model.attention.menu.el.modes.a.window=0 must be > 0"),
    ("{kind: elastic, modes: {a: {kind: mamba}}}", "model.attention.menu.el.modes.a.kind='mamba' is not an attention"),
])
def test_bad_elastic_entries_are_one_line(entry: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", ["model.layer_types=[el,swa,swa,swa]", f"model.attention.menu.el={entry}"])
