"""A training run as a single-device model: what ``moesaic export``, ``generate`` and ``eval`` start from.

``RUN_DIR_OR_CHECKPOINT`` is a checkpoint directory (``step_XXXXXXXX``) or a run directory, whose
newest complete checkpoint is taken as ``checkpoint.resume=auto`` would (the ``latest`` pointer
first, damaged ones skipped). The checkpoint is verified against its manifest before anything is
read; routed experts come from the per-expert files by global id (``portable.full_model_state``),
so a run of any expert- or sequence-parallel layout loads into the one-device model.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configs import Config, ConfigError, load_config, validate
from ..model import Transformer
from ..model.kv_accounting import layer_kv_bytes
from . import checkpoint as ckpt_io
from .tokenizer import Tokenizer, load_tokenizer_file

TOKENIZER_FILE = "tokenizer.json"  # the run's tokenizer, saved in every checkpoint
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class TrainedRun:
    checkpoint: Path
    cfg: Config  # the run's config, as saved in the checkpoint
    model: Transformer  # eval mode, on the CPU, in the dtype it was trained in
    step: int


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint ``path`` names: itself, or a run directory's newest intact one (CheckpointError if none)."""
    p = Path(path)
    if not p.exists():
        raise ckpt_io.CheckpointError(f"{path} does not exist (give a run directory or a checkpoint directory)")
    if (p / ckpt_io.MANIFEST).is_file() or ckpt_io.is_step_dir(p):
        ckpt_io.verify(p)
        return p
    root = p / "checkpoints"
    found = ckpt_io.find_resumable(root, log=lambda msg: print(f"moesaic: {msg}", file=sys.stderr))
    if found is None:
        raise ckpt_io.CheckpointError(f"{path} holds no complete checkpoint (looked in {root})")
    return found


def load_run(path: str | Path) -> TrainedRun:
    """The model of a run's checkpoint (see the module doc), with the config it was trained with."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as training does; deepspeed's import then prints nothing
    from ..parallel.portable import full_model_state  # imports deepspeed

    ckpt = find_checkpoint(path)
    cfg = load_config(ckpt / "config.yaml")
    model = Transformer(cfg.model)
    state = full_model_state(ckpt)
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        name = sorted(missing or unexpected)[0]
        raise ckpt_io.CheckpointError(f"checkpoint {ckpt} does not match its config.yaml: tensor '{name}' is "
                                      f"{'missing' if missing else 'unexpected'}")
    model.to(DTYPES[cfg.train.dtype]).load_state_dict(state)
    return TrainedRun(ckpt, cfg, model.eval(), ckpt_io.read_manifest(ckpt)["step"])


def run_tokenizer(run: TrainedRun) -> Tokenizer:
    """The checkpoint's tokenizer.json; for checkpoints written before it was saved there, the run's data config's
    (loaded from, or trained into, its data.cache_dir)."""
    saved = run.checkpoint / TOKENIZER_FILE
    if saved.is_file():
        return load_tokenizer_file(str(saved), run.cfg.model.vocab_size)
    from .data import get_tokenizer, resolve_sources

    return get_tokenizer(run.cfg, resolve_sources(run.cfg.data))


def export(path: str | Path, out: str | Path, fmt: str = "hf", dtype: str | None = None,
           max_shard_bytes: int = 5 * 2**30) -> str:
    """Write a run's model as a transformers checkpoint (``hf``) or a native one; returns a one-line summary.

    A model transformers cannot express is refused (ConfigError naming the field) before anything is written.
    """
    from ..model.interop import export_hf, save_native, to_hf_config

    run = load_run(path)
    model = run.model.to(DTYPES[dtype or run.cfg.train.dtype])
    if Path(out).exists():
        raise ConfigError(f"output directory {out} already exists (export never overwrites)")
    if fmt == "native":
        save_native(model, out)
    else:
        to_hf_config(model.cfg)  # refuse before writing
        with tempfile.TemporaryDirectory(dir=Path(out).resolve().parent) as tmp:
            export_hf(save_native(model, Path(tmp) / "native"), out, max_shard_bytes)
    return f"{run.checkpoint} (step {run.step}) -> {fmt} checkpoint {out}"


def _label_bytes(tok: Tokenizer, labels: torch.Tensor) -> int:
    """UTF-8 bytes of the text the labels [B,S] spell, end-of-text tokens excluded (they stand for no text)."""
    return sum(len(tok.decode([t for t in row if t != tok.eos_id]).encode("utf-8")) for row in labels.tolist())


@torch.no_grad()
def evaluate(run: TrainedRun, data: str | None = None, seq_len: int | None = None, batch_size: int | None = None,
             max_batches: int = 0) -> dict:
    """Loss, perplexity and bits per byte of the run's model on held-out text, and its KV bytes per token.

    The text is the run's own validation split (its data config), or every document of ``data`` (any
    data.dataset spec, no validation split held out), tokenised with the run's tokenizer into
    blocks of ``seq_len`` (default: the run's) + 1. Bits per byte = summed NLL / ln 2 / UTF-8 bytes of the
    labels' text.
    """
    from .data import prepare_data, sequence_shard

    cfg = run.cfg
    if data is not None:
        cfg.data.dataset, cfg.data.sources, cfg.data.val_fraction = data, [], 0.0  # all of it: one split
    if seq_len is not None:
        cfg.data.seq_len = seq_len
    if (run.checkpoint / TOKENIZER_FILE).is_file():
        cfg.data.tokenizer = str(run.checkpoint / TOKENIZER_FILE)
    validate(cfg)
    bundle = prepare_data(cfg)
    size = batch_size or cfg.train.micro_batch_size
    blocks = bundle.val if data is None else bundle.train
    batches = [range(i, min(i + size, len(blocks))) for i in range(0, len(blocks), size)][:max_batches or None]
    if not batches:
        what = "validation sequences" if data is None else "sequences"
        raise ConfigError(f"data '{cfg.data.dataset}' has no {what} of {cfg.data.seq_len + 1} tokens "
                          f"(data.val_fraction={cfg.data.val_fraction}; use more text or a smaller --seq-len)")
    nll, tokens, text_bytes = 0.0, 0, 0
    for rows in batches:
        inputs, labels = sequence_shard(blocks.batch(rows), 0, 1)
        out = run.model(inputs, labels=labels)
        nll += out.lm_loss.double().item() * labels.numel()
        tokens += labels.numel()
        text_bytes += _label_bytes(bundle.tokenizer, labels)
    loss = nll / tokens
    kv = sum(layer.total for layer in layer_kv_bytes(cfg.model, cfg.data.seq_len, "bf16"))
    return {"checkpoint": str(run.checkpoint), "step": run.step, "data": cfg.data.dataset,
            "seq_len": cfg.data.seq_len, "sequences": sum(map(len, batches)), "tokens": tokens, "val_loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": nll / math.log(2) / max(text_bytes, 1),
            "kv_bytes_per_token_bf16": kv / cfg.data.seq_len}
