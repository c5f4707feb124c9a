"""The ``moesaic`` command line.

    moesaic train CONFIG [key=value ...]     train (or resume) in this process; under torchrun, per rank
    moesaic launch CONFIG [key=value ...] --nproc N [--nnodes M --master-addr A |
                   --hostfile F] [--max-restarts K] [--dry-run]
                                             start N processes per node with torchrun (or the DeepSpeed
                                             launcher for a hostfile); per-rank logs in run_dir/logs
    moesaic slurm CONFIG [key=value ...] --nodes M --gpus-per-node G --time T [--cpus-per-task C --master-port P]
                                             write run_dir/slurm.sbatch (pre-emption signal, requeue)
    moesaic prepare-data CONFIG [key=value ...] [--num-proc N] [--shard-tokens M] [--rank R --world W]
                                             tokenise the data into sharded token files (what train
                                             would do first); with --world, this machine's share only
    moesaic config CONFIG [key=value ...]    print the resolved, validated config
    moesaic kv-report CONFIG [--context N] [--dtype bf16] [--index-dtype fp4]
                                             per-layer KV-cache bytes at a context length
    moesaic budget CONFIG_OR_RUN_DIR --kv-budget 8GiB [--context 1M] [--flops-budget F] [--types swa,csa]
                                             choose each layer's attention so the KV cache fits the budget
                                             with the least predicted loss; writes the planned config
    moesaic report RUN_DIR [--out DIR]       PNG plots of a run's metrics.jsonl (loss, MoE load, KV; budget plan)
    moesaic export RUN_DIR_OR_CHECKPOINT OUT_DIR [--format hf|native] [--dtype fp32|bf16]
                                             a trained run's model as a transformers (or native) checkpoint
    moesaic generate RUN_DIR_OR_CHECKPOINT --prompt TEXT [--max-new-tokens N --temperature T --top-k K --seed S]
                                             continue a prompt with the run's tokenizer and model (KV cache)
    moesaic eval RUN_DIR_OR_CHECKPOINT [--data SPEC] [--seq-len N] [--json]
                                             validation loss, perplexity, bits per byte, KV bytes per token
    moesaic convert SRC DST [--shard-gib G]  transformers checkpoint <-> moesaic native checkpoint; families
                                             DeepSeek-V4, Qwen3-MoE, Gemma 4, Laguna, ZAYA1, DeepSeek-V3.2,
                                             DeepSeek-V3, GLM-MoE-DSA (direction from SRC: config.json or
                                             config.yaml; family from model_type, or inferred from the model)

CONFIG is a YAML path or the name of a bundled config (``tiny``, ``small_gpu``). Overrides use
omegaconf dot-lists, e.g. ``train.steps=50 model.moe.top_k=2``. Problems with the config, the data
or a checkpoint end the command with one ``moesaic: error: ...`` line and exit status 2. Exit status
75 means the run was stopped by SIGTERM/SIGUSR1 after checkpointing (requeue it with
``checkpoint.resume=auto``); 3 means training diverged after the allowed rollbacks.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

from ..configs import Config, ConfigError, load_config, to_yaml, validate
from ..model.attention.base import describe_layers
from ..model.kv_accounting import INDEX_FORMATS, MAIN_FORMATS, format_report
from .use import add_parsers as add_use_parsers
from .use import non_negative_int, port, positive_float, positive_int

_SUFFIXES = {"k": 2**10, "m": 2**20, "g": 2**30}


def context_length(text: str) -> int:
    """Parse 131072, 128k or 1M (binary multiples, as context lengths are quoted)."""
    t = text.strip().lower()
    try:
        value = int(t[:-1]) * _SUFFIXES[t[-1]] if t[-1:] in _SUFFIXES else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--context '{text}' must be an integer or like 128k / 1M") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--context {text} must be >= 1")
    return value


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config path or bundled config name (tiny, small_gpu)")
    p.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=50 model.moe.top_k=2")


def _epilog() -> str:
    """The bundled configs and the exit statuses, for ``moesaic --help``."""
    from ..configs import CONFIG_DIR
    from ..trainer.loop import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE

    names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
    return (f"bundled configs: {names}\n\nexit status: 0 done; 2 bad input (one 'moesaic: error:' line naming the "
            f"field or file); {DIVERGED_EXIT_CODE} training diverged after the allowed rollbacks (the last good "
            f"checkpoint is intact); {PREEMPTED_EXIT_CODE} stopped by SIGTERM/SIGUSR1 after checkpointing (requeue "
            f"with checkpoint.resume=auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesaic", description=__doc__.split("\n\n")[0], epilog=_epilog(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_args(sub.add_parser("train", help="train or resume a model (checkpoint.resume=auto)"))
    _add_config_args(sub.add_parser("config", help="print the resolved and validated config"))
    prep = sub.add_parser("prepare-data", help="tokenise the data into sharded token files (resumable)")
    _add_config_args(prep)
    prep.add_argument("--num-proc", type=positive_int, default=None, help="tokenising worker processes (data.num_proc)")
    prep.add_argument("--shard-tokens", type=positive_int, default=None,
                      help="tokens per shard file (data.shard_tokens)")
    prep.add_argument("--rank", type=non_negative_int, default=0, help="this machine's index among --world machines")
    prep.add_argument("--world", type=positive_int, default=1,
                      help="machines preparing disjoint file ranges of each source into one data.cache_dir")
    la = sub.add_parser("launch", help="start a multi-process (multi-node) run with torchrun or the DeepSpeed launcher")
    _add_config_args(la)
    la.add_argument("--nproc", type=positive_int, required=True, help="processes (GPUs) per node")
    la.add_argument("--nnodes", type=positive_int, default=1, help="number of nodes (run the same command on each)")
    la.add_argument("--master-addr", default="127.0.0.1", help="address of node 0, the rendezvous host")
    la.add_argument("--master-port", type=port, default=29500)
    la.add_argument("--hostfile", default=None,
                    help="DeepSpeed hostfile ('host slots=N' lines); uses the deepspeed launcher")
    la.add_argument("--max-restarts", type=non_negative_int, default=0,
                    help="torchrun restarts of the worker group after a failure; workers resume from the last "
                         "checkpoint")
    la.add_argument("--dry-run", action="store_true", help="print the topology and command, start nothing")
    sl = sub.add_parser("slurm", help="write a ready sbatch script for this run into its run directory")
    _add_config_args(sl)
    sl.add_argument("--nodes", type=positive_int, required=True)
    sl.add_argument("--gpus-per-node", type=positive_int, required=True)
    sl.add_argument("--time", required=True, help="time limit, e.g. 24:00:00")
    sl.add_argument("--partition", default=None)
    sl.add_argument("--account", default=None)
    sl.add_argument("--cpus-per-task", type=positive_int, default=8, help="CPU cores per task (one task per GPU)")
    sl.add_argument("--master-port", type=port, default=29500, help="rendezvous port on the first node")
    kv = sub.add_parser("kv-report", help="per-layer and total KV-cache bytes for a config at a context length")
    _add_config_args(kv)
    kv.add_argument("--context", type=context_length, default=2**20, help="tokens per sequence (default 1M)")
    kv.add_argument("--dtype", choices=MAIN_FORMATS, default="bf16", help="main KV entry format")
    kv.add_argument("--index-dtype", choices=INDEX_FORMATS, default=None,
                    help="indexer key format (default: as --dtype; the V4 paper format is --dtype fp8 "
                         "--index-dtype fp4)")
    from .budget import add_arguments as add_budget_arguments

    add_budget_arguments(sub.add_parser("budget", help="per-layer attention choices fitting a KV budget (planner)"),
                         context_length)
    report = sub.add_parser("report", help="PNG plots of a run's metrics.jsonl, for reading without wandb")
    report.add_argument("run_dir", help="the run directory (holds metrics.jsonl)")
    report.add_argument("--out", default=None, help="output directory (default: RUN_DIR/report)")
    conv = sub.add_parser("convert", help="convert a checkpoint between transformers' format (DeepSeek-V4, Qwen3-MoE, "
                                          "Gemma 4, Laguna, ZAYA1, DeepSeek-V3.2, DeepSeek-V3, GLM-MoE-DSA) and "
                                          "moesaic's")
    conv.add_argument("src", help="a transformers checkpoint (config.json; family from its model_type) or a native "
                                  "one (config.yaml; family inferred from the model)")
    conv.add_argument("dst", help="new output directory (written atomically; must not exist)")
    conv.add_argument("--shard-gib", type=positive_float, default=5.0,
                      help="max safetensors shard size for transformers output")
    add_use_parsers(sub)
    return parser


def prepare_data_command(cfg: Config, args: argparse.Namespace) -> int:
    """Prepare this machine's share; on one machine (or once all shares exist) print the blocks it gives."""
    from ..trainer.data import prepare_data, prepare_sources, resolve_sources

    if args.num_proc is not None:
        cfg.data.num_proc = args.num_proc
    if args.shard_tokens is not None:
        cfg.data.shard_tokens = args.shard_tokens
    if not 0 <= args.rank < args.world:
        raise ConfigError(f"--rank {args.rank} must be in [0, --world {args.world})")
    validate(cfg)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # progress: trained BPE, resumed, prepared
    start = time.perf_counter()
    _, paths, _ = prepare_sources(cfg, resolve_sources(cfg.data), args.rank, args.world)
    if args.world > 1:
        print(f"prepared share {args.rank} of {args.world} in {time.perf_counter() - start:.1f}s: "
              f"{', '.join(map(str, paths))}")
        return 0
    bundle = prepare_data(cfg)
    print(f"prepared in {time.perf_counter() - start:.1f}s: {bundle.stats} -> {', '.join(map(str, paths))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may follow options (`launch tiny --nproc 2 train.steps=5`): argparse leaves those over.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    from ..model.interop import ConversionError, convert
    from ..trainer.checkpoint import CheckpointError

    if args.command == "report":
        from ..trainer.report import write_report

        try:
            for path in write_report(args.run_dir, args.out):
                print(path)
        except FileNotFoundError as exc:
            print(f"moesaic: error: {exc}", file=sys.stderr)
            return 2
        return 0
    try:
        if args.command == "budget":
            from .budget import budget_command

            return budget_command(args)
        if args.command in ("export", "generate", "eval"):
            from .use import run_command

            return run_command(args)
        if args.command == "convert":
            print(f"{convert(args.src, args.dst, int(args.shard_gib * 2**30))}: {args.dst}")
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(to_yaml(cfg), end="")
            print("# attention per layer (menu entry: kind and the fields that differ from its defaults)")
            print("\n".join(f"#   {line}" for line in describe_layers(cfg.model)))
            return 0
        if args.command == "prepare-data":
            return prepare_data_command(cfg, args)
        if args.command == "launch":
            from .launcher import LaunchSpec, launch

            spec = LaunchSpec(args.config, list(args.overrides), args.nproc, args.nnodes, args.master_addr,
                              args.master_port, args.hostfile, args.max_restarts)
            return launch(spec, cfg, args.dry_run)
        if args.command == "slurm":
            from .launcher import write_sbatch

            print(write_sbatch(cfg, args.config, args.overrides, args.nodes, args.gpus_per_node, args.time,
                               args.partition, args.account, cpus_per_task=args.cpus_per_task,
                               port=args.master_port))
            return 0
        if args.command == "kv-report":
            print(format_report(cfg.model, args.context, args.dtype, args.index_dtype or args.dtype))
            return 0
        from ..trainer.loop import DIVERGED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, TrainingDiverged, train

        try:
            train(cfg)
        except Preempted:
            return PREEMPTED_EXIT_CODE
        except TrainingDiverged as exc:
            print(f"moesaic: error: {exc}", file=sys.stderr)
            return DIVERGED_EXIT_CODE
        return 0
    except (ConfigError, CheckpointError, ConversionError) as exc:
        print(f"moesaic: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
