"""Config loading: typed merge, one-line errors naming the field, bundled configs, the CLI."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moesaic.configs import ConfigError, load_config, validate
from moesaic.trainer.schedule import lr_multiplier


def test_bundled_configs_load_and_overrides_apply() -> None:
    cfg = load_config("tiny", ["train.steps=50", "model.moe.top_k=1", "model.layer_types=[swa,swa,swa,swa]"])
    assert cfg.train.steps == 50 and cfg.model.moe.top_k == 1
    assert cfg.model.layer_types == ["swa"] * 4
    assert load_config("configs/small_gpu.yaml").train.dtype == "bf16"


@pytest.mark.parametrize("overrides, message", [
    (["model.moe.top_k=9"], "model.moe.top_k=9 must be <= model.moe.num_experts=8"),
    (["model.foo=1"], "unknown config key 'model.foo'"),
    (["train.steps=abc"], "bad value for 'train.steps'"),
    (["train.dtype=fp16"], "train.dtype='fp16' is not allowed (choose one of: fp32, bf16)"),
    (["model.layer_types=[swa,xyz,swa,swa]"], "model.layer_types[1]='xyz' is not an entry of model.attention.menu"),
    (["model.layer_types=[swa]"], "model.layer_types has 1 entries but model.num_layers=4"),
    (["train.zero_stage=3"], "train.zero_stage=3 is not allowed"),
    (["train.zero_stage=0", "train.dtype=bf16"], "train.zero_stage=0 cannot train train.dtype=bf16: use 1 or 2"),
    (["train.global_batch_size=20"], "train.global_batch_size=20 must be a multiple of train.micro_batch_size=16"),
    (["model.attention.common.o_groups=3"],
     "model.attention.menu.swa.o_groups=3 must divide model.attention.menu.swa.num_heads=4"),
    (["model.attention.menu.csa.index_topk=0"], "model.attention.menu.csa.index_topk=0 must be > 0"),
    (["model.attention.window=64"], "unknown config key 'model.attention.window' in override 'model.attention.window="
                                    "64': attention fields now go in a menu entry (model.attention.menu.<name>.window) "
                                    "or in model.attention.common"),
    (["model.attention.menu.csa.kind=mamba"], "model.attention.menu.csa.kind='mamba' is not an attention type"),
    (["model.attention.menu.hca.index_topk=3"], "unknown config key 'model.attention.menu.hca.index_topk': kind hca"),
    (["model.attention.menu.hca.ratio=abc"], "bad value for 'model.attention.menu.hca.ratio'"),
    (["model.attention.menu.long={window: 64}"], "model.attention.menu.long needs a 'kind'"),
    (["model.attention.common.index_topks=4"], "unknown config key 'model.attention.common.index_topks'"),
    (["model.attention.backend=cpu", "train.dtype=bf16"], "model.attention.backend='cpu' runs fp32 CPU tensors only"),
    (["model.attention.backend=cuda"],
     "model.attention.backend='cuda' is not allowed (choose one of: auto, torch, cpu, triton)"),
    (["model.mtp_layers=1", "model.mtp_layer_type=long"], "model.mtp_layer_type uses 'long', which is not an entry"),
    (["train.steps"], "override 'train.steps' must look like key=value"),
])
def test_bad_config_gives_one_line_naming_the_field(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_world_size_checks() -> None:
    cfg = load_config("tiny", ["train.micro_batch_size=4", "train.global_batch_size=4"])
    validate(cfg, world_size=1)
    with pytest.raises(ConfigError, match="multiple of train.micro_batch_size=4 x data-parallel size 2"):
        validate(cfg, world_size=2)


def test_cli_reports_error_line_and_exit_code() -> None:
    proc = subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "train", "tiny", "model.moe.top_k=99"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "moesaic: error: model.moe.top_k=99 must be <= model.moe.num_experts=8"


def test_lr_schedules() -> None:
    cfg = load_config("tiny", ["train.steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]).train
    f = lr_multiplier(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert f(55) == pytest.approx(0.55)  # cosine midpoint: 0.1 + 0.9 * 0.5
    cfg.schedule, cfg.wsd_decay_fraction = "wsd", 0.2
    f = lr_multiplier(cfg)
    assert f(79) == 1.0 and f(90) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)
