"""Parity with transformers' DeepseekV4ForCausalLM (5.14) through moesaic's checkpoint conversion.

Random tiny configs with SWA, CSA and HCA layers (explicit layer types: transformers' default
layout is off by one, MODEL_SPEC §4.1), a hash layer, mHC with 4 streams, YaRN and MTP; 16 index
heads so the indexer's top-k has no ties (§13.4). Every parameter and buffer is randomised,
including those transformers initialises to constants (sinks, position biases, mHC bases and
scales, norms, selection biases, the hash table), so each one is exercised.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers  # the test extra pins 5.14.0 (>= 5.10.4 is a sound reference, MODEL_SPEC §13.2)
from safetensors.torch import load_file, save_file

from moesaic.configs import ConfigError
from moesaic.configs.schema import AttentionConfig, ModelConfig, MoEConfig
from moesaic.launch.cli import main as cli
from moesaic.model import Transformer
from moesaic.model.attention.presets import v4_attention
from moesaic.model.interop import (ConversionError, export_hf, import_hf, load_hf_into, load_native,
                                   read_native_config, save_native, to_hf_config)
from moesaic.model.interop import architecture
from moesaic.model.moe.router import hash_routing_table

from attention_types import HF_KINDS, small_spec
from hf_checkpoints import import_both_layouts
from numerics import assert_close_scaled

pytestmark = pytest.mark.numerics

VOCAB, SEQ = 96, 48


def make_cfg(layer_types: list[str], yarn: float = 1.0, mtp_layers: int = 1,
             score_func: str = "sqrtsoftplus") -> ModelConfig:
    a = v4_attention(num_heads=4, head_dim=32, rope_head_dim=8, q_lora_rank=24, o_groups=2, o_lora_rank=16,
                     window=8, csa_ratio=4, hca_ratio=8, index_heads=16, index_head_dim=16, index_topk=3,
                     yarn_factor=yarn, yarn_original_max_position=32, query_chunk=16)
    moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=24, num_hash_layers=1, routed_scaling_factor=2.5,
                    swiglu_limit=1.0, score_func=score_func)  # a low clamp limit, so the clamp is active
    return ModelConfig(vocab_size=VOCAB, hidden_size=48, num_layers=len(layer_types), layer_types=layer_types,
                       hc_mult=4, mtp_layers=mtp_layers, attention=a, moe=moe)


def one_type_cfg(kind: str) -> ModelConfig:
    """Every layer of one registered type (tests/attention_types.py settings), MTP blocks on SWA."""
    return dataclasses.replace(make_cfg([kind, kind]), attention=AttentionConfig(menu={
        "swa": small_spec("swa"), kind: small_spec(kind)}))


CONFIGS = {
    "swa+hash+mhc+mtp": make_cfg(["swa", "swa"]),
    "swa/csa/hca+yarn": make_cfg(["swa", "csa", "hca", "csa"], yarn=4.0),
    "sigmoid scores": make_cfg(["hca", "swa"], mtp_layers=0, score_func="sigmoid"),
    # moesaic's plain residual as transformers' one-stream mHC with constant mappings (the demo model's)
    "plain residual": dataclasses.replace(make_cfg(["swa", "csa"]), hc_mult=1),
    **{f"{kind} only": one_type_cfg(kind) for kind in HF_KINDS},  # a registered type gets the parity test
}


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every saved float tensor ~ N(1 for norms and scales, else 0; 0.05 for matrices, else 0.5); random
    hash tables. A hash layer's moesaic expert_bias stays 0: it is never used and never exported."""
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict(keep_vars=True)
    for name, t in state.items():
        if name.endswith("tid2eid"):
            experts = state[name.replace("tid2eid", "weight")].shape[0]
            t.copy_(hash_routing_table(t.shape[0], experts, t.shape[1], int(torch.randint(1 << 30, (1,), generator=g))))
        elif not (name.endswith("expert_bias") and name.replace("expert_bias", "tid2eid") in state):
            around_one = "norm" in name or name.endswith("scale")
            t.copy_(torch.randn(t.shape, generator=g) * (0.05 if t.dim() >= 2 else 0.5) + float(around_one))


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def load_transformers(path: Path) -> torch.nn.Module:
    model, info = transformers.DeepseekV4ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected, mismatched or randomly initialised
    return model.float().eval()


def moesaic_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    randomise(model, seed)
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_moesaic_weights_load_in_transformers_with_equal_logits(name: str, tmp_path: Path) -> None:
    model = moesaic_model(CONFIGS[name])
    save_native(model, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf", max_shard_bytes=300_000)  # several shards + index
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = load_transformers(tmp_path / "hf")
    with torch.no_grad():
        ours, theirs = model(ids()).logits, hf(ids()).logits
    diff = (ours - theirs).abs().max().item()
    print(f"{name}: moesaic -> transformers, max |logit diff| {diff:.2e} (logits up to {theirs.abs().max():.2f})")
    assert_close_scaled(ours, theirs, 64, "logits")  # two implementations of a whole model (observed: 9 eps)


def transformers_model(layer_types: list[str]) -> torch.nn.Module:
    hf_cfg = to_hf_config(make_cfg(layer_types, yarn=4.0, mtp_layers=0))
    config = transformers.DeepseekV4Config(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "dtype")})
    torch.manual_seed(0)
    model = transformers.DeepseekV4ForCausalLM(config).eval()
    randomise(model, seed=5)
    return model


def test_transformers_weights_load_in_moesaic_with_equal_logits(tmp_path: Path) -> None:
    hf = transformers_model(["csa", "hca", "swa"])
    with torch.no_grad():
        theirs = hf(ids()).logits
    # 1) what transformers' own save_pretrained writes (head.weight, per-expert w1/w2/w3 names)
    # 2) its module state dict written as is (lm_head.weight, fused gate_up_proj)
    for native in import_both_layouts(hf, tmp_path):
        model = load_native(native).eval()
        assert model.cfg.layer_types == ["csa", "hca", "swa"] and model.cfg.moe.num_hash_layers == 1
        with torch.no_grad():
            ours = model(ids()).logits
        print(f"transformers -> moesaic ({native.name}): max |logit diff| {(ours - theirs).abs().max():.2e}")
        assert_close_scaled(ours, theirs, 64, f"logits ({native.name})")  # (observed: 8 eps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_to_transformers_to_native_is_bit_identical(dtype: torch.dtype, tmp_path: Path) -> None:
    model = moesaic_model(CONFIGS["swa/csa/hca+yarn"]).to(dtype)
    save_native(model, tmp_path / "a")
    export_hf(tmp_path / "a", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == str(dtype).split(".")[1]
    import_hf(tmp_path / "hf", tmp_path / "b")
    # the architecture survives; training-only settings (init_std, query_chunk, ...) are not in config.json
    assert architecture(read_native_config(tmp_path / "a")) == architecture(read_native_config(tmp_path / "b"))
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("mtp.0.") for k in a)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_init_from_fills_a_built_model_and_names_a_disagreeing_field(tmp_path: Path) -> None:
    cfg = CONFIGS["swa/csa/hca+yarn"]
    source = moesaic_model(cfg)
    save_native(source, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf")
    target = Transformer(cfg).eval()
    load_hf_into(target, tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(target(ids()).logits, source(ids()).logits)
    for entry, field, value, message in [("swa", "window", 16, "model.attention.menu.swa.window=16"),
                                         ("csa", "index_heads", 8, "model.attention.menu.csa.index_heads=8")]:
        other = make_cfg(["swa", "csa", "hca", "csa"], yarn=4.0)
        setattr(other.attention.menu[entry], field, value)
        with pytest.raises(ConfigError, match=message):
            load_hf_into(Transformer(other), tmp_path / "hf")
    with pytest.raises(ConfigError, match="model.mtp_layers=0"):
        load_hf_into(Transformer(make_cfg(["swa", "csa", "hca", "csa"], yarn=4.0, mtp_layers=0)), tmp_path / "hf")


def rewrite(src: Path, dst: Path, tensors: dict | None = None, config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if tensors is not None:
        save_file(tensors, str(dst / "model.safetensors"))
    if config is not None:
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_corrupted_or_mismatched_checkpoints_fail_clearly_and_write_nothing(tmp_path: Path) -> None:
    save_native(moesaic_model(CONFIGS["swa+hash+mhc+mtp"]), tmp_path / "native")
    good = export_hf(tmp_path / "native", tmp_path / "good")
    tensors, config = load_file(str(good / "model.safetensors")), json.loads((good / "config.json").read_text())
    missing = "model.layers.1.self_attn.kv_proj.weight"
    wrong = "model.layers.0.mlp.experts.gate_up_proj"
    cases = [
        (rewrite(good, tmp_path / "missing", {k: v for k, v in tensors.items() if k != missing}), ConversionError,
         f"'{missing}' is missing"),
        (rewrite(good, tmp_path / "shape", {**tensors, wrong: tensors[wrong][:, :-2].contiguous()}), ConversionError,
         f"'{wrong}'.*shape"),
        (rewrite(good, tmp_path / "extra", {**tensors, "model.layers.2.input_layernorm.weight": torch.ones(48)}),
         ConversionError, "'model.layers.2.input_layernorm.weight'.*no place"),
        (rewrite(good, tmp_path / "config", config={**config, "hidden_size": 64}), ConversionError,
         "tensor 'model.hc_head.hc_fn' .* has shape \\[4, 192\\], but the config implies \\[4, 256\\]"),
        (rewrite(good, tmp_path / "kv", config={**config, "num_key_value_heads": 2}), ConfigError,
         "num_key_value_heads=2"),
        (rewrite(good, tmp_path / "key", config={k: v for k, v in config.items() if k != "o_groups"}), ConfigError,
         "'o_groups' is missing"),
    ]
    table = "model.layers.0.mlp.gate.tid2eid"
    cases.append((rewrite(good, tmp_path / "table", {**tensors, table: tensors[table] + 1}), ConversionError,
                  f"'{table}' routes to expert 8"))
    truncated = rewrite(good, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases.append((truncated, ConversionError, "model.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    for src, error, message in cases:
        with pytest.raises(error, match=message):
            import_hf(src, out / src.name)
    assert not any(out.iterdir())  # nothing at any destination, no partial temporary directory either
    # (the hash-table case fails while writing, after the temporary directory was made)
    with pytest.raises(ConversionError, match="already exists"):
        import_hf(good, tmp_path / "native")  # never overwrites


def test_export_refuses_what_transformers_cannot_express(tmp_path: Path) -> None:
    two_windows = make_cfg(["swa", "wide"])
    two_windows.attention.menu["wide"] = dataclasses.replace(two_windows.attention.menu["swa"], window=16)
    with pytest.raises(ConfigError, match="model.attention.menu.wide and model.attention.menu.swa disagree on "
                                          "transformers' 'sliding_window' \\(16 vs 8\\)"):
        to_hf_config(two_windows)
    for change, message in [({"ffn_types": ["dense", "moe"]}, "ffn_types"),
                            ({"tie_embeddings": True}, "tie_embeddings"), ({"score_func": "softmax"}, "score_func"),
                            ({"ffn_types": ["dense+moe", "moe"]}, "ffn_types\\[0\\]='dense\\+moe'"),
                            ({"sandwich_norm": True}, "model.sandwich_norm=True: a Gemma 4 option"),
                            ({"ple_dim": 4}, "model.ple_dim=4"), ({"per_expert_scale": True}, "moe.per_expert_scale"),
                            ({"ffn_activation": "gelu_tanh"}, "ffn_activation='gelu_tanh'")]:
        cfg = make_cfg(["swa", "swa"])
        for key, value in change.items():
            setattr(cfg.moe if key in ("score_func", "per_expert_scale") else cfg, key, value)
        with pytest.raises(ConfigError, match=message):
            to_hf_config(cfg)


def test_cli_convert_both_ways(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = moesaic_model(CONFIGS["swa+hash+mhc+mtp"])
    save_native(model, tmp_path / "native")
    assert cli(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--shard-gib", "0.0001"]) == 0
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "native -> transformers" in out and "transformers -> native" in out
    assert cli(["convert", str(tmp_path / "hf"), str(tmp_path / "back")]) == 2
    assert "moesaic: error:" in capsys.readouterr().err
    back = load_native(tmp_path / "back").eval()
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))
    # Logits to rounding only: attention.query_chunk (a moesaic runtime knob, not in transformers'
    # config) comes back as its default, which changes the kernel's query blocks.
    with torch.no_grad():
        assert_close_scaled(back(ids()).logits, model(ids()).logits, 16, "logits")


def test_training_starts_from_init_from(tmp_path: Path) -> None:
    """``moesaic train`` with model.init_from: mHC, hash routing, CSA and MTP train through DeepSpeed,
    starting from the checkpoint's weights (one AdamW step away from them at the end)."""
    from trainrun import FAST, final_params, latest, train

    from moesaic.configs import load_config

    v4 = ["model.hc_mult=4", "model.mtp_layers=1", "model.moe.num_hash_layers=1", "model.ffn_types=[moe,moe]",
          "model.layer_types=[swa,csa]", "model.attention.menu.csa.index_heads=16",
          "model.attention.menu.csa.index_head_dim=16",
          "train.steps=1", "train.eval_every=1", f"data.cache_dir={tmp_path / 'cache'}"]
    overrides = FAST + v4
    source = moesaic_model(load_config("tiny", overrides).model, seed=3)
    save_native(source, tmp_path / "native")
    export_hf(tmp_path / "native", tmp_path / "hf")
    train(overrides + [f"run_dir={tmp_path / 'run'}", f"model.init_from={tmp_path / 'hf'}"])
    trained = final_params(latest(tmp_path / "run"))
    loaded = source.state_dict()
    assert trained.keys() == loaded.keys()
    moved = max((trained[k].float() - loaded[k].float()).abs().max().item() for k in loaded)
    assert moved < 0.01  # one step at lr <= 3e-3 from the imported weights (which have std 0.05)
