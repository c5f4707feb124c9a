"""KV accounting reproduces DeepSeek's published V4 figures (MODEL_SPEC §8)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from moesaic.configs import load_config
from moesaic.model.kv_accounting import index_entry_bytes, layer_kv_bytes, main_entry_bytes


def _report(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "moesaic.launch.cli", "kv-report", *args],
                          capture_output=True, text=True, check=True)
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in:\n{text}"
    return float(match.group(1))


def test_entry_formats() -> None:
    assert main_entry_bytes(512, 64, "fp8") == 584  # FlashMLA "MODEL1"
    assert main_entry_bytes(512, 64, "bf16") == 1024
    assert index_entry_bytes(128, "fp4") == 68 and index_entry_bytes(128, "fp8") == 132


@pytest.mark.parametrize("preset, bf16_gib, paper_ratio, layers", [
    ("deepseek_v4_pro", 9.625, 9.55, "31 HCA, 30 CSA"),
    ("deepseek_v4_flash", 6.72, 13.67, "2 SWA, 21 CSA, 20 HCA"),
])
def test_kv_report_reproduces_published_numbers(preset: str, bf16_gib: float, paper_ratio: float, layers: str) -> None:
    bf16 = _report(preset, "--context", "1M")
    assert f"layers: {layers}" in bf16
    assert _number(r"total: ([\d.]+) GiB", bf16) == pytest.approx(bf16_gib, abs=0.005)
    assert _number(r"V3.2 in bf16 \(([\d.]+) GiB", bf16) == pytest.approx(83.875, abs=1e-3)
    paper = _report(preset, "--context", "1M", "--dtype", "fp8", "--index-dtype", "fp4")
    assert _number(r"V3.2 in fp8 \([\d.]+ GiB\): ([\d.]+)x", paper) == pytest.approx(paper_ratio, abs=0.005)


def test_layer_formula_small_context() -> None:
    cfg = load_config("deepseek_v4_flash").model
    layers = layer_kv_bytes(cfg, 1000, "bf16")
    assert layers[0].kind == "swa" and layers[0].total == 128 * 1024
    assert layers[2].kind == "csa" and layers[2].compressed_bytes == 250 * (1024 + 256)
    assert layers[3].kind == "hca" and layers[3].compressed_bytes == 7 * 1024
    assert layer_kv_bytes(cfg, 100, "bf16")[0].window_bytes == 100 * 1024  # window capped by the context


def test_gemma4_e2b_kv_sharing_reproduces_the_window_aware_saving() -> None:
    """MOSAIC_SPEC §1.8, window-aware at 128K in bf16: E2B's 20 KV-shared layers save 4 global layers x 256 MiB
    + 16 sliding layers x 0.5 MiB ~ 1.0 GiB of the 1.76 GiB the layers would hold with their own K/V (57%)."""
    report = _report("gemma4_e2b", "--context", "128k")
    assert "basis: window-aware" in report
    shared = _number(r"they would add ([\d.]+) GiB", report)
    total = _number(r"total: ([\d.]+) GiB", report)
    assert shared == pytest.approx((4 * 256 + 16 * 0.5) / 1024, abs=1e-4)
    assert total + shared == pytest.approx(1.76, abs=0.005)
    layers = layer_kv_bytes(load_config("gemma4_e2b").model, 131072, "bf16")
    assert [layer.total for layer in layers[15:]] == [0.0] * 20
    assert layers[0].total == 512 * 1024 and layers[4].total == 131072 * 2048  # sliding capped at 512; global


def test_laguna_xs2_budget_changes_no_kv_bytes() -> None:
    """MOSAIC_SPEC §2.6 at 128K in bf16: 4096 B/token/layer (8 KV heads x 128, K and V) whatever the query heads;
    only the 10 global layers grow with the context (10 x 512 MiB), the 30 sliding ones keep 512 tokens (2 MiB)."""
    report = _report("laguna_xs2", "--context", "128k")
    assert "layers: 40 GQA" in report
    assert _number(r"total: ([\d.]+) GiB", report) == pytest.approx((10 * 512 + 30 * 2) / 1024, abs=1e-4)
    cfg = load_config("laguna_xs2").model
    layers = layer_kv_bytes(cfg, 131072, "bf16")
    heads = {cfg.attention.menu[name]["num_heads"] for name in ("global", "sliding")}
    assert heads == {48, 64} and layers[0].total == 131072 * 4096 and layers[1].total == 512 * 4096
