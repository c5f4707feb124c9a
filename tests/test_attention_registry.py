"""The attention registry and menu: incomplete types are refused at definition, entries resolve with
``common`` under their own fields, and ``moesaic config`` lists what each layer runs."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from moesaic.configs import ConfigError, load_config
from moesaic.model.attention import AttentionSpec, layer_specs, parse_entry, register, registered
from moesaic.model.attention.swa import SWASpec


def test_a_type_missing_a_method_is_refused_when_registered() -> None:
    @dataclasses.dataclass
    class Bare(AttentionSpec):
        kind: str = "bare"

    with pytest.raises(TypeError, match="attention type Bare does not implement build, check, dense_kv_bytes"):
        register(Bare)
    with pytest.raises(TypeError, match="kind 'swa' is empty or registered twice"):
        register(dataclasses.make_dataclass("Again", [("kind", str, "swa")], bases=(SWASpec,)))
    assert "bare" not in registered() and "Again" not in {cls.__name__ for cls in registered().values()}


def test_common_fills_only_what_an_entry_leaves_unset() -> None:
    common = {"window": 64, "num_heads": 8, "index_topk": 7}  # index_topk: a CSA field, ignored by SWA
    spec = parse_entry("local", {"kind": "swa", "window": 16}, common)
    assert isinstance(spec, SWASpec) and (spec.window, spec.num_heads) == (16, 8)
    csa = parse_entry("long", {"kind": "csa"}, common)
    assert (csa.window, csa.index_topk, csa.rope_theta) == (64, 7, 160000.0)  # the kind's own default theta
    with pytest.raises(ConfigError, match="bad value for 'model.attention.menu.long.window'"):
        parse_entry("long", {"kind": "csa", "window": "wide"}, {})


def test_layers_resolve_to_their_entries_and_config_lists_them() -> None:
    cfg = load_config("tiny", ["model.attention.menu.wide={kind: swa, window: 64}",
                               "model.layer_types=[swa,csa,wide,hca]", "model.mtp_layers=1"])
    specs = layer_specs(cfg.model)
    assert [s.kind for s in specs] == ["swa", "csa", "swa", "hca", "swa"]  # the MTP block: model.mtp_layer_type
    assert [s.window for s in specs] == [32, 32, 64, 32, 32]
    out = subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "config", "tiny",
                          "model.attention.menu.wide={kind: swa, window: 64}", "model.layer_types=[swa,csa,wide,hca]"],
                         capture_output=True, text=True, check=True).stdout
    assert "#   wide (layers 2): swa window=64" in out and "#   csa (layers 1): csa index_topk=8" in out


def test_sp_alignment_comes_from_every_layer_type_in_use() -> None:
    ok = ["model.layer_types=[swa,csa,hca,csa]", "parallel.sp=2", "model.attention.menu.hca.ratio=16"]
    load_config("tiny", ok)  # 128 tokens: shards of 64, multiples of 4 and 16
    with pytest.raises(ConfigError, match=r"data.seq_len=128 must be divisible by parallel.sp=2 x 128 \(equal "
                                          r"sequence shards, starting model.attention.menu.csa at multiples of 4, "
                                          r"model.attention.menu.hca at multiples of 128\)"):
        load_config("tiny", [*ok, "model.attention.menu.hca.ratio=128"])
    load_config("tiny", ["model.layer_types=[swa,swa,swa,swa]", "parallel.sp=2", "data.seq_len=130"])
