"""Sample order: which block every global sample position reads, for one source or a weighted mixture.

Everything here is a function of (seed, global position) only, so any rank can compute any
position, a run resumes at any position by asking for it, and the world size never matters.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Up to this many samples an epoch is a numpy permutation (8 bytes per sample); beyond it a seeded
# Feistel bijection computes positions on demand, so the order needs no memory at any corpus size.
PERMUTATION_LIMIT = 2**24
FEISTEL_ROUNDS = 4


def feistel(x: np.ndarray, n: int, key: int) -> np.ndarray:
    """A seeded bijection of [0, n) applied to ``x``: a balanced Feistel network with cycle walking."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = np.uint64((1 << half) - 1)

    def rounds(v: np.ndarray) -> np.ndarray:
        left, right = v >> np.uint64(half), v & mask
        for r in range(FEISTEL_ROUNDS):
            h = (right + np.uint64((key * FEISTEL_ROUNDS + r) & 0xFFFFFFFF)) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(29)
            left, right = right, left ^ (h & mask)
        return (left << np.uint64(half)) | right

    y = rounds(x.astype(np.uint64))
    while (out := y >= n).any():  # the network permutes [0, 4^half); walk values outside [0, n) back in
        y[out] = rounds(y[out])
    return y.astype(np.int64)


class GlobalSampler:
    """Sample id at every global position: epoch e = p // N visits ``perm_e`` seeded by (seed, e[, stream]).

    Permutations come from numpy's PCG64 (reproducible for a given numpy version) up to
    PERMUTATION_LIMIT samples, and from a seeded Feistel bijection beyond. ``stream`` tells apart
    the sources of a mixture; stream 0 is the single-source order.
    """

    def __init__(self, num_samples: int, seed: int, stream: int = 0) -> None:
        if num_samples <= 0 or seed < 0:
            raise ValueError(f"GlobalSampler needs num_samples > 0 and seed >= 0, got {num_samples}, {seed}")
        self.num_samples, self.seed, self.stream = num_samples, seed, stream
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def _entropy(self, epoch: int) -> list[int]:
        return [self.seed, epoch] + ([self.stream] if self.stream else [])

    def permutation(self, epoch: int) -> np.ndarray:
        """perm_epoch, cached: consecutive calls mostly stay inside one epoch."""
        if epoch != self._epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(self._entropy(epoch))))
            self._perm, self._epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def _take(self, epoch: int, offset: int, take: int) -> np.ndarray:
        if self.num_samples <= PERMUTATION_LIMIT:
            return self.permutation(epoch)[offset:offset + take]
        key = int(np.random.SeedSequence(self._entropy(epoch)).generate_state(1)[0])
        return feistel(np.arange(offset, offset + take, dtype=np.uint64), self.num_samples, key)

    def indices(self, start: int, count: int) -> list[int]:
        """Sample ids at global positions [start, start + count)."""
        out: list[int] = []
        pos, end = start, start + count
        while pos < end:
            epoch, offset = divmod(pos, self.num_samples)
            take = min(end - pos, self.num_samples - offset)
            out.extend(self._take(epoch, offset, take).tolist())
            pos += take
        return out


class Mixture:
    """Deterministic weighted interleaving: of positions [0, p), source s gets floor(C_s p) - floor(C_{s-1} p).

    C_s is the cumulative normalised weight, so every prefix of the order holds each source within
    one sample of its weight, and both the counts and the source of any position are closed-form
    (the same greedy interleaving Megatron's blended datasets build as an index, without the index).
    """

    def __init__(self, weights: Sequence[float]) -> None:
        w = np.asarray(weights, dtype=np.float64)
        self.cumulative = np.cumsum(w / w.sum())
        self.cumulative[-1] = 1.0  # so that the counts of all sources add up to p exactly

    def counts(self, positions: np.ndarray) -> np.ndarray:
        """[len(positions), S]: positions < p that belong to each source, for each p."""
        edges = np.floor(np.outer(np.asarray(positions, dtype=np.float64), self.cumulative)).astype(np.int64)
        return np.diff(edges, axis=1, prepend=0)


class MixtureSampler:
    """Global sample ids of a mixture: source s's blocks are ids offsets[s] .. offsets[s] + sizes[s] - 1.

    Position p belongs to the source the Mixture gives it and reads that source's n-th sample, n
    being how many earlier positions belong to it; each source has its own GlobalSampler (a source
    drawn more often than it has blocks starts new epochs sooner). One source gives GlobalSampler's order.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int) -> None:
        self.mixture = Mixture(weights)
        self.samplers = [GlobalSampler(n, seed, stream=s) for s, n in enumerate(sizes)]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def drawn(self, position: int) -> list[int]:
        """Samples drawn from each source by positions [0, position)."""
        return self.mixture.counts(np.array([position]))[0].tolist()

    def indices(self, start: int, count: int) -> list[int]:
        """Sample ids at global positions [start, start + count)."""
        counts = self.mixture.counts(np.arange(start, start + count + 1))
        source = np.argmax(np.diff(counts, axis=0), axis=1)
        out = np.empty(count, dtype=np.int64)
        for s, sampler in enumerate(self.samplers):
            mine = source == s
            if mine.any():
                out[mine] = self.offsets[s] + np.asarray(sampler.indices(int(counts[0, s]), int(mine.sum())))
        return out.tolist()
