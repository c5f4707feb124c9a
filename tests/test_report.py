"""``moesaic report``: PNGs from a metrics.jsonl written by the real metrics panel and sinks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from moesaic.launch.cli import main
from moesaic.model import Transformer
from moesaic.trainer.balance import update_router_biases
from moesaic.trainer.metrics import MetricsPanel
from moesaic.trainer.report import figure_png, heatmap_figure
from moesaic.trainer.sinks import MetricSinks
from test_metrics import tiny_config


def write_run(run_dir: Path, steps: int = 6) -> None:
    """A few optimizer steps of a tiny MoE model on one process, logged as the trainer logs them."""
    cfg = tiny_config(moe_heatmap_every=2, kv_contexts=[4096, 2**20], wandb="disabled")
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sinks = MetricSinks(cfg, run_dir, resume_step=None)
    panel = MetricsPanel(model, cfg, torch.device("cpu"), world_size=1)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 9))
    for step in range(1, steps + 1):
        out = model(ids[:, :-1], labels=ids[:, 1:], stats=panel.arm())
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        update_router_biases(model.routers())
        metrics = {"train/loss": out.lm_loss.item(), **panel.collect(step, tokens_per_s=100.0)}
        if step % 3 == 0:
            metrics["val/loss"] = out.lm_loss.item() + 0.1
        sinks.log(step, metrics)
    sinks.close()


def test_report_writes_sensible_pngs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    names = {"loss", "maxvio", "kv_bytes", "expert_load_L00", "expert_load_L01"}
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(tmp_path / "report" / f"{n}.png") for n in names)
    for name in names:
        data = (tmp_path / "report" / f"{name}.png").read_bytes()
        assert 5_000 < len(data) < 1_000_000, f"{name}.png has {len(data)} bytes"
        width, height = Image.open(io.BytesIO(data)).size
        assert 300 <= width <= 1400 and 200 <= height <= 1000, f"{name}.png is {width}x{height}"


def test_report_skips_plots_without_data_and_rejects_a_non_run(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 3.0}\n{"step": 2, "train/loss": 2.5}\n')
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "plots")]) == 0
    assert [p.name for p in (tmp_path / "plots").iterdir()] == ["loss.png"]
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("moesaic: error: ")


def test_heatmaps_of_a_large_model_stay_bounded() -> None:
    loads = torch.rand(61, 256).mul(2).tolist()
    png = figure_png(heatmap_figure(loads, [f"L{i:02d}" for i in range(61)], "expert", "load / ideal"))
    assert Image.open(io.BytesIO(png)).size == (1400, 1000) and len(png) < 1_000_000
