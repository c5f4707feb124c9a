"""``window_attention`` on CPU in fp32 as compiled per-query loops (numba; ``kernels.py`` imports this
module on first CPU use and calls ``forward_op``/``backward_op``, the torch-side wrappers at the end).

The torch path processes a block of queries as batched GEMMs over its window keys and gathered
entries: every query of a block scores all C + window - 1 keys of the block (and masks most), the
selected entries are first copied out ([C, k, c] per block) and their gradients scattered back, and
each of those steps is a pass over memory. Here each query scores exactly its own candidates,
reading window rows and entry rows in place, and its backward adds straight into the key and entry
gradients: (window + k) x H dot products of length c per query, nothing else. Masked (HCA) entries
do not come here: they are the same dense prefix for a whole span of queries, which GEMMs score
faster (``_dense_entries``), so these loops take the window and the selected (CSA) entries.

Arrays (all C-contiguous; fp32 unless noted), with an empty trailing axis for what a call lacks:
q, out, d_out, d_q [B, S, H, c]; kv, d_kv [B, T, c] (query i at row T - S + i); sink [H];
entries, d_entries [B, N, c]; idx [B, S, k] int64 (-1 = unused slot) or [B, S, 0]; lse, delta [B, S, H];
mass [B, S, k] or [B, S, 0];
stats [4] float64: sums of window, compressed and sink probabilities, and the max logit (or [0]).
"""

from __future__ import annotations

from typing import Optional

import numba
import numpy as np
import torch

from .._cpu_compiled import as_numpy
from . import _dense_entries
from .stats import AttentionStats

# As in ``model/_mhc_cpu.py``: reassociation vectorises the length-c dot products (a fixed order).
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True)
def _candidates(idx: np.ndarray, b: int, t: int, rows: np.ndarray, slots: np.ndarray) -> int:
    """Query (b, t)'s selected entries: their rows into rows[:n] and idx slots into slots[:n]; returns n."""
    n = 0
    for j in range(idx.shape[2]):
        if idx[b, t, j] >= 0:
            rows[n], slots[n] = idx[b, t, j], j
            n += 1
    return n


@numba.njit(cache=True)
def _buffers(q: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-query scratch: selected entry rows and idx slots (as many as a query can have), scaled q [H, c]."""
    return np.empty(idx.shape[2], np.int64), np.empty(idx.shape[2], np.int64), np.empty(q.shape[2:], np.float32)


@numba.njit(cache=True)
def _start(q: np.ndarray, kv: np.ndarray, idx: np.ndarray, window: int, scale: float, b: int, t: int,
           qs: np.ndarray, rows: np.ndarray, slots: np.ndarray) -> tuple[int, int, int]:
    """Query (b, t): qs = its query rows times scale, rows/slots = its extra entries; returns (first window
    row, window keys, extra entries)."""
    row = kv.shape[1] - q.shape[1] + t  # its own row in kv
    lo = max(0, row - window + 1)
    for h in range(q.shape[2]):
        for d in range(q.shape[3]):
            qs[h, d] = q[b, t, h, d] * scale
    return lo, row - lo + 1, _candidates(idx, b, t, rows, slots)


@numba.njit(cache=True, fastmath=_FASTMATH)
def _score(qs: np.ndarray, key: np.ndarray, p: np.ndarray, j: int) -> None:
    """p[h, j] = qs[h] . key for every head."""
    for h in range(qs.shape[0]):
        s = np.float32(0.0)
        for d in range(key.shape[0]):
            s += qs[h, d] * key[d]
        p[h, j] = s


@numba.njit(cache=True, fastmath=_FASTMATH)
def _accumulate(p: np.ndarray, j: int, value: np.ndarray, o: np.ndarray) -> None:
    """o[h] += p[h, j] value for every head."""
    for h in range(o.shape[0]):
        pj = p[h, j]
        for d in range(value.shape[0]):
            o[h, d] += pj * value[d]


@numba.njit(cache=True, fastmath=_FASTMATH)
def forward(q: np.ndarray, kv: np.ndarray, sink: np.ndarray, entries: np.ndarray, idx: np.ndarray, window: int,
            scale: float, out: np.ndarray, lse: np.ndarray, mass: np.ndarray, stats: np.ndarray) -> None:
    """out, lse (and mass, stats when sized) of every query: one softmax over window keys, entries, sink."""
    B, S, H, c = q.shape
    rows, slots, qs = _buffers(q, idx)
    o = np.empty((H, c), np.float32)
    p = np.empty((H, window + rows.shape[0]), np.float32)  # logits, then probabilities
    for b in range(B):
        for t in range(S):
            lo, nw, ne = _start(q, kv, idx, window, scale, b, t, qs, rows, slots)
            o[:] = 0.0
            for j in range(nw):
                _score(qs, kv[b, lo + j], p, j)
            for j in range(ne):
                _score(qs, entries[b, rows[j]], p, nw + j)
            for h in range(H):
                top = p[h, 0]
                for j in range(1, nw + ne):
                    top = max(top, p[h, j])
                if stats.shape[0] > 0:
                    stats[3] = max(stats[3], top)
                m = max(top, sink[h])
                z = np.exp(sink[h] - m)
                for j in range(nw + ne):
                    p[h, j] = np.exp(p[h, j] - m)
                    z += p[h, j]
                lse[b, t, h] = m + np.log(z)
                for j in range(nw + ne):
                    p[h, j] /= z
                if stats.shape[0] > 0:
                    for j in range(nw + ne):
                        stats[0 if j < nw else 1] += p[h, j]
                    stats[2] += np.exp(sink[h] - lse[b, t, h])
            for j in range(nw):
                _accumulate(p, j, kv[b, lo + j], o)
            for j in range(ne):
                _accumulate(p, nw + j, entries[b, rows[j]], o)
            out[b, t] = o
            if mass.shape[2] > 0:
                for j in range(mass.shape[2]):
                    mass[b, t, j] = 0.0
                for j in range(ne):
                    for h in range(H):
                        mass[b, t, slots[j]] += p[h, nw + j]


@numba.njit(cache=True, fastmath=_FASTMATH)
def _key_grad(qs: np.ndarray, do: np.ndarray, lse: np.ndarray, delta: np.ndarray, key: np.ndarray,
              dq: np.ndarray, d_key: np.ndarray, ds: np.ndarray, pj: np.ndarray) -> None:
    """One candidate key (= value) of one query: dq[h] += dS_h key, d_key += sum_h dS_h qs[h] + P_h do[h]."""
    H, c = qs.shape
    for h in range(H):
        logit, dp = np.float32(0.0), np.float32(0.0)
        for d in range(c):
            logit += qs[h, d] * key[d]
            dp += do[h, d] * key[d]
        pj[h] = np.exp(logit - lse[h])
        ds[h] = pj[h] * (dp - delta[h])
    for h in range(H):
        a, w = ds[h], pj[h]
        for d in range(c):
            dq[h, d] += a * key[d]
            d_key[d] += a * qs[h, d] + w * do[h, d]


@numba.njit(cache=True, fastmath=_FASTMATH)
def backward(q: np.ndarray, kv: np.ndarray, sink: np.ndarray, entries: np.ndarray, idx: np.ndarray, window: int,
             scale: float, out: np.ndarray, lse: np.ndarray, d_out: np.ndarray, d_q: np.ndarray, d_kv: np.ndarray,
             d_entries: np.ndarray, d_sink: np.ndarray, delta: np.ndarray) -> None:
    """d_q and delta (written), d_kv, d_entries and d_sink (added to) from the forward's lse: probabilities
    are rebuilt per query, dS = P (dP - delta) with delta = d_out . out (handed back for the entries that
    ``_dense_entries`` adds); K = V, so a key row's gradient is its key role (dS scaled q) plus its value
    role (P d_out)."""
    B, S, H, c = q.shape
    rows, slots, qs = _buffers(q, idx)
    dq = np.empty((H, c), np.float32)
    ds, pj = np.empty(H, np.float32), np.empty(H, np.float32)
    for b in range(B):
        for t in range(S):
            lo, nw, ne = _start(q, kv, idx, window, scale, b, t, qs, rows, slots)
            dq[:] = 0.0
            for h in range(H):
                s = np.float32(0.0)
                for d in range(c):
                    s += d_out[b, t, h, d] * out[b, t, h, d]
                delta[b, t, h] = s
                d_sink[h] -= np.exp(sink[h] - lse[b, t, h]) * s
            for j in range(nw):
                _key_grad(qs, d_out[b, t], lse[b, t], delta[b, t], kv[b, lo + j], dq, d_kv[b, lo + j], ds, pj)
            for j in range(ne):
                _key_grad(qs, d_out[b, t], lse[b, t], delta[b, t], entries[b, rows[j]], dq, d_entries[b, rows[j]], ds,
                          pj)
            for h in range(H):
                for d in range(c):
                    d_q[b, t, h, d] = dq[h, d] * scale


def forward_op(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
               idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], window: int, scale: float,
               _query_chunk: int, stats: Optional[AttentionStats], out: torch.Tensor, lse: torch.Tensor,
               mass: Optional[torch.Tensor]) -> None:
    """``kernels._blocked_forward`` through ``forward`` (fp32 CPU tensors); masked (dense) entries go
    through ``_dense_entries`` GEMMs instead of the loops."""
    B, S, H, _ = q.shape
    looped = None if mask is not None else entries
    totals = torch.tensor([0.0, 0.0, 0.0, float("-inf")], dtype=torch.float64) if stats is not None else None
    forward(*as_numpy(q, kv, sink, *_extra_arrays(q, looped, idx)), window, scale, out.numpy(), lse.numpy(),
            *as_numpy(mass if mass is not None else q.new_empty(B, S, 0),
                    totals if totals is not None else torch.empty(0, dtype=torch.float64)))
    if mask is not None:
        _dense_entries.forward(q, entries, mask, sink, scale, out, lse, totals)
    if totals is not None:
        stats.add_masses(totals, B * S * H, entries is not None)


def backward_op(q: torch.Tensor, kv: torch.Tensor, sink: torch.Tensor, entries: Optional[torch.Tensor],
                idx: Optional[torch.Tensor], mask: Optional[torch.Tensor], out: torch.Tensor,
                lse: torch.Tensor, d_out: torch.Tensor, window: int, scale: float,
                _query_chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``kernels._blocked_backward`` through ``backward`` (fp32 CPU tensors) and, for masked entries,
    ``_dense_entries.backward``."""
    looped = None if mask is not None else entries
    arrays = _extra_arrays(q, looped, idx)
    d_q, d_kv, d_sink, delta = torch.empty_like(q), torch.zeros_like(kv), torch.zeros_like(sink), torch.empty_like(lse)
    d_entries = None if entries is None else torch.zeros_like(entries)
    d_looped = d_entries if looped is not None else torch.zeros_like(arrays[0])  # empty when the loops have none
    d_out = d_out.contiguous()
    backward(*as_numpy(q, kv, sink, *arrays), window, scale, *as_numpy(out, lse, d_out), d_q.numpy(), d_kv.numpy(),
             d_looped.numpy(), d_sink.numpy(), delta.numpy())
    if mask is not None:
        _dense_entries.backward(q, entries, mask, scale, lse, delta, d_out, d_q, d_entries)
    return d_q, d_kv, d_sink, d_entries


def _extra_arrays(q: torch.Tensor, entries: Optional[torch.Tensor],
                  idx: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(entries, idx) for ``_window_cpu``: what a call lacks becomes an empty trailing axis, so the compiled
    functions see one set of array types (masked entries never reach the loops)."""
    B, S, _, c = q.shape
    return (entries if entries is not None else q.new_empty(B, 0, c),
            idx if idx is not None else torch.empty(B, S, 0, dtype=torch.long))
