"""Parity with transformers' DeepseekV32ForCausalLM (dsa) and DeepseekV3ForCausalLM (mla), 5.14, through moesaic's
conversion, both directions, on random tiny configs (fp32, CPU, eager: transformers' sdpa path leaks future keys
for DSA, MOSAIC_SPEC §4.9). Every weight is random, the 1/0-initialised ones (norms, the indexer's LayerNorm
bias, ``e_score_correction_bias``) included; the index top-k (4) is below the 24 tokens, with 16 index heads
so that no two scores tie. Logits agree within 64 fp32 eps of the largest |logit| (printed differences)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from moesaic.configs import ConfigError
from moesaic.launch.cli import main as cli
from moesaic.model import Transformer
from moesaic.model.interop import from_hf_config, load_hf_into, load_native

from test_hf_families import (VOCAB, Case, assert_same_logits, check_export, check_greedy, check_import, hf_config, ids,
                              load_transformers, randomised)

pytestmark = pytest.mark.numerics

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
              routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16,
              qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, norm_topk_prob=True,
              first_k_dense_replace=1, max_position_embeddings=256)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
INDEX = dict(index_topk=4, index_head_dim=16, index_n_heads=16)


def v32(**kwargs: Any) -> Case:
    return Case(transformers.DeepseekV32Config, transformers.DeepseekV32ForCausalLM,
                {**COMMON, **INDEX, "rope_parameters": YARN, **kwargs}, 64)


def glm(**kwargs: Any) -> Case:
    return Case(transformers.GlmMoeDsaConfig, transformers.GlmMoeDsaForCausalLM,
                {**COMMON, **INDEX, "rope_parameters": YARN, "rms_norm_eps": 1e-5, **kwargs}, 64)


def v3(**kwargs: Any) -> Case:
    return Case(transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM, {**COMMON, **kwargs}, 64)


CASES = {
    "v32: yarn mscale, 2 groups, dense layer 0": v32(),
    "v32: 4 groups pick 2, MoE layers 0 and 2, tied, default rope": v32(
        n_group=4, topk_group=2, num_experts_per_tok=3, mlp_layer_types=["sparse", "dense", "sparse"],
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 5000.0}),
    "glm: interleaved index rope, layers 1, 2 reuse layer 0's picks, eps 1e-5": glm(
        indexer_types=["full", "shared", "shared"], n_group=1, topk_group=1),
    "v3: yarn without mscale keys (attention factor), no groups": v3(
        n_group=1, topk_group=1, rope_parameters={k: v for k, v in YARN.items() if "mscale" not in k}),
    "v3: no query latent, default rope, 2 dense layers": v3(q_lora_rank=None, first_k_dense_replace=2),
}


def hf_model(case: Case) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomised(case.model(hf_config(case)).float().eval(), 5)


@pytest.mark.parametrize("name", CASES)
def test_transformers_weights_load_in_moesaic_with_equal_logits(name: str, tmp_path: Path) -> None:
    check_import(CASES[name], name, hf_model(CASES[name]), tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_moesaic_weights_load_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Transformer(from_hf_config(hf_config(CASES[name]).to_dict())).eval()
    check_export(CASES[name], name, randomised(model, 3), tmp_path)


def test_greedy_decoding_matches_transformers(tmp_path: Path) -> None:
    """Prefill + cached decode (the latent cache, indexer keys included) picks transformers' greedy tokens."""
    check_greedy(hf_model(CASES["v32: yarn mscale, 2 groups, dense layer 0"]), tmp_path)


def test_init_from_and_convert_cli_and_config_traps(tmp_path: Path) -> None:
    case = CASES["v32: yarn mscale, 2 groups, dense layer 0"]
    hf_model(case).save_pretrained(tmp_path / "hf")
    cfg = from_hf_config(hf_config(case).to_dict())
    target = Transformer(cfg).eval()
    load_hf_into(target, tmp_path / "hf")
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "native")]) == 0
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    back = load_transformers(case, tmp_path / "back")
    with torch.no_grad():
        ours = target(ids()).logits
        torch.testing.assert_close(load_native(tmp_path / "native").eval()(ids()).logits, ours, rtol=0, atol=0)
        assert_same_logits(case, ours, back(ids()).logits, "init_from vs transformers after convert both ways")
    other = from_hf_config(hf_config(case).to_dict())
    other.attention.menu["dsa"]["index_topk"] = 8
    with pytest.raises(ConfigError, match="model.attention.menu.dsa.index_topk=8"):
        load_hf_into(Transformer(other), tmp_path / "hf")
    bad = hf_config(case).to_dict()
    for change, message in [({"q_lora_rank": None}, "q_lora_rank is missing"),
                            ({"rope_interleave": False}, "rope_interleave=False is not supported"),
                            ({"num_key_value_heads": 2}, "num_key_value_heads=2 must equal num_attention_heads")]:
        with pytest.raises(ConfigError, match=message):
            from_hf_config({**bad, **change})
    with pytest.raises(ConfigError, match="model.moe.n_group=3 must split"):
        from moesaic.configs import Config, validate
        cfg.moe.n_group = 3
        validate(Config(model=cfg))


@pytest.mark.parametrize("preset", ["deepseek_v32", "deepseek_v32_tiny"])
def test_presets_are_v32_and_round_trip_through_config_json(preset: str, capsys: pytest.CaptureFixture) -> None:
    from moesaic.configs import load_config
    from moesaic.model.interop import check_same_architecture, to_hf_config

    cfg = load_config(preset).model
    hf = to_hf_config(cfg)
    assert hf["architectures"] == ["DeepseekV32ForCausalLM"]
    check_same_architecture(cfg, from_hf_config(hf), f"{preset} via config.json")
    if preset == "deepseek_v32":  # V3.2's 1408 B per token and layer in bf16 (MOSAIC_SPEC §9), 61 layers
        assert cli(["kv-report", preset, "--context", "128k"]) == 0
        report = capsys.readouterr().out
        assert f"({61 * 1408:,}.0 B/token)" in report and "vs DeepSeek-V3.2 in bf16 (10.484 GiB): 1.00x" in report
