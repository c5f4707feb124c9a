"""mHC's per-token stream mixing on CPU, compiled (numba; ``mhc.py`` imports this on first CPU use).

Collapse and expand multiply every token's [n, D] streams by its own n-vector or n x n matrix. As
torch ops that is a bmm over [T] batches of 4 x 4 x D products, and CPU bmm pays a few microseconds
per batch entry (~30 ms per call at 8k tokens, D = 256), more than the arithmetic; these loops do
the same sums in one pass over the streams (forward 4x, backward 4-5x faster at 8k tokens, D = 256,
one thread). All arrays fp32 and contiguous:
x, dx [T, n, D]; y, dy [T, D]; pre, post [T, n]; comb [T, n, n] as in ``mhc.expand``.
"""

from __future__ import annotations

import numba
import numpy as np

# Reassociation lets the dot products use vector lanes (a different, fixed summation order); no
# NaN/inf assumptions, so those still propagate.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(cache=True, fastmath=_FASTMATH)
def collapse_forward(x: np.ndarray, pre: np.ndarray, y: np.ndarray) -> None:
    """y[t] = sum_i pre[t, i] x[t, i]."""
    T, n, D = x.shape
    for t in range(T):
        for d in range(D):
            y[t, d] = pre[t, 0] * x[t, 0, d]
        for i in range(1, n):
            p = pre[t, i]
            for d in range(D):
                y[t, d] += p * x[t, i, d]


@numba.njit(cache=True, fastmath=_FASTMATH)
def collapse_backward(x: np.ndarray, pre: np.ndarray, g: np.ndarray, dx: np.ndarray, dpre: np.ndarray) -> None:
    """dx[t, i] = pre[t, i] g[t]; dpre[t, i] = x[t, i] . g[t]."""
    T, n, D = x.shape
    for t in range(T):
        for i in range(n):
            p, s = pre[t, i], np.float32(0.0)
            for d in range(D):
                dx[t, i, d] = p * g[t, d]
                s += x[t, i, d] * g[t, d]
            dpre[t, i] = s


@numba.njit(cache=True, fastmath=_FASTMATH)
def expand_forward(y: np.ndarray, x: np.ndarray, post: np.ndarray, comb: np.ndarray, out: np.ndarray) -> None:
    """out[t, j] = post[t, j] y[t] + sum_i comb[t, i, j] x[t, i]."""
    T, n, D = x.shape
    for t in range(T):
        for j in range(n):
            p = post[t, j]
            for d in range(D):
                out[t, j, d] = p * y[t, d]
            for i in range(n):
                c = comb[t, i, j]
                for d in range(D):
                    out[t, j, d] += c * x[t, i, d]


@numba.njit(cache=True, fastmath=_FASTMATH)
def expand_backward(y: np.ndarray, x: np.ndarray, post: np.ndarray, comb: np.ndarray, g: np.ndarray,
                    dy: np.ndarray, dx: np.ndarray, dpost: np.ndarray, dcomb: np.ndarray) -> None:
    """The adjoint of ``expand_forward`` for the output gradient g [T, n, D]."""
    T, n, D = x.shape
    for t in range(T):
        for d in range(D):
            dy[t, d] = np.float32(0.0)
        for j in range(n):
            p, s = post[t, j], np.float32(0.0)
            for d in range(D):
                dy[t, d] += p * g[t, j, d]
                s += y[t, d] * g[t, j, d]
            dpost[t, j] = s
        for i in range(n):
            for d in range(D):
                dx[t, i, d] = np.float32(0.0)
            for j in range(n):
                c, s = comb[t, i, j], np.float32(0.0)
                for d in range(D):
                    dx[t, i, d] += c * g[t, j, d]
                    s += x[t, i, d] * g[t, j, d]
                dcomb[t, i, j] = s
