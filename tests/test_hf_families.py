"""Parity with transformers' Qwen3MoeForCausalLM, Gemma4ForCausalLM and ZayaForCausalLM (5.14) through moesaic's
conversion.

Both directions on random tiny configs (fp32, CPU, eager attention): transformers -> import -> moesaic
logits equal transformers', and moesaic -> export -> ``from_pretrained`` (nothing missing or
unexpected) -> logits equal moesaic's. "Equal" is within ``Case.rtol_eps`` fp32 eps of the largest |logit|
(max differences printed; observed: Qwen3-MoE <= 6 eps, 7e-7 absolute; Gemma 4 <= 102 eps, 2.1e-5 absolute;
ZAYA1 <= 3 eps, 3.6e-7 absolute).
Qwen3-MoE and ZAYA1 get 64 eps, Gemma 4 256: its scale-1 attention over normed q and k (logits up to
head_dim x norm weight^2) and its softcap amplify rounding, so moesaic's fp32 logits alone differ from
its own fp64 forward by 75-120 eps here; an fp64 cross-check cannot go lower, as transformers keeps
Gemma's norms, RoPE and softmax in fp32 (it agrees to 6e-6 there). Every weight is random, the
vectors transformers initialises to 1 or 0 (norms, router scales, ZAYA's residual scales and key temperature)
and the buffers Gemma's ``layer_scalar`` and ZAYA's ``balancing_biases`` included (MOSAIC_SPEC §8.3), so no mapping
error hides behind an identity value.
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

from hf_checkpoints import import_both_layouts
from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

VOCAB, SEQ = 128, 24


@dataclasses.dataclass
class Case:
    config: Callable[..., Any]  # transformers config class
    model: Callable[..., Any]  # transformers model class
    kwargs: dict[str, Any]
    rtol_eps: float  # logits tolerance, in fp32 eps of the largest |logit| (module doc)


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
ZAYA = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=1, router_hidden_size=16,
            max_position_embeddings=256)


def qwen(**kwargs: Any) -> Case:
    return Case(transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, {**QWEN, **kwargs}, 64)


def gemma(**kwargs: Any) -> Case:
    return Case(transformers.Gemma4TextConfig, transformers.Gemma4ForCausalLM, {**GEMMA, **kwargs}, 256)


def zaya(**kwargs: Any) -> Case:
    return Case(transformers.ZayaConfig, transformers.ZayaForCausalLM, {**ZAYA, **kwargs}, 64)


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
    "zaya: hybrid + sliding, router state, skip expert": zaya(layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                                                              sliding_window=4),
    "zaya: 3+3 conv taps, one KV head, untied": zaya(cca_time0=3, cca_time1=3, num_key_value_heads=1,
                                                     tie_word_embeddings=False),
    "zaya: all sliding, 8 heads, own RoPE": zaya(
        num_attention_heads=8, head_dim=8, layer_types=["hybrid_sliding"] * 3, sliding_window=5,
        rope_parameters={"hybrid": {"rope_type": "default", "rope_theta": 1e5, "partial_rotary_factor": 0.5},
                         "hybrid_sliding": {"rope_type": "default", "rope_theta": 500.0,
                                            "partial_rotary_factor": 1.0}}),
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


@torch.no_grad()
def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``randomise``, then selection biases ~ U(-0.2, 0.2) (transformers' Parameter, moesaic's buffer): comparable
    to the sigmoid scores they steer, so they change which experts win."""
    randomise(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    for name, t in model.state_dict(keep_vars=True).items():
        if name.endswith(("e_score_correction_bias", "expert_bias")):
            t.copy_(torch.rand(t.shape, generator=g) * 0.4 - 0.2)
    return model


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
    if case.config is transformers.ZayaConfig:  # layer 0 routes every token to the skip expert (gate 0), the
        with torch.no_grad():  # others none: both paths (the biases are U(0.5, 1.5), probabilities at most 1)
            model.model.layers[0].mlp.gate.balancing_biases[-1] = 3.0
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


def assert_same_logits(case: Case, ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    print(f"{what}: max |logit diff| {(ours - theirs).abs().max():.2e} (logits up to {theirs.abs().max():.2f})")
    assert_close_scaled(ours, theirs, case.rtol_eps, what)


def check_import(case: Case, name: str, hf: torch.nn.Module, tmp_path: Path) -> list[Transformer]:
    """Both layouts of ``hf`` imported give its logits; the imported models."""
    with torch.no_grad():
        theirs = hf(ids()).logits
    models = []
    for native in import_both_layouts(hf, tmp_path):
        models.append(load_native(native).eval())
        with torch.no_grad():
            ours = models[-1](ids()).logits
        assert_same_logits(case, ours, theirs, f"{name}: transformers -> moesaic ({native.name})")
    return models


def check_export(case: Case, name: str, model: Transformer, tmp_path: Path) -> None:
    """``model`` exported (several shards + index) loads in transformers with its logits."""
    with torch.no_grad():  # transformers 5.14's from_pretrained re-runs ZAYA's in-place init of the skip class's
        for key, t in model.state_dict(keep_vars=True).items():  # bias after loading: it keeps -1, not the file's
            if key.endswith("balancing_biases"):
                t[-1] = -1.0
    save_native(model, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf", max_shard_bytes=200_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = load_transformers(case, tmp_path / "hf")
    with torch.no_grad():
        ours, theirs = model(ids()).logits, hf(ids()).logits
    assert_same_logits(case, ours, theirs, f"{name}: moesaic -> transformers")


@pytest.mark.parametrize("name", CASES)
def test_transformers_weights_load_in_moesaic_with_equal_logits(name: str, tmp_path: Path) -> None:
    # save_pretrained's layout (Qwen3: one matrix per expert; Gemma: fused experts, no shared-layer K/V) and the
    # module's state dict as is (fused experts; Gemma's tied lm_head.weight included)
    check_import(CASES[name], name, hf_model(CASES[name]), tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_moesaic_weights_load_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    check_export(CASES[name], name, moesaic_model(CASES[name]), tmp_path)


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith(("qwen3: norm", "gemma4: k_eq_v", "zaya: hybrid"))])
def test_greedy_decoding_matches_transformers(name: str, tmp_path: Path) -> None:
    """Prefill + cached decode (moesaic's caches; Gemma's shared layers read their source's) picks transformers'
    greedy tokens."""
    check_greedy(hf_model(CASES[name]), tmp_path)


def check_greedy(hf: torch.nn.Module, tmp_path: Path) -> None:
    """8 greedy tokens after a 10-token prompt: moesaic's import of ``hf`` generates ``hf``'s."""
    hf.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "native")
    prompt = ids()[:, :10]
    with torch.no_grad():
        ours = load_native(tmp_path / "native").eval().generate(prompt, max_new_tokens=8)
        theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert torch.equal(ours, theirs), (ours, theirs)


def test_init_from_fills_a_built_model_and_names_a_disagreeing_field(tmp_path: Path) -> None:
    case = CASES["qwen3: norm_topk_prob, dense layer 1"]
    hf_model(case).save_pretrained(tmp_path / "hf")
    cfg = moesaic_cfg(case)
    target = Transformer(cfg).eval()
    load_hf_into(target, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "native")
    with torch.no_grad():
        assert torch.equal(target(ids()).logits, load_native(tmp_path / "native").eval()(ids()).logits)
    for change, message in [(lambda c: setattr(c.moe, "norm_topk_prob", False), "model.moe.norm_topk_prob=False"),
                            (lambda c: setattr(c, "ffn_types", ["moe"] * 3), "model.ffn_types"),
                            (lambda c: c.attention.menu["gqa"].update(window=8), "model.attention.menu.gqa.window=8")]:
        other = moesaic_cfg(case)
        change(other)
        with pytest.raises(ConfigError, match=message):
            load_hf_into(Transformer(other), tmp_path / "hf")


def test_zaya_init_from_fills_a_model_that_resets_at_documents(tmp_path: Path) -> None:
    """A ZAYA1 checkpoint fills a model whose cca entries restart at document starts (doc_reset is not part of the
    architecture); on one document it reproduces transformers' logits, and a different conv_kernel is refused."""
    case = CASES["zaya: hybrid + sliding, router state, skip expert"]
    hf = hf_model(case)
    hf.save_pretrained(tmp_path / "hf")
    cfg = moesaic_cfg(case)
    for entry in cfg.attention.menu.values():
        entry.update(doc_reset=True)
    target = Transformer(cfg).eval()
    load_hf_into(target, tmp_path / "hf")
    target.doc_end_token = 0  # ids() draws from 3..VOCAB: one document
    with torch.no_grad():
        assert_same_logits(case, target(ids()).logits, hf(ids()).logits, "zaya init_from")
    other = moesaic_cfg(case)
    other.attention.menu["cca"].update(conv_kernel=3)
    with pytest.raises(ConfigError, match="model.attention.menu.cca.conv_kernel=3"):
        load_hf_into(Transformer(other), tmp_path / "hf")


def edited(src: Path, dst: Path, text_config: bool = False, **changes: Any) -> Path:
    """A copy of a checkpoint with config.json keys changed (None: removed)."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    target = config["text_config"] if text_config else config
    for key, value in changes.items():
        target.pop(key) if value is None else target.__setitem__(key, value)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_unsupported_configs_fail_in_one_line_and_write_nothing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    qwen_dir = tmp_path / "qwen"
    hf_model(CASES["qwen3: norm_topk_prob, dense layer 1"]).save_pretrained(qwen_dir)
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 64}
    cases = [
        (edited(qwen_dir, tmp_path / "bias", attention_bias=True), "attention_bias=True"),
        (edited(qwen_dir, tmp_path / "yarn", rope_parameters=yarn), "rope_type 'yarn'"),
        (edited(qwen_dir, tmp_path / "act", hidden_act="gelu"), "hidden_act='gelu'"),
        (edited(qwen_dir, tmp_path / "llama", model_type="llama"), "model_type='llama'"),
    ]
    capsys.readouterr()  # save_pretrained's progress bar
    for src, message in cases:
        dst = tmp_path / "out" / src.name
        assert cli(["convert", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("moesaic: error:") and message in err, err
        assert not (tmp_path / "out").exists()  # not even a parent or a partial directory


def test_export_picks_the_family_or_names_the_field_that_stops_it(tmp_path: Path) -> None:
    case = CASES["qwen3: norm_topk_prob, dense layer 1"]
    assert to_hf_config(moesaic_cfg(case))["architectures"] == ["Qwen3MoeForCausalLM"]
    for change, message in [(lambda c: setattr(c.moe, "num_shared_experts", 1), "model.moe.num_shared_experts=1"),
                            (lambda c: setattr(c.moe, "score_func", "sigmoid"), "model.moe.score_func='sigmoid'"),
                            (lambda c: c.attention.menu["gqa"].update(rope_fraction=0.5),
                             "model.attention.menu.gqa.rope_fraction=0.5"),
                            (lambda c: c.attention.menu.update(wide={**c.attention.menu["gqa"], "window": 8}) or
                             setattr(c, "layer_types", ["gqa", "wide", "gqa"]),
                             "menu.wide and model.attention.menu.gqa disagree on window"),
                            (lambda c: c.attention.menu.update(swa={"kind": "swa"}) or
                             setattr(c, "layer_types", ["gqa", "swa", "gqa"]),
                             "model.attention.menu.swa.kind='swa' \\(layer 1\\): Qwen3-MoE layers are all gqa")]:
        cfg = moesaic_cfg(case)
        change(cfg)
        with pytest.raises(ConfigError, match=message):
            to_hf_config(cfg)
    model = moesaic_model(case)
    model.layers[0].ffn.gate.expert_bias.fill_(0.5)  # a selection bias Qwen3-MoE cannot hold
    save_native(model, tmp_path / "native")
    with pytest.raises(ConversionError, match="'layers.0.ffn.gate.expert_bias' .* is nonzero"):
        export_hf(tmp_path / "native", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("name", ["qwen3: unnormalised top-k, sliding, tied",
                                  "gemma4: k_eq_v, 3 shared, double-wide, MoE, softcap"])
def test_cli_convert_and_init_from_round_trip(name: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """native -> transformers -> native is bit-identical; init_from fills a built model with the same weights."""
    case = CASES[name]
    family = "Qwen3-MoE" if name.startswith("qwen3") else "Gemma 4"
    model = moesaic_model(case)
    save_native(model, tmp_path / "native")
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "hf")]) == 0
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert f"native -> transformers ({family})" in out and f"transformers -> native ({family})" in out
    target = Transformer(moesaic_cfg(case))
    load_hf_into(target, tmp_path / "hf")
    for other in (load_native(tmp_path / "back"), target):
        assert other.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_multimodal_gemma_checkpoints_import_their_language_model(tmp_path: Path) -> None:
    """config.json of Gemma4ForConditionalGeneration (text_config nested), tensors under model.language_model.,
    a vision tower to drop, and K/V weights of KV-shared layers (released checkpoints carry them) to drop."""
    case = CASES["gemma4: k_eq_v, 3 shared, double-wide, MoE, softcap"]
    hf = hf_model(case)
    with torch.no_grad():
        theirs = hf(ids()).logits
    text = hf.config.to_dict()
    tensors = {k.replace("model.", "model.language_model.", 1): v.clone() for k, v in hf.state_dict().items()
               if k != "lm_head.weight"}
    for i in (3, 4, 5):  # the shared layers: k/v/k_norm shaped like their source's
        src = 1 if i < 5 else 2
        for part in ("k_proj", "k_norm"):
            key = f"model.language_model.layers.{src}.self_attn.{part}.weight"
            tensors[key.replace(f"layers.{src}.", f"layers.{i}.")] = tensors[key].clone()
    tensors["model.vision_tower.encoder.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 4)
    (tmp_path / "mm").mkdir()
    save_file(tensors, str(tmp_path / "mm" / "model.safetensors"))
    config = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"], "text_config": text}
    (tmp_path / "mm" / "config.json").write_text(json.dumps(config))
    import_hf(tmp_path / "mm", tmp_path / "native")
    with torch.no_grad():
        ours = load_native(tmp_path / "native").eval()(ids()).logits
    assert_same_logits(case, ours, theirs, "multimodal gemma4 -> moesaic")
    with pytest.raises(ConfigError, match="layer type 'full_attention' occurs only in the KV-shared tail"):
        import_hf(edited(tmp_path / "mm", tmp_path / "tail", text_config=True, num_kv_shared_layers=4),
                  tmp_path / "tail_native")
    assert not (tmp_path / "tail_native").exists()


def test_gemma_export_names_what_transformers_cannot_express() -> None:
    case = CASES["gemma4: k_eq_v, 3 shared, double-wide, MoE, softcap"]
    assert to_hf_config(moesaic_cfg(case))["architectures"] == ["Gemma4ForCausalLM"]
    for change, message in [
        (lambda c: c.attention.menu["sliding_from_1"].update(kv_source=0),
         "model.attention.menu.sliding_from_1.kv_source=0 \\(layer 3\\): Gemma 4 shares the K/V of the last layer"),
        (lambda c: setattr(c, "dense_intermediate_sizes", [96, 96, 96, 192, 96, 192]),
         "model.dense_intermediate_sizes"),
        (lambda c: [c.attention.menu[n].update(scale=0.0) for n in ("full", "full_from_2")],
         "model.attention.menu.full.scale=0.0"),
        (lambda c: setattr(c, "layer_scalar", False), "model.layer_scalar=False: Gemma 4 needs True"),
        (lambda c: setattr(c.moe, "per_expert_scale", False), "model.moe.per_expert_scale=False"),
    ]:
        cfg = moesaic_cfg(case)
        change(cfg)
        with pytest.raises(ConfigError, match=message):
            to_hf_config(cfg)


@pytest.mark.parametrize("preset, family", [("gemma4_tiny", "Gemma4ForCausalLM"), ("gemma4_e2b", "Gemma4ForCausalLM"),
                                            ("gemma4_26b_a4b", "Gemma4ForCausalLM"),
                                            ("qwen3_moe_tiny", "Qwen3MoeForCausalLM"),
                                            ("qwen3_30b_a3b", "Qwen3MoeForCausalLM"),
                                            ("zaya1_tiny", "ZayaForCausalLM"), ("zaya1_8b", "ZayaForCausalLM")])
def test_bundled_presets_are_their_family_and_round_trip_through_config_json(preset: str, family: str) -> None:
    from moesaic.configs import load_config
    from moesaic.model.interop import check_same_architecture

    cfg = load_config(preset).model
    hf = to_hf_config(cfg)
    assert hf["architectures"] == [family]
    check_same_architecture(cfg, from_hf_config(hf), f"{preset} via config.json")


@pytest.mark.parametrize("preset, case", [("gemma4_tiny", gemma()), ("qwen3_moe_tiny", qwen())])
def test_tiny_presets_export_to_transformers_with_equal_logits(preset: str, case: Case, tmp_path: Path) -> None:
    from moesaic.configs import load_config

    torch.manual_seed(0)
    model = Transformer(load_config(preset).model).eval()
    randomise(model, 3)
    save_native(model, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf")
    hf = load_transformers(dataclasses.replace(case, model=getattr(transformers, to_hf_config(model.cfg)
                                                                   ["architectures"][0])), tmp_path / "hf")
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_same_logits(case, model(tokens).logits, hf(tokens).logits, f"{preset}: moesaic -> transformers")
