"""Parity with transformers' LagunaForCausalLM (5.14) through moesaic's conversion (MOSAIC_SPEC §2, §8).

Both directions on random tiny configs (fp32, CPU, eager attention), as tests/test_hf_families.py does for the
other families: per-layer query heads over one KV shape, full and sliding layers with their own RoPE (partial,
YaRN with its attention factor), per-head and per-element gates, the soft-capped sigmoid router with its
selection bias, routed scaling and a shared expert of its own width, dense layers anywhere. Logits agree
within 64 fp32 eps of the largest |logit| (Qwen3-MoE's bound; the max differences are printed). Every weight
is random, the norms and the selection bias included (transformers starts them at 1 and 0), so no mapping
error hides behind an identity value.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from moesaic.configs import ConfigError, load_config
from moesaic.launch.cli import main as cli
from moesaic.model import Transformer
from moesaic.model.interop import (check_same_architecture, export_hf, from_hf_config, load_hf_into,
                                   load_native, save_native, to_hf_config)

from test_hf_families import (VOCAB, Case, assert_same_logits, check_export, check_greedy, check_import, edited,
                              hf_model, load_transformers, moesaic_cfg, randomised)

pytestmark = pytest.mark.numerics

FULL, SLIDING = "full_attention", "sliding_attention"
YARN = {"rope_type": "yarn", "rope_theta": 500000.0, "partial_rotary_factor": 0.5, "factor": 4.0,
        "original_max_position_embeddings": 8, "beta_fast": 32.0, "beta_slow": 1.0}
# MOSAIC_SPEC §8.2's tiny Laguna, then variations
LAGUNA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
              num_key_value_heads=2, head_dim=16, num_attention_heads_per_layer=[6, 8, 8, 6],
              layer_types=[FULL, SLIDING, SLIDING, FULL], sliding_window=4,
              mlp_layer_types=["dense", "sparse", "sparse", "sparse"], num_experts=8, num_experts_per_tok=2,
              moe_intermediate_size=24, shared_expert_intermediate_size=24, gating=True, moe_routed_scaling_factor=2.5,
              moe_router_logit_softcapping=10.0, max_position_embeddings=256,
              rope_parameters={FULL: YARN, SLIDING: {"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": 1.0}})


def laguna(**kwargs: Any) -> Case:
    return Case(transformers.LagunaConfig, transformers.LagunaForCausalLM, {**LAGUNA, **kwargs}, 64)


CASES = {
    "laguna: 6/8/8/6 heads, YaRN full layers, per-head gate, dense layer 0": laguna(),
    "laguna: per-element gate, all full, 4/8/4 heads, dense middle, capped router": laguna(
        num_hidden_layers=3, num_attention_heads=4, num_attention_heads_per_layer=[4, 8, 4], layer_types=[FULL] * 3,
        mlp_layer_types=["sparse", "dense", "sparse"], gating="per-element", moe_router_logit_softcapping=0.5,
        shared_expert_intermediate_size=40, rope_parameters={FULL: {**YARN, "attention_factor": 1.3,
                                                                    "partial_rotary_factor": 0.25}}),
    "laguna: sliding YaRN, tied, wider shared expert, no softcap": laguna(
        num_attention_heads_per_layer=[2, 4, 6, 2], layer_types=[SLIDING, SLIDING, FULL, SLIDING],
        sliding_window=6, tie_word_embeddings=True, moe_router_logit_softcapping=0.0, moe_routed_scaling_factor=1.0,
        shared_expert_intermediate_size=48, gating="per-head",
        rope_parameters={SLIDING: {**YARN, "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "factor": 2.0},
                         FULL: {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}}),
}


def laguna_hf(case: Case) -> torch.nn.Module:
    return randomised(hf_model(case), 5)


def laguna_moesaic(case: Case) -> Transformer:
    torch.manual_seed(0)
    return randomised(Transformer(moesaic_cfg(case)).eval(), 0)


@pytest.mark.parametrize("name", CASES)
def test_transformers_laguna_loads_in_moesaic_with_equal_logits(name: str, tmp_path: Path) -> None:
    # save_pretrained's layout (per-expert matrices, mlp.experts.e_score_correction_bias, mlp.shared_expert.) and
    # the module's names (fused experts, mlp.gate.e_score_correction_bias, mlp.shared_experts.)
    for model in check_import(CASES[name], name, laguna_hf(CASES[name]), tmp_path):
        assert model.layers[-1].ffn.gate.expert_bias.abs().min() > 0  # the bias arrived


@pytest.mark.parametrize("name", CASES)
def test_moesaic_laguna_loads_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    check_export(CASES[name], name, laguna_moesaic(CASES[name]), tmp_path)


def test_laguna_greedy_decoding_matches_transformers(tmp_path: Path) -> None:
    """Prefill + cached decode past the sliding window picks transformers' greedy tokens."""
    check_greedy(laguna_hf(CASES["laguna: 6/8/8/6 heads, YaRN full layers, per-head gate, dense layer 0"]), tmp_path)


def test_laguna_cli_convert_and_init_from_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """native -> transformers -> native is bit-identical; init_from fills a built model with the same weights and
    names a field that disagrees with the checkpoint."""
    case = CASES["laguna: per-element gate, all full, 4/8/4 heads, dense middle, capped router"]
    model = laguna_moesaic(case)
    save_native(model, tmp_path / "native")
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "native -> transformers (Laguna)" in out and "transformers -> native (Laguna)" in out
    target = Transformer(moesaic_cfg(case))
    load_hf_into(target, tmp_path / "hf")
    for other in (load_native(tmp_path / "back"), target):
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))
    for change, message in [(lambda c: c.attention.menu["full_h8"].update(num_heads=4), "menu.full_h8.num_heads=4"),
                            (lambda c: setattr(c.moe, "shared_intermediate_size", 24),
                             "model.moe.shared_intermediate_size=24"),
                            (lambda c: setattr(c.moe, "router_logit_softcap", 0.0), "model.moe.router_logit_softcap")]:
        other = moesaic_cfg(case)
        change(other)
        with pytest.raises(ConfigError, match=message):
            load_hf_into(Transformer(other), tmp_path / "hf")


def test_laguna_export_names_what_transformers_cannot_express() -> None:
    case = CASES["laguna: 6/8/8/6 heads, YaRN full layers, per-head gate, dense layer 0"]
    cfg = moesaic_cfg(case)
    assert to_hf_config(cfg)["architectures"] == ["LagunaForCausalLM"]
    assert sorted(cfg.attention.menu) == ["full", "sliding"]
    for change, message in [
        (lambda c: c.attention.menu["sliding"].update(gate="element"),
         "model.attention.menu.sliding.gate='element' \\(layer 1\\): Laguna has one gate for every layer"),
        (lambda c: c.attention.menu["sliding"].update(num_kv_heads=4), "menu.sliding.num_kv_heads=4"),
        (lambda c: c.attention.menu.update(wide={**c.attention.menu["sliding"], "window": 8}) or
         setattr(c, "layer_types", ["full", "sliding", "wide", "full"]), "disagree on window"),
        (lambda c: c.attention.menu["full"].update(gate="none"), "menu.full.gate='none' \\(layer 0\\)"),
        (lambda c: setattr(c.moe, "score_func", "softmax"), "model.moe.score_func='softmax'"),
        (lambda c: setattr(c.moe, "num_shared_experts", 0), "model.moe.num_shared_experts=0"),
    ]:
        other = copy.deepcopy(cfg)
        change(other)
        with pytest.raises(ConfigError, match=message):
            to_hf_config(other)


def test_unsupported_laguna_configs_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "laguna"
    laguna_hf(CASES["laguna: 6/8/8/6 heads, YaRN full layers, per-head gate, dense layer 0"]).save_pretrained(src)
    longrope = {FULL: {"rope_type": "longrope", "rope_theta": 1e4}, SLIDING: {"rope_type": "default"}}
    cases = [(edited(src, tmp_path / "heads", num_attention_heads_per_layer=[6, 8, 8, 5]), "entry 5 is not a multiple"),
             (edited(src, tmp_path / "rope", rope_parameters=longrope), "rope_type='longrope' is not supported"),
             (edited(src, tmp_path / "gating", gating="sigmoid"), "gating='sigmoid' is not supported"),
             (edited(src, tmp_path / "truncate", rope_parameters={**LAGUNA["rope_parameters"], "truncate": False}),
              "rope_parameters.truncate=false is not supported"),
             (edited(src, tmp_path / "flat", rope_parameters=YARN), "one entry per layer type")]
    capsys.readouterr()
    for path, message in cases:
        assert cli(["convert", str(path), str(tmp_path / "out" / path.name)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("preset", ["laguna_tiny", "laguna_xs2"])
def test_laguna_presets_are_laguna_and_round_trip_through_config_json(preset: str) -> None:
    cfg = load_config(preset).model
    hf = to_hf_config(cfg)
    assert hf["architectures"] == ["LagunaForCausalLM"]
    assert sorted(set(hf["num_attention_heads_per_layer"])) == ([6, 8] if preset == "laguna_tiny" else [48, 64])
    check_same_architecture(cfg, from_hf_config(hf), f"{preset} via config.json")


def test_laguna_tiny_preset_exports_to_transformers_with_equal_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomised(Transformer(load_config("laguna_tiny").model).eval(), 3)
    save_native(model, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf")
    hf = load_transformers(laguna(), tmp_path / "hf")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 80), generator=torch.Generator().manual_seed(2))  # > YaRN 64
    with torch.no_grad():
        assert_same_logits(laguna(), model(tokens).logits, hf(tokens).logits, "laguna_tiny: moesaic -> transformers")
