"""``moesaic budget``: plan each layer's attention so the KV cache of one long sequence fits a byte budget.

CONFIG_OR_RUN_DIR is a run directory (its config.yaml, metrics.jsonl, checkpoints) or a config whose
``run_dir`` holds them. Costs come from the run's logged attention statistics when it has them, else
(or with ``--calibrate``) from a calibration on the latest checkpoint's weights (trainer/budget_costs.py).
Writes the planned config (``--out``, default RUN_DIR/budget.yaml) and ``budget.json`` beside it (the
table, which ``moesaic report`` draws as budget.png), prints the table, and logs it to wandb as a Table and
that image, in a run of its own beside the training run (``logging.wandb`` of the run's config decides).
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Optional

from ..configs import Config, ConfigError, load_config, save_config, validate
from ..model.attention.base import layer_specs
from ..model.budget import Plan, format_plan, layer_choices, plan, planned_model
from ..model.kv_accounting import INDEX_FORMATS, MAIN_FORMATS

_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30,
          "t": 2**40, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def byte_size(text: str) -> float:
    """Parse 8GiB, 512MiB, 1.5G (binary), 8GB (decimal) or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if not m or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' must be a size like 8GiB, 512MiB or a byte count")
    try:
        return float(m.group(1)) * _UNITS[m.group(2)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' must be a size like 8GiB, 512MiB or a byte count") from None


def add_arguments(p: argparse.ArgumentParser, context_length) -> None:
    p.add_argument("source", help="a run directory, or a config (YAML path or bundled name) whose run_dir is the run")
    p.add_argument("overrides", nargs="*", help="dot-list overrides of the run's config")
    p.add_argument("--context", type=context_length, default=2**20, help="tokens per sequence (default 1M)")
    p.add_argument("--kv-budget", type=byte_size, required=True, help="KV-cache bytes for one sequence, e.g. 8GiB")
    p.add_argument("--flops-budget", type=float, default=math.inf,
                   help="attention FLOPs per trained token, summed over layers (default: unbounded)")
    p.add_argument("--types", default=None, help="comma-separated attention kinds allowed (default: all)")
    p.add_argument("--topk", default="", help="comma-separated smaller index_topk values to offer for entries "
                                              "that have one (e.g. 4,2)")
    p.add_argument("--dtype", choices=MAIN_FORMATS, default="bf16", help="main KV entry format")
    p.add_argument("--index-dtype", choices=INDEX_FORMATS, default=None, help="indexer key format (default: --dtype)")
    p.add_argument("--calibrate", action="store_true", help="measure costs on the checkpoint even if stats exist")
    p.add_argument("--batches", type=int, default=4, help="validation micro-batches per calibration forward")
    p.add_argument("--out", default=None, help="planned config path (default: RUN_DIR/budget.yaml)")


def _load(source: str, overrides: list[str]) -> tuple[Config, Path]:
    path = Path(source)
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise ConfigError(f"{path} is a directory without config.yaml (not a run directory)")
        return load_config(path / "config.yaml", overrides), path
    cfg = load_config(source, overrides)
    return cfg, Path(cfg.run_dir)


def _ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} '{text}' must be comma-separated integers") from None


def _costs(cfg: Config, run_dir: Path, choices, args: argparse.Namespace, index_fmt: str
           ) -> tuple[list[list[float]], str]:
    from ..trainer.budget_costs import calibration_costs, stats_costs
    from ..trainer.report import read_rows

    metrics = run_dir / "metrics.jsonl"
    rows = read_rows(metrics) if metrics.is_file() else []
    if not args.calibrate and any(k.startswith("attn_layers/") for r in rows for k in r):
        current = layer_specs(cfg.model)[:cfg.model.num_layers]
        return stats_costs(rows, choices, current, args.context, args.dtype, index_fmt), \
            "attention mass dropped, from logged stats"
    from ..parallel.portable import full_model_state
    from ..trainer.checkpoint import find_resumable
    from ..trainer.data import prepare_data

    if args.batches <= 0:
        raise ConfigError(f"--batches {args.batches} must be > 0")
    root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else run_dir / "checkpoints"
    ckpt = find_resumable(root, log=lambda _: None)
    if ckpt is None:
        raise ConfigError(f"{run_dir} has neither attention stats in metrics.jsonl nor a checkpoint under {root} "
                          f"to calibrate on")
    val = prepare_data(cfg).val
    n = min(len(val), args.batches * cfg.train.micro_batch_size)
    if n == 0:
        raise ConfigError(f"{run_dir}: the data has no validation blocks to calibrate on (data.val_fraction)")
    batches = [val.batch(list(range(s, min(n, s + cfg.train.micro_batch_size))))
               for s in range(0, n, cfg.train.micro_batch_size)]
    base, costs = calibration_costs(cfg.model, full_model_state(ckpt), batches, choices)
    return costs, f"val-loss increase in nats over {base:.4f}, {n} sequences of {ckpt.name}"


def table_rows(chosen: Plan) -> list[dict]:
    return [{"layer": i, "choice": c.entry, "kind": c.spec.kind, "kv_bytes": c.kv_bytes, "flops_per_token": c.flops,
             "cost": cost} for i, (c, cost) in enumerate(zip(chosen.choices, chosen.costs))]


def budget_command(args: argparse.Namespace) -> int:
    cfg, run_dir = _load(args.source, list(args.overrides))
    validate(cfg)
    index_fmt = args.index_dtype or args.dtype
    kinds: Optional[list[str]] = [k.strip() for k in args.types.split(",") if k.strip()] if args.types else None
    choices = layer_choices(cfg.model, args.context, cfg.data.seq_len, args.dtype, index_fmt, kinds,
                            _ints(args.topk, "--topk"))
    costs, unit = _costs(cfg, run_dir, choices, args, index_fmt)
    chosen = plan(choices, costs, args.kv_budget, args.flops_budget)
    out = Path(args.out) if args.out else run_dir / "budget.yaml"
    planned = Config(**{**vars(cfg), "model": planned_model(cfg.model, chosen)})
    validate(planned)
    save_config(planned, out)
    summary = {"context": args.context, "kv_budget": args.kv_budget, "kv_bytes": chosen.kv_bytes,
               "cost_unit": unit, "layers": table_rows(chosen)}
    (out.parent / "budget.json").write_text(json.dumps(summary, indent=1))
    print(format_plan(chosen, args.context, args.kv_budget, unit))
    print(f"planned config: {out}")
    sync = _to_wandb(cfg, run_dir, summary)
    if sync:
        print(f"wandb (offline): {sync}")
    return 0


def _to_wandb(cfg: Config, run_dir: Path, summary: dict) -> Optional[str]:
    from ..trainer.report import BUDGET_COLUMNS, budget_figure, budget_table, wandb_image
    from ..trainer.sinks import log_job

    def payload() -> dict:
        import wandb

        return {"budget/plan": wandb.Table(columns=BUDGET_COLUMNS, data=budget_table(summary)),
                "budget/plan_png": wandb_image(budget_figure(summary))}

    return log_job(cfg, run_dir, "budget", payload)
