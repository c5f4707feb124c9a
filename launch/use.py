"""The commands that use a trained run: ``moesaic export``, ``generate`` and ``eval`` (trainer/run_model.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time

import torch

RUN_HELP = "a run directory (its newest complete checkpoint) or a checkpoint directory"


def _bounded(kind: type, low: float, high: float = math.inf, low_open: bool = False):
    """An argparse type: ``kind`` in [low, high] ((low, high] with low_open), else a one-line error."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'an integer' if kind is int else 'a number'}") from None
        if not (low < value if low_open else low <= value) or not value <= high:
            bounds = f"> {low}" if low_open else f">= {low}"
            upper = f" and <= {high}" if high < math.inf else ""
            raise argparse.ArgumentTypeError(f"{text} must be {bounds}{upper}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


positive_int, non_negative_int = _bounded(int, 1), _bounded(int, 0)
positive_float, non_negative_float = _bounded(float, 0, low_open=True), _bounded(float, 0)
port = _bounded(int, 1, 65535)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ex = sub.add_parser("export", help="write a run's model as a transformers (or native) checkpoint")
    ex.add_argument("run", help=RUN_HELP)
    ex.add_argument("out", help="new output directory (written atomically; must not exist)")
    ex.add_argument("--format", choices=("hf", "native"), default="hf",
                    help="hf: transformers' <Family>ForCausalLM (default); native: moesaic's")
    ex.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="weight dtype (default: as trained)")
    ex.add_argument("--shard-gib", type=positive_float, default=5.0, help="max safetensors shard size (hf)")
    gen = sub.add_parser("generate", help="sample text from a run's model with its tokenizer (KV-cached decoding)")
    gen.add_argument("run", help=RUN_HELP)
    gen.add_argument("--prompt", required=True, help="text to continue")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64)
    gen.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=positive_int, default=None, help="sample among the k most likely tokens")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ev = sub.add_parser("eval", help="validation loss, perplexity and bits per byte of a run's model")
    ev.add_argument("run", help=RUN_HELP)
    ev.add_argument("--data", default=None,
                    help="a data.dataset spec (default: the run's data); its validation split is scored")
    ev.add_argument("--seq-len", type=positive_int, default=None, help="tokens per sequence (default: the run's)")
    ev.add_argument("--batch-size", type=positive_int, default=None, help="default: the run's micro-batch size")
    ev.add_argument("--max-batches", type=positive_int, default=None, help="score only the first N batches")
    ev.add_argument("--json", action="store_true", help="print one JSON object")


def run_command(args: argparse.Namespace) -> int:
    from ..trainer import run_model

    if args.command == "export":
        print(run_model.export(args.run, args.out, args.format, args.dtype, int(args.shard_gib * 2**30)))
        return 0
    run = run_model.load_run(args.run)
    if args.command == "eval":
        with contextlib.redirect_stdout(sys.stderr):  # data preparation's messages: stdout holds the result only
            result = run_model.evaluate(run, args.data, args.seq_len, args.batch_size, args.max_batches or 0)
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{result['checkpoint']} (step {result['step']}) on {result['data']}: {result['sequences']} "
                  f"sequences of {result['seq_len']} tokens")
            print(f"val loss {result['val_loss']:.4f} nats, perplexity {result['perplexity']:.2f}, "
                  f"{result['bits_per_byte']:.4f} bits/byte, KV cache {result['kv_bytes_per_token_bf16']:.1f} "
                  f"bytes/token (bf16) at {result['seq_len']} tokens")
        return 0
    from ..trainer.distributed import use_cuda

    device = torch.device("cuda" if use_cuda(args.device) else "cpu")
    tok = run_model.run_tokenizer(run)
    prompt = torch.tensor([tok.encode(args.prompt) or [tok.eos_id]], device=device)  # [1, S0]
    model = run.model.to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(prompt, args.max_new_tokens, args.temperature, args.top_k, gen)
    seconds = time.perf_counter() - start
    print(tok.decode(out[0].tolist()))
    print(f"moesaic: {args.max_new_tokens} new tokens in {seconds:.2f}s ({args.max_new_tokens / seconds:.1f} "
          f"tokens/s, prompt {prompt.shape[1]} tokens, {device.type})", file=sys.stderr)
    return 0
