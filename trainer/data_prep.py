"""Preparation: a source's documents -> train/val split -> token ids in N workers -> sharded token files.

Documents are streamed in corpus order, batched, tokenised (and assigned to a split by the hash of
their text) in ``num_proc`` worker processes, and the results are written back in the order read,
so the shards do not depend on the number of workers. Memory holds a few batches in flight, never
the corpus. One prepared source lives in ``cache_dir/tokens/<key>/`` (key: the source's
fingerprint, the tokenizer and ``data.val_fraction``; not ``seq_len``, blocks are cut at load time):

    {split}-{a}-{b}-{k}.bin    token ids of split train|val, each document followed by EOS (uint16/32)
    {split}-{a}-{b}-{k}.npz    doc_ends (cumulative, int64) and counts (unigram counts of the shard)
    range-{a}-{b}.json         manifest of source units (files) [a, b): rows read, shards (tokens,
                               documents, sha256), complete

Shard k of a range closes at the first document end where its train tokens reach ``shard_tokens``
(the val shard closes with it) and the manifest is rewritten after it, so a killed preparation
resumes after the last closed shard and produces the same files. Machines preparing disjoint unit
ranges (``rank`` of ``world``) write into one directory; the source is complete once the complete
ranges tile all its units, and its token stream is the ranges' shards in order.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from filelock import FileLock

from moesaic.configs import ConfigError

from .sources import Source
from .tokenizer import Tokenizer, atomic_open

log = logging.getLogger(__name__)

PREP_FORMAT = 1  # bump when the shard layout or the tokenisation recipe changes
SPLITS = ("train", "val")
BATCH_DOCS = 512  # documents per worker task ...
BATCH_CHARS = 2**20  # ... or this many characters, whichever comes first
IN_FLIGHT_PER_WORKER = 2  # batches queued per worker: bounds memory, keeps workers busy


def unit_hash(text: str) -> float:
    """A stable hash of ``text`` in [0, 1), the same in every process and Python version."""
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def is_val_document(text: str, val_fraction: float) -> bool:
    """Hold out the documents whose text hash falls below ``val_fraction``.

    Hashing the text (not the position) keeps each document on its side when others are added or
    reordered, sends exact duplicates to the same side, and needs no pass over the whole corpus.
    """
    return unit_hash(text) < val_fraction


def token_dtype(vocab_size: int) -> type:
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise work on one cache entry across processes (ranks, machines) sharing ``data.cache_dir``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


# ---------------------------------------------------------------------------------------------
# Reading and tokenising


@dataclass
class Batch:
    texts: list[str]
    ends: list[int]  # rows of the range read once each document is read (resume points)


class Reader:
    """Non-empty documents of units [a, b) in batches, skipping the first ``skip`` rows (a resume)."""

    def __init__(self, source: Source, a: int, b: int, skip: int, val_fraction: float) -> None:
        self.source, self.a, self.b, self.skip, self.val_fraction = source, a, b, skip, val_fraction
        self.rows = 0  # rows read so far, empty ones included

    def __iter__(self) -> Iterator[Batch]:
        texts: list[str] = []
        ends: list[int] = []
        chars = 0
        budget = self.source.byte_budget
        read = {False: 0, True: 0}  # bytes of train and of val text
        for value in self.source.read(self.a, self.b):
            self.rows += 1
            if value is not None and not isinstance(value, str):
                raise self.source.error(f"holds {type(value).__name__} values where text was expected "
                                        f"(check {self.source.where}.text_field)")
            if not value or not value.strip():
                continue
            if self.rows > self.skip:
                texts.append(value)
                ends.append(self.rows)
                chars += len(value)
                if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                    yield Batch(texts, ends)
                    texts, ends, chars = [], [], 0
            if budget:  # a capped stream: stop once the train text reaches the budget and val has a document
                held = is_val_document(value, self.val_fraction)
                read[held] += len(value.encode())
                if read[False] >= budget and (read[True] or not self.val_fraction):
                    break
        if texts:
            yield Batch(texts, ends)


@dataclass
class Encoded:
    tokens: np.ndarray  # every document's ids as the tokenizer frames it, ending with EOS, in read order
    lengths: np.ndarray  # tokens per document, EOS included
    is_val: np.ndarray  # bool per document


def encode(tokenizer: Tokenizer, texts: list[str], val_fraction: float) -> Encoded:
    ids = tokenizer.encode_batch(texts)  # each ends with EOS
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype=token_dtype(tokenizer.vocab_size), count=int(lengths.sum()))
    is_val = np.fromiter((is_val_document(t, val_fraction) for t in texts), dtype=bool, count=len(texts))
    return Encoded(tokens, lengths, is_val)


_worker: tuple[Tokenizer, float] | None = None


def _init_worker(tokenizer: Tokenizer, val_fraction: float) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker; workers are the parallelism
    _worker = (tokenizer, val_fraction)


def _encode_in_worker(texts: list[str]) -> Encoded:
    assert _worker is not None
    return encode(_worker[0], texts, _worker[1])


def encoded(batches: Iterator[Batch], tokenizer: Tokenizer, val_fraction: float,
            num_proc: int) -> Iterator[tuple[Batch, Encoded]]:
    """Encode batches in ``num_proc`` processes (1: in this one), yielded in input order.

    ``datasets``' own ``map(num_proc=...)`` would need an Arrow copy of the corpus first and, being
    memory-mapped, grows resident memory with it; a bounded window of futures needs neither.
    """
    if num_proc == 1:
        for batch in batches:
            yield batch, encode(tokenizer, batch.texts, val_fraction)
        return
    context = multiprocessing.get_context("fork")  # workers inherit the tokenizer; no re-import
    with ProcessPoolExecutor(num_proc, mp_context=context, initializer=_init_worker,
                             initargs=(tokenizer, val_fraction)) as pool:
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.submit(_encode_in_worker, batch.texts)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * num_proc:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()


# ---------------------------------------------------------------------------------------------
# Writing shards


@dataclass
class ShardWriter:
    """Appends one split's documents to the open shard file; ``close`` seals it under its final name."""

    out: Path
    tmp_name: str  # of the open shard, unique per split and range
    vocab_size: int
    tokens: int = 0
    file: Any = None
    sha: Any = None
    lengths: list[np.ndarray] = field(default_factory=list)
    counts: np.ndarray | None = None

    def append(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        if self.file is None:
            self.file = open(self.out / self.tmp_name, "wb")  # sealed (closed and renamed) by close()
            self.sha, self.counts = hashlib.sha256(), np.zeros(self.vocab_size, dtype=np.int64)
        data = tokens.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.lengths.append(lengths)
        self.counts += np.bincount(tokens, minlength=self.vocab_size)
        self.tokens += len(tokens)

    def close(self, name: str) -> dict[str, Any] | None:
        """Seal the open shard as ``name`` (.bin and .npz); None when it holds no document."""
        if self.file is None:
            return None
        self.file.close()
        lengths = np.concatenate(self.lengths)
        with atomic_open(self.out / f"{name}.npz", "wb") as f:
            np.savez(f, doc_ends=np.cumsum(lengths), counts=self.counts)
        os.replace(self.file.name, self.out / f"{name}.bin")
        entry = {"name": name, "tokens": self.tokens, "documents": len(lengths), "sha256": self.sha.hexdigest()}
        self.tokens, self.file, self.lengths = 0, None, []
        return entry


def range_name(a: int, b: int) -> str:
    return f"{a:05d}-{b:05d}"


def fresh_manifest(a: int, b: int, dtype: type) -> dict[str, Any]:
    return {"format": PREP_FORMAT, "range": [a, b], "dtype": np.dtype(dtype).name, "rows": 0, "closed": 0,
            "complete": False, "shards": {s: [] for s in SPLITS}, "documents": {s: 0 for s in SPLITS}}


def verified_manifest(path: Path, a: int, b: int, dtype: type) -> dict[str, Any]:
    """The manifest at ``path`` if every shard it lists is intact (size and SHA-256), else a fresh one."""
    if not path.is_file():
        return fresh_manifest(a, b, dtype)
    state = json.loads(path.read_text())
    itemsize = np.dtype(state["dtype"]).itemsize
    for entry in chain.from_iterable(state["shards"].values()):
        shard = path.parent / f"{entry['name']}.bin"
        ok = shard.is_file() and shard.stat().st_size == entry["tokens"] * itemsize
        if not ok or file_sha256(shard) != entry["sha256"]:
            log.warning("shard %s is missing or damaged: preparing units %s again", shard, range_name(a, b))
            return fresh_manifest(a, b, dtype)
    return state


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            sha.update(chunk)
    return sha.hexdigest()


def prepare_range(source: Source, tokenizer: Tokenizer, out: Path, val_fraction: float, num_proc: int,
                  shard_tokens: int, a: int, b: int) -> bool:
    """Prepare units [a, b) of ``source`` into ``out``, resuming a killed run; False if already complete."""
    path = out / f"range-{range_name(a, b)}.json"
    with locked(path):
        state = verified_manifest(path, a, b, token_dtype(tokenizer.vocab_size))
        if state["complete"]:
            return False
        if state["rows"]:
            log.info("resuming %s units %s after %d rows", source.spec, range_name(a, b), state["rows"])
        writers = {s: ShardWriter(out, f".{s}-{range_name(a, b)}.open.tmp", tokenizer.vocab_size) for s in SPLITS}

        def close(rows: int, complete: bool) -> None:
            k = state["closed"]
            for split, writer in writers.items():
                state["documents"][split] += sum(map(len, writer.lengths))
                entry = writer.close(f"{split}-{range_name(a, b)}-{k:05d}")
                if entry is not None:
                    state["shards"][split].append(entry)
            state.update(rows=rows, closed=k + 1, complete=complete)
            with atomic_open(path) as f:  # after the shards: a listed shard is always sealed
                json.dump(state, f, indent=1)

        reader = Reader(source, a, b, state["rows"], val_fraction)
        train, val = writers["train"], writers["val"]
        for batch, enc in encoded(iter(reader), tokenizer, val_fraction, num_proc):
            offsets = np.concatenate([[0], np.cumsum(enc.lengths)])
            start, n = 0, len(enc.lengths)
            while start < n:
                train_lengths = np.where(enc.is_val[start:], 0, enc.lengths[start:])
                full = np.flatnonzero(train.tokens + np.cumsum(train_lengths) >= shard_tokens)
                stop = start + int(full[0]) + 1 if len(full) else n
                tokens, lengths = enc.tokens[offsets[start]:offsets[stop]], enc.lengths[start:stop]
                held_out = enc.is_val[start:stop]
                mask = np.repeat(held_out, lengths)
                train.append(tokens[~mask], lengths[~held_out])
                val.append(tokens[mask], lengths[held_out])
                if len(full):
                    close(batch.ends[stop - 1], complete=False)
                start = stop
        close(reader.rows, complete=True)
        log.info("prepared %s units %s: %s documents -> %s", source.spec, range_name(a, b), state["documents"], out)
        return True


def check_documents(source: Source, rows: int, documents: int) -> None:
    if not rows:
        raise source.error("has no documents")
    if not documents:
        raise source.error(f"has no text: all {rows} documents are empty")


def tokenizer_sample(source: Source, val_fraction: float, max_bytes: float) -> list[str]:
    """The first training documents of ``source``, in corpus order, until they hold ``max_bytes`` of UTF-8."""
    reader = Reader(source, 0, source.units, 0, val_fraction)
    texts: list[str] = []
    taken = documents = 0
    for batch in reader:
        documents += len(batch.texts)
        for text in batch.texts:
            if not is_val_document(text, val_fraction):
                texts.append(text)
                taken += len(text.encode())
                if taken >= max_bytes:
                    return texts
    check_documents(source, reader.rows, documents)
    return texts


# ---------------------------------------------------------------------------------------------
# Whole sources


@dataclass
class Prepared:
    """A completely prepared source: shard entries per split in corpus order, and its row/document counts."""

    path: Path
    dtype: str
    shards: dict[str, list[dict[str, Any]]]
    rows: int
    documents: dict[str, int]


def unit_range(units: int, rank: int, world: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share of ``units`` (empty when there are more ranks than units)."""
    return rank * units // world, (rank + 1) * units // world


def complete_ranges(out: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text()) for p in sorted(out.glob("range-*.json"))]
    return sorted((m for m in found if m["complete"]), key=lambda m: m["range"])


def missing_ranges(out: Path, units: int) -> list[tuple[int, int]]:
    """The unit ranges no complete manifest covers; one line if complete ranges overlap (mixed world sizes)."""
    gaps, pos = [], 0
    for m in complete_ranges(out):
        a, b = m["range"]
        if a < pos:
            raise ConfigError(f"prepared ranges overlap in {out} (units {a}-{b} after {pos}): prepared with "
                              "different --world values; delete the folder and prepare again")
        if a > pos:
            gaps.append((pos, a))
        pos = b
    if pos < units:
        gaps.append((pos, units))
    return gaps


def load_prepared(out: Path, units: int) -> Prepared | None:
    """The prepared source in ``out``, or None while some units are not prepared yet."""
    if missing_ranges(out, units):
        return None
    ranges = complete_ranges(out)
    return Prepared(out, ranges[0]["dtype"], {s: [e for m in ranges for e in m["shards"][s]] for s in SPLITS},
                    sum(m["rows"] for m in ranges), {s: sum(m["documents"][s] for m in ranges) for s in SPLITS})


def prepare_source(source: Source, tokenizer: Tokenizer, cache: Path, val_fraction: float, num_proc: int,
                   shard_tokens: int, rank: int = 0, world: int = 1) -> tuple[Path, bool]:
    """Prepare this machine's part of ``source`` (all missing units when ``world`` is 1).

    Returns the source's folder and whether anything was tokenised.
    """
    out = cache / "tokens" / digest({"format": PREP_FORMAT, "source": source.fingerprint,
                                     "tokenizer": tokenizer.fingerprint, "val_fraction": val_fraction})
    out.mkdir(parents=True, exist_ok=True)
    if world > 1 and source.byte_budget:
        raise ConfigError(f"{source.where}.dataset='{source.spec}' is a capped hub stream: prepare it on one "
                          "machine (--world 1)")
    todo = missing_ranges(out, source.units) if world == 1 else [unit_range(source.units, rank, world)]
    built = [prepare_range(source, tokenizer, out, val_fraction, num_proc, shard_tokens, a, b)
             for a, b in todo if b > a]
    return out, any(built)
