"""Data pipeline: sources -> tokenizer -> prepared token shards -> blocks of ``seq_len + 1`` tokens.

``prepare_data(cfg)`` is the entry point (docs/DESIGN.md, "Data contract"): it prepares whatever
part of the sources is not prepared yet (``data_prep``: streamed, tokenised in ``data.num_proc``
workers, sharded, resumable) and memory-maps the shards. Every stage is keyed by a hash of what it
depends on, so a second run (or another rank) reads the cache, and any change to the sources,
tokenizer or ``val_fraction`` prepares again; ``seq_len`` and ``max_train_tokens`` only change how
the shards are cut into blocks. Blocks are the token stream of a split (documents joined by EOS,
in corpus order) cut into consecutive ``seq_len + 1`` pieces, the remainder dropped.
``mixture.MixtureSampler`` and ``rank_slice`` turn a global sample position into the blocks one
data-parallel rank reads, independently of the world size.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from moesaic.configs import Config, ConfigError, DataConfig

from .data_prep import (
    Prepared,
    check_documents,
    digest,
    load_prepared,
    locked,
    prepare_source,
    tokenizer_sample,
)
from .mixture import Mixture, MixtureSampler
from .sources import Source, resolve_source
from .tokenizer import Tokenizer, check_bpe_vocab, load_tokenizer_file, read_tokenizer, train_bpe

log = logging.getLogger(__name__)

COUNT_CHUNK = 2**22  # tokens per bincount when counting part of a shard


def resolve_sources(d: DataConfig) -> list[tuple[Source, float]]:
    """``data.sources`` (a weighted mixture), or ``data.dataset`` as the only source."""
    if not d.sources:
        return [(resolve_source(d, d.dataset, d.text_field, "data"), 1.0)]
    return [(resolve_source(d, s.dataset, s.text_field, f"data.sources[{i}]"), s.weight)
            for i, s in enumerate(d.sources)]


# ---------------------------------------------------------------------------------------------
# Tokenizer


def get_tokenizer(cfg: Config, sources: Sequence[tuple[Source, float]]) -> Tokenizer:
    """The tokenizer.json of ``data.tokenizer``, or a BPE trained on a bounded sample (cached by hash).

    The sample is the first ``data.tokenizer_sample_bytes`` of training text, shared among the
    sources by weight: memory and time do not grow with the corpus.
    """
    d = cfg.data
    if d.tokenizer != "bpe":
        return load_tokenizer_file(d.tokenizer, cfg.model.vocab_size)
    check_bpe_vocab(cfg.model.vocab_size)
    total = sum(w for _, w in sources)
    # val_fraction decides which documents the BPE sees, so it is part of the key.
    key = digest({"recipe": "byte-level-bpe-2", "sources": [[s.fingerprint, w / total] for s, w in sources],
                  "vocab_size": cfg.model.vocab_size, "val_fraction": d.val_fraction,
                  "sample_bytes": d.tokenizer_sample_bytes})
    path = Path(d.cache_dir).expanduser() / "tokenizers" / f"bpe-{key}.json"
    with locked(path):
        if not path.is_file():
            start = time.perf_counter()
            texts = [t for s, w in sources for t in tokenizer_sample(s, d.val_fraction,
                                                                       d.tokenizer_sample_bytes * w / total)]
            train_bpe(texts, cfg.model.vocab_size).save(path)
            log.info("trained a byte-level BPE (vocab %d) on %d documents in %.1fs -> %s",
                     cfg.model.vocab_size, len(texts), time.perf_counter() - start, path)
    return read_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Prepared token streams and blocks


class TokenStream:
    """One split of a prepared source: its shard files, memory-mapped, read as one flat token sequence."""

    def __init__(self, prepared: Prepared, split: str) -> None:
        entries = prepared.shards[split]
        self.dtype = np.dtype(prepared.dtype)
        self.shards = [np.memmap(prepared.path / f"{e['name']}.bin", dtype=self.dtype, mode="r") for e in entries]
        self.starts = np.concatenate([[0], np.cumsum([e["tokens"] for e in entries], dtype=np.int64)])
        self.count_files = [prepared.path / f"{e['name']}.npz" for e in entries]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop), across shard boundaries (a view when inside one shard)."""
        i = int(np.searchsorted(self.starts, start, side="right")) - 1
        parts = []
        while start < stop:
            take = min(stop, int(self.starts[i + 1])) - start
            local = start - int(self.starts[i])
            parts.append(self.shards[i][local:local + take])
            start += take
            i += 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts) if parts else np.zeros(0, self.dtype)

    def counts(self, stop: int, vocab_size: int) -> np.ndarray:
        """Unigram counts of tokens [0, stop): from the shards' saved counts, less or plus the shorter
        part of the shard that ``stop`` cuts (usually the last block's remainder), counted in chunks."""
        total = np.zeros(vocab_size, dtype=np.int64)
        for i, path in enumerate(self.count_files):
            start, end = int(self.starts[i]), int(self.starts[i + 1])
            if start >= stop:
                break
            if stop - start < end - stop:
                total += self.count_range(start, stop, vocab_size)
            else:
                total += np.load(path)["counts"][:vocab_size] - self.count_range(min(stop, end), end, vocab_size)
        return total

    def count_range(self, start: int, stop: int, vocab_size: int) -> np.ndarray:
        total = np.zeros(vocab_size, dtype=np.int64)
        for pos in range(start, stop, COUNT_CHUNK):  # bincount copies to int64: keep the copies small
            total += np.bincount(self.read(pos, min(stop, pos + COUNT_CHUNK)), minlength=vocab_size)
        return total

    def strided(self, step: int, count: int) -> np.ndarray:
        """Tokens at positions 0, step, 2 step, ... (``count`` of them)."""
        parts = [shard[(-int(start)) % step::step] for shard, start in zip(self.shards, self.starts)]
        return np.concatenate(parts)[:count] if parts else np.zeros(0, self.dtype)


class TokenBlocks:
    """Blocks of ``seq_len + 1`` token ids (inputs = block[:-1], labels = block[1:]) cut from token streams.

    Block ids run over the streams in order (stream s holds ``sizes[s]`` blocks); ``order``, when
    given, maps positions to block ids (the interleaved validation blocks of a mixture).
    """

    def __init__(self, streams: Sequence[TokenStream], sizes: Sequence[int], seq_len: int, dtype: np.dtype,
                 order: np.ndarray | None = None) -> None:
        self.streams, self.sizes, self.seq_len, self.dtype = list(streams), list(sizes), seq_len, dtype
        self.order = order
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes, dtype=np.int64)])

    def __len__(self) -> int:
        return len(self.order) if self.order is not None else int(self.offsets[-1])

    def block(self, i: int) -> np.ndarray:
        if self.order is not None:
            i = int(self.order[i])
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        n = self.seq_len + 1
        b = i - int(self.offsets[s])
        return self.streams[s].read(b * n, (b + 1) * n)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.block(i).astype(np.int64))

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """Blocks ``indices`` stacked as LongTensor[len(indices), seq_len + 1]."""
        rows = [self.block(int(i)) for i in indices]
        return torch.from_numpy(np.stack(rows).astype(np.int64) if rows else np.zeros((0, self.seq_len + 1), np.int64))

    @property
    def blocks(self) -> np.ndarray:
        """All blocks as one array [n, seq_len + 1]: a view of a one-shard corpus, else a copy (small corpora)."""
        n, width = len(self), self.seq_len + 1
        if self.order is None and len(self.streams) == 1 and len(self.streams[0].shards) == 1:
            return self.streams[0].shards[0][:n * width].reshape(n, width)
        return np.stack([self.block(i) for i in range(n)]) if n else np.zeros((0, width), self.dtype)


def unigram_log_probs(train_counts: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """log p(t) of the unigram baseline: per source (count + 1) / (tokens + vocab), mixed by weight."""
    total = sum(weights)
    return np.log(sum(w / total * (c + 1.0) / (c.sum() + len(c)) for c, w in zip(train_counts, weights)))


def unigram_entropy(train: np.ndarray, evaluate: np.ndarray, vocab_size: int) -> float:
    """The loss (nats/token) of a context-free model: the baseline a trained LM must beat.

    p(t) = (count of t in all train-block tokens + 1) / (train-block tokens + vocab_size), i.e. a
    unigram model with add-one smoothing over the tokenizer's vocabulary; returned is the mean of
    -log p(t) over the label positions (``block[1:]``) of ``evaluate``, so it is directly
    comparable with the model's mean LM loss on those blocks. A mixture mixes the sources' p by weight.
    """
    log_p = unigram_log_probs([np.bincount(train.ravel(), minlength=vocab_size)], [1.0])
    return float(-log_p[evaluate[:, 1:].ravel()].mean())


def label_counts(stream: TokenStream, blocks: int, seq_len: int, vocab_size: int) -> np.ndarray:
    """Unigram counts of the label positions (all but each block's first token) of the first ``blocks`` blocks."""
    n = seq_len + 1
    return (stream.counts(blocks * n, vocab_size)
            - np.bincount(stream.strided(n, blocks), minlength=vocab_size))


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass
class DataBundle:
    train: TokenBlocks  # the sources' blocks, source after source (ids for MixtureSampler)
    val: TokenBlocks  # empty when data.val_fraction == 0; a mixture's interleaved by weight
    tokenizer: Tokenizer
    # Unigram baseline in nats/token (see unigram_entropy): on val, or on train when there is no val.
    unigram_entropy: float
    stats: dict[str, int]  # {train,val}_{documents,tokens,blocks}; tokens = those kept in blocks
    from_cache: bool  # every shard was read from disk, nothing was tokenised
    path: Path  # the prepared folder of the first source (shards and manifests)
    weights: list[float]  # of the sources, normalised

    def sampler(self, seed: int) -> MixtureSampler:
        return MixtureSampler(self.train.sizes, self.weights, seed)


def prepare_sources(cfg: Config, sources: Sequence[tuple[Source, float]], rank: int = 0,
                    world: int = 1) -> tuple[Tokenizer, list[Path], bool]:
    """Train or load the tokenizer and prepare this machine's part of every source (all of it if world is 1).

    Returns the tokenizer, each source's folder and whether anything was tokenised.
    """
    d = cfg.data
    tokenizer = get_tokenizer(cfg, sources)
    cache = Path(d.cache_dir).expanduser()
    done = [prepare_source(s, tokenizer, cache, d.val_fraction, d.num_proc, d.shard_tokens, rank, world)
            for s, _ in sources]
    return tokenizer, [path for path, _ in done], any(built for _, built in done)


def prepare_data(cfg: Config) -> DataBundle:
    """Prepare what is missing of ``cfg.data`` and memory-map it as train/val blocks.

    Safe to call from every rank at once: preparation runs under file locks, so one rank works
    while the others wait and then read the shards; every file appears atomically.
    """
    d = cfg.data
    sources = resolve_sources(d)
    tokenizer, paths, built = prepare_sources(cfg, sources)
    n = d.seq_len + 1
    weights = [w / sum(w for _, w in sources) for _, w in sources]
    train, val, train_counts, documents = [], [], [], {"train": 0, "val": 0}
    for (source, _), path in zip(sources, paths):
        prepared = load_prepared(path, source.units)
        assert prepared is not None, f"{path} is incomplete after preparing it"
        check_documents(source, prepared.rows, sum(prepared.documents.values()))
        streams = TokenStream(prepared, "train"), TokenStream(prepared, "val")
        cap = d.max_train_tokens // n if d.max_train_tokens > 0 else len(streams[0]) // n
        train.append((streams[0], min(len(streams[0]) // n, cap)))
        val.append((streams[1], len(streams[1]) // n))
        check_blocks(d, source, prepared, train[-1][1], val[-1][1])
        train_counts.append(streams[0].counts(train[-1][1] * n, tokenizer.vocab_size))
        documents = {s: documents[s] + prepared.documents[s] for s in documents}
    dtype = train[0][0].dtype
    train_blocks = TokenBlocks([s for s, _ in train], [k for _, k in train], d.seq_len, dtype)
    val_blocks = mixed_val(val, weights, d.seq_len, dtype)
    log_p = unigram_log_probs(train_counts, weights)
    if len(val_blocks):
        taken = Mixture(weights).counts(np.array([len(val_blocks)]))[0] if len(val) > 1 else [len(val_blocks)]
        labels = sum(label_counts(s, int(k), d.seq_len, tokenizer.vocab_size) for (s, _), k in zip(val, taken))
    else:
        labels = sum(label_counts(s, k, d.seq_len, tokenizer.vocab_size) for s, k in train)
    stats = {"train_documents": documents["train"], "val_documents": documents["val"],
             "train_tokens": len(train_blocks) * n, "val_tokens": len(val_blocks) * n,
             "train_blocks": len(train_blocks), "val_blocks": len(val_blocks)}
    return DataBundle(train=train_blocks, val=val_blocks, tokenizer=tokenizer,
                      unigram_entropy=float(-(labels * log_p).sum() / labels.sum()), stats=stats,
                      from_cache=not built, path=paths[0], weights=weights)


def mixed_val(val: list[tuple[TokenStream, int]], weights: list[float], seq_len: int, dtype: np.dtype) -> TokenBlocks:
    """One source's val blocks in order; a mixture's interleaved by weight, as long as no source repeats."""
    sizes = [k for _, k in val]
    if len(val) == 1:
        return TokenBlocks([val[0][0]], sizes, seq_len, dtype)
    mixture = Mixture(weights)
    length = int(min(k / w for k, w in zip(sizes, weights)))
    while length and (mixture.counts(np.array([length]))[0] > sizes).any():
        length -= 1
    counts = mixture.counts(np.arange(length + 1))
    source = np.argmax(np.diff(counts, axis=0), axis=1)
    order = np.concatenate([[0], np.cumsum(sizes)[:-1]])[source] + counts[np.arange(length), source]
    return TokenBlocks([s for s, _ in val], sizes, seq_len, dtype, order=order)


def check_blocks(d: DataConfig, source: Source, prepared: Prepared, train_blocks: int, val_blocks: int) -> None:
    """One line when a source has no training block, or no validation block although one is asked for."""
    block = d.seq_len + 1
    docs = prepared.documents
    if train_blocks == 0:
        raise source.error(f"gives fewer training tokens than one block of data.seq_len+1={block} "
                           f"({docs['train']} documents): lower data.seq_len or add text")
    if d.val_fraction > 0 and val_blocks == 0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} holds out {docs['val']} of the "
                          f"{docs['train'] + docs['val']} documents of {source.where}.dataset='{source.spec}', "
                          f"fewer tokens than one block of data.seq_len+1={block}: raise data.val_fraction, "
                          "lower data.seq_len or set data.val_fraction=0")


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
