"""``moesaic report RUN_DIR``: PNG plots from metrics.jsonl, for people without wandb.

Writes into RUN_DIR/report/: ``loss.png`` (train and val loss), ``maxvio.png`` (MaxVio per MoE
layer and the max over layers), ``expert_load_LXX.png`` (tokens per expert / ideal over time, one
per MoE layer; needs ``logging.moe_heatmap_every`` > 0) and ``kv_bytes.png`` (KV-cache bytes per
token per layer at each ``logging.kv_contexts`` length) and, after ``moesaic budget``, ``budget.png`` (its
plan from RUN_DIR/budget.json: per-layer choice, KV bytes and predicted cost). Plots whose data are absent
are skipped.
Figures are built without pyplot, so nothing global is touched in a training process.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path
from typing import Sequence

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

_MAXVIO = re.compile(r"moe_layers/(L\d+)/maxvio")
_KV_LAYER = re.compile(r"kv_layers/(L\d+)/([^/]+)/bytes_per_token")
MAX_LEGEND = 12  # more layers than this are told apart by colour only


def _ticks(labels: Sequence[str], most: int = 24) -> tuple[list[int], list[str]]:
    """At most ``most`` evenly spaced tick positions, so 256 experts or 60 layers stay legible."""
    positions = list(range(0, len(labels), max(1, math.ceil(len(labels) / most))))
    return positions, [labels[i] for i in positions]


def heatmap_figure(values: Sequence[Sequence[float]], row_labels: Sequence[str], xlabel: str, colorbar: str,
                   col_labels: Sequence[str] | None = None, title: str = "") -> Figure:
    """rows x columns heatmap of loads (1 = ideal), white at 1, red above, blue below; at most 14 x 10 in."""
    rows, cols = len(values), len(values[0])
    fig = Figure(figsize=(min(14.0, max(4.0, 0.25 * cols + 2)), min(10.0, max(2.5, 0.3 * rows + 1.5))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    top = max(2.0, max(max(row) for row in values))
    image = ax.imshow(values, aspect="auto", cmap="RdBu_r", vmin=0.0, vmax=top, interpolation="nearest")
    ax.set_yticks(*_ticks(row_labels))
    ax.set_xticks(*_ticks(col_labels if col_labels is not None else [str(i) for i in range(cols)], most=12))
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def wandb_image(fig: Figure):
    """``fig`` as a ``wandb.Image`` of its PNG (wandb and PIL are imported only by what logs to wandb)."""
    import wandb
    from PIL import Image

    return wandb.Image(Image.open(io.BytesIO(figure_png(fig))))


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def _line_figure(title: str, ylabel: str) -> tuple[Figure, object]:
    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_plot(rows: list[dict]) -> Figure | None:
    fig, ax = _line_figure("loss", "nats")
    for key in ("train/loss", "val/loss"):
        steps, values = _series(rows, key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "val/loss" else None, label=key)
    if not ax.lines:
        return None
    ax.legend()
    return fig


def maxvio_plot(rows: list[dict]) -> Figure | None:
    layers = sorted({m.group(1) for r in rows for k in r if (m := _MAXVIO.fullmatch(k))})
    if not layers:
        return None
    fig, ax = _line_figure("MaxVio (max load / mean load - 1); colour: layer depth", "MaxVio")
    cmap = colormaps["viridis"]
    for i, layer in enumerate(layers):
        ax.plot(*_series(rows, f"moe_layers/{layer}/maxvio"), color=cmap(i / max(1, len(layers) - 1)),
                label=layer if len(layers) <= MAX_LEGEND else None, alpha=0.7)
    ax.plot(*_series(rows, "moe/maxvio/max"), color="black", linewidth=2, label="max over layers")
    ax.legend(fontsize="small", ncol=2)
    return fig


def expert_load_plots(rows: list[dict]) -> dict[str, Figure]:
    """One heatmap per MoE layer: experts x logged steps, from the detailed-mode rows."""
    snapshots = [(r["step"], r["moe/expert_load"]) for r in rows if "moe/expert_load" in r]
    if not snapshots:
        return {}
    steps = [str(step) for step, _ in snapshots]
    figures = {}
    for i, layer in enumerate(snapshots[0][1]["layers"]):
        over_time = [snap["load"][i] for _, snap in snapshots]  # [time][expert]
        experts = list(zip(*over_time))  # [expert][time]
        name = f"L{layer:02d}"
        figures[name] = heatmap_figure(experts, [f"e{e}" for e in range(len(experts))], "step", "load / ideal",
                                       col_labels=steps, title=f"tokens per expert / ideal, layer {name}")
    return figures


def kv_plot(rows: list[dict]) -> Figure | None:
    """Grouped bars: bytes per token of each attention layer at each logged context length."""
    row = next((r for r in reversed(rows) if any(_KV_LAYER.fullmatch(k) for k in r)), None)
    if row is None:
        return None
    found = [m.groups() for k in row if (m := _KV_LAYER.fullmatch(k))]
    layers = sorted({layer for layer, _ in found})
    contexts = list(dict.fromkeys(ctx for _, ctx in found))
    fig = Figure(figsize=(max(6.0, 0.5 * len(layers) + 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(contexts)
    for j, ctx in enumerate(contexts):
        values = [row[f"kv_layers/{layer}/{ctx}/bytes_per_token"] for layer in layers]
        ax.bar([i + j * width for i in range(len(layers))], values, width, label=f"{ctx} context")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], labels=layers)
    ax.set_yscale("log")
    ax.set_ylabel("KV-cache bytes per token")
    ax.set_title("KV cache per attention layer")
    ax.legend()
    fig.tight_layout()
    return fig


BUDGET_COLUMNS = ["layer", "choice", "kind", "kv_mib", "flops_per_token", "cost"]


def budget_table(summary: dict) -> list[list]:
    """The rows of a ``budget.json`` plan, in ``BUDGET_COLUMNS`` order (for the PNG and the wandb Table)."""
    return [[r["layer"], r["choice"], r["kind"], r["kv_bytes"] / 2**20, r["flops_per_token"], r["cost"]]
            for r in summary["layers"]]


def budget_figure(summary: dict) -> Figure:
    """A ``moesaic budget`` plan: KV MiB per layer as bars coloured by kind, above the table it printed."""
    rows = budget_table(summary)
    kinds = list(dict.fromkeys(r[2] for r in rows))
    colours = {k: colormaps["tab10"](i % 10) for i, k in enumerate(kinds)}
    fig = Figure(figsize=(min(14.0, max(6.0, 0.4 * len(rows) + 3)), min(10.0, 3.5 + 0.22 * len(rows))))
    FigureCanvasAgg(fig)
    bars, table = fig.subplots(2, 1, height_ratios=[3, max(2, 0.22 * len(rows))])
    bars.bar([r[0] for r in rows], [r[3] for r in rows], color=[colours[r[2]] for r in rows])
    bars.set_xticks(*_ticks([str(r[0]) for r in rows]))
    bars.set_xlabel("layer")
    bars.set_ylabel("KV-cache MiB")
    bars.legend(handles=[Patch(color=colours[k], label=k) for k in kinds], fontsize="small")
    mib = 2**20
    bars.set_title(f"planned attention: {summary['kv_bytes'] / mib:,.1f} of {summary['kv_budget'] / mib:,.1f} MiB "
                   f"at {summary['context']:,} tokens\ncost: {summary['cost_unit']}", fontsize="medium")
    table.axis("off")
    cells = [[str(r[0]), r[1], r[2], f"{r[3]:.3f}", f"{r[4]:.3g}", f"{r[5]:.4f}"] for r in rows]
    grid = table.table(cellText=cells, colLabels=["layer", "choice", "kind", "KV MiB", "FLOPs/token", "cost"],
                       loc="upper center")
    grid.auto_set_font_size(False)
    grid.set_fontsize(8)
    fig.tight_layout()
    return fig


def write_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the PNGs for ``run_dir``'s metrics.jsonl; returns the paths written."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: RUN_DIR must be a moesaic run directory")
    rows = read_rows(metrics)
    out_dir = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss": loss_plot(rows), "maxvio": maxvio_plot(rows), "kv_bytes": kv_plot(rows)}
    figures.update({f"expert_load_{layer}": fig for layer, fig in expert_load_plots(rows).items()})
    plan = Path(run_dir) / "budget.json"
    if plan.is_file():
        figures["budget"] = budget_figure(json.loads(plan.read_text()))
    written = []
    for name, fig in figures.items():
        if fig is not None:
            path = out_dir / f"{name}.png"
            path.write_bytes(figure_png(fig))
            written.append(path)
    return written
