"""The lightning indexer's ReLU, head-weighted sum, causal mask and top-k on CPU as one compiled pass
(numba; ``Indexer.select`` imports this module on first CPU use).

torch's CPU top-k costs ~12 ns per candidate (a partial sort of every row), several times the score
GEMM itself, and the ReLU, head sum, mask and tie check each make one more pass over the
[queries, entries] block. Here each row is scored into a buffer, a cheap lower bound of its k-th
score discards most entries, and only the rest are ranked, by the same (score, entry) integer keys
as the torch path, so both pick identically.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit
def _largest_first(keys: np.ndarray, count: int, k: int) -> None:
    """Hoare selection: move the k largest of keys[:count] (distinct) to keys[:k], in no order."""
    lo, hi = 0, count - 1
    while lo < hi:
        pivot = keys[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while keys[i] > pivot:
                i += 1
            while keys[j] < pivot:
                j -= 1
            if i <= j:
                keys[i], keys[j] = keys[j], keys[i]
                i += 1
                j -= 1
        if k - 1 <= j:
            hi = j
        elif k - 1 >= i:
            lo = i
        else:
            return


@numba.njit(cache=True)
def relu_weighted_topk(dots: np.ndarray, weights: np.ndarray, limit: np.ndarray, out_entries: np.ndarray,
                       out_scores: np.ndarray) -> None:
    """Per row r: score_j = sum_h weights[r, h] * max(dots[r, h, j], 0) for entries j < limit[r], and the k
    best (score descending, entry ascending) into out_entries/out_scores [rows, k], -1 / -inf padded.

    dots [rows, H, n] fp32, weights [rows, H] fp32, limit [rows] int64.
    """
    rows, heads, n = dots.shape
    k = out_entries.shape[1]
    zero = np.float32(0.0)
    row = np.empty(max(n, 1), dtype=np.float32)  # one row's scores, reused by every row
    bits = row.view(np.int32)
    keys = np.empty(max(n, 1), dtype=np.int64)  # (score, -entry) ordered as integers, as the torch path's keys
    for r in range(rows):
        m = min(limit[r], n)
        row[:m] = zero  # heads summed in order below: a fixed rounding, never -0.0
        for h in range(heads):
            wh = weights[r, h]
            for j in range(m):
                row[j] += wh * max(dots[r, h, j], zero)
        picks = min(k, m)
        # Every pick scores at least tau, the lowest of k disjoint groups' maxima (k entries reach it), so
        # only the entries at or above it are ranked: ~15 % of them for random scores at m = 32 k.
        tau = -np.inf
        if m > k:
            g, tau = m // k, np.inf
            for i in range(k):
                group_max = -np.inf
                for j in range(i * g, (i + 1) * g):
                    group_max = row[j] if row[j] > group_max else group_max
                tau = min(tau, group_max)
        count = 0
        for j in range(m):  # branch-free compaction of the entries at or above tau
            b = np.int64(bits[j])
            keys[count] = ((b ^ 0x7FFFFFFF if b < 0 else b) << 32) | (0xFFFFFFFF - j)
            count += row[j] >= tau
        _largest_first(keys, count, picks)
        best = np.sort(keys[:picks])
        for i in range(picks):
            entry = 0xFFFFFFFF - (best[picks - 1 - i] & 0xFFFFFFFF)
            out_entries[r, i], out_scores[r, i] = entry, row[entry]
        for i in range(picks, k):
            out_entries[r, i], out_scores[r, i] = -1, -np.inf
