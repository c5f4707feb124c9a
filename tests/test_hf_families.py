"""Parity with transformers' Qwen3MoeForCausalLM and Gemma4ForCausalLM (5.14) through moesaic's conversion.

Both directions on random tiny configs (fp32, CPU, eager attention): transformers -> import -> moesaic
logits equal transformers', and moesaic -> export -> ``from_pretrained`` (nothing missing or
unexpected) -> logits equal moesaic's. "Equal" is within 64 fp32 eps of the largest |logit| (two
implementations of a whole model; the max differences are printed). Every weight is random, the
vectors transformers initialises to 1 or 0 (norms, router scales) and Gemma's ``layer_scalar``
buffer included (MOSAIC_SPEC §8.3), so no mapping error hides behind an identity value.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import transformers
from safetensors.torch import save_file

from moesaic.configs import ConfigError
from moesaic.launch.cli import main as cli
from moesaic.model import Transformer
from moesaic.model.interop import (ConversionError, export_hf, from_hf_config, import_hf, load_hf_into, load_native,
                                   save_native, to_hf_config)

from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

VOCAB, SEQ = 128, 24


@dataclasses.dataclass
class Case:
    config: Callable[..., Any]  # transformers config class
    model: Callable[..., Any]  # transformers model class
    kwargs: dict[str, Any]


QWEN = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, moe_intermediate_size=24, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256)
GEMMA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=4,
             layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                          "sliding_attention", "full_attention"], max_position_embeddings=256,
             rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                              "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                 "rope_theta": 1000000.0}},
             vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8, pad_token_id=0, bos_token_id=2,
             eos_token_id=1)
GEMMA_MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=24)


def qwen(**kwargs: Any) -> Case:
    return Case(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, {**QWEN, **kwargs})


def gemma(**kwargs: Any) -> Case:
    return Case(transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM, {**GEMMA, **kwargs})


CASES = {
    "qwen3: norm_topk_prob, dense layer 1": qwen(norm_topk_prob=True, mlp_only_layers=[1]),
    "qwen3: unnormalised top-k, sliding, tied": qwen(norm_topk_prob=False, use_sliding_window=True, sliding_window=6,
                                                     tie_word_embeddings=True),
    "qwen3: decoder_sparse_step 2, theta 1e6": qwen(decoder_sparse_step=2,
                                                    rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "gemma4: k_eq_v, 3 shared, double-wide, MoE, softcap": gemma(
        attention_k_eq_v=True, num_global_key_value_heads=1, num_kv_shared_layers=3, use_double_wide_mlp=True,
        final_logit_softcapping=30.0, **GEMMA_MOE),
    "gemma4: k/v full layers, 2 shared, untied, no PLE": gemma(
        num_kv_shared_layers=2, hidden_size_per_layer_input=0, tie_word_embeddings=False, **GEMMA_MOE),
    "gemma4: dense, no sharing, softcap": gemma(final_logit_softcapping=10.0),
}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int) -> None:
    """Matrices ~ N(0, 0.05); every vector and Gemma's layer_scalar ~ U(0.5, 1.5); moesaic's expert_bias stays 0
    (neither family has one)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith("expert_bias"):
            continue
        if t.dim() >= 2:
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
        else:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_config(case: Case) -> Any:
    config = case.config(**case.kwargs)
    config._attn_implementation = "eager"
    return config


def hf_model(case: Case, seed: int = 5) -> torch.nn.Module:
    torch.manual_seed(0)
    model = case.model(hf_config(case)).float().eval()
    randomise(model, seed)
    return model


def load_transformers(case: Case, path: Path) -> torch.nn.Module:
    model, info = case.model.from_pretrained(path, output_loading_info=True, attn_implementation="eager")
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or randomly initialised
    return model.float().eval()


def moesaic_cfg(case: Case):
    return from_hf_config(hf_config(case).to_dict())


def moesaic_model(case: Case, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(moesaic_cfg(case)).eval()
    randomise(model, seed)
    return model


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    print(f"{what}: max |logit diff| {(ours - theirs).abs().max():.2e} (logits up to {theirs.abs().max():.2f})")
    assert_close_scaled(ours, theirs, 64, what)


@pytest.mark.parametrize("name", CASES)
def test_transformers_weights_load_in_moesaic_with_equal_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    hf = hf_model(case)
    with torch.no_grad():
        theirs = hf(ids()).logits
    # 1) what save_pretrained writes (Qwen3: one matrix per expert; Gemma: fused experts, no shared-layer K/V)
    hf.save_pretrained(tmp_path / "saved")
    import_hf(tmp_path / "saved", tmp_path / "native_a")
    # 2) the module's state dict as is (fused experts; Gemma's tied lm_head.weight included)
    (tmp_path / "raw").mkdir()
    shutil.copy(tmp_path / "saved" / "config.json", tmp_path / "raw" / "config.json")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "raw" / "model.safetensors"))
    import_hf(tmp_path / "raw", tmp_path / "native_b")
    for native in ("native_a", "native_b"):
        with torch.no_grad():
            ours = load_native(tmp_path / native).eval()(ids()).logits
        assert_same_logits(ours, theirs, f"{name}: transformers -> moesaic ({native})")


@pytest.mark.parametrize("name", CASES)
def test_moesaic_weights_load_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    model = moesaic_model(case)
    save_native(model, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf", max_shard_bytes=200_000)  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = load_transformers(case, tmp_path / "hf")
    with torch.no_grad():
        ours, theirs = model(ids()).logits, hf(ids()).logits
    assert_same_logits(ours, theirs, f"{name}: moesaic -> transformers")
