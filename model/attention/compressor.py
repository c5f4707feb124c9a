"""DeepSeek-V4 token compressor: gated pooling of m consecutive tokens into one KV entry.

CSA (overlap=True, m = 4) builds entry w from 2m slots: the previous window's *look-back* stream
(first half of the projected channels) and its own window's *current* stream (second half), so
each entry sees 2m tokens with stride m (MODEL_SPEC §3.1). HCA (overlap=False, m' = 128) pools only
its own window (§4). The softmax over slots is taken per channel (an element-wise gate). Entries
are RMS-normalised and rotated at the absolute position w*m of their window's first token.

Entry w reads tokens [(w-1)m, (w+1)m) (CSA) or [wm, (w+1)m) (HCA) only, so a query t may use it
iff w < floor((t+1)/m) (§3.4); a trailing partial window yields no entry.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..norm import RMSNorm
from ..rope import RotaryEmbedding, rope_tail


@dataclass
class CompressorState:
    """Constant-size decode state of one compressor for a batch (MODEL_SPEC §3.5, §4).

    Only what a future entry still needs is kept: the open window's projected values and gate
    logits (position bias included) for all of its channels, because its look-back half feeds the
    *next* CSA entry; and, for CSA, the look-back half of the last closed window. Slots of the
    open window that are not filled yet hold stale values; they are overwritten before use.
    Tensors are detached fp32 (or wider) buffers: the decode cache is outside autograd.
    """

    kv: torch.Tensor  # [B, m, coff*c] values of the open window, slot = position mod m
    score: torch.Tensor  # [B, m, coff*c] logits (+ ape) of the open window
    prev_kv: Optional[torch.Tensor] = None  # [B, m, c] CSA: last closed window's look-back values
    prev_score: Optional[torch.Tensor] = None  # [B, m, c] CSA: their logits; -inf before window 0 closes


def state_bytes(state: CompressorState) -> int:
    """Bytes held by a decode state: sum of numel * element size over its tensors."""
    tensors = (getattr(state, f.name) for f in fields(state))
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Compressor(nn.Module):
    """Compress [B, S, D] hidden states into [B, S//ratio, out_dim] KV entries (CSA or HCA).

    Parameter names follow the official checkpoints (``wkv``, ``wgate``, ``ape``, ``norm``); with
    ``overlap`` the first ``out_dim`` projected channels are the look-back stream and the last
    ``out_dim`` the current stream. The pooling runs in (at least) fp32 whatever the weight dtype.
    """

    def __init__(self, dim: int, out_dim: int, ratio: int, overlap: bool, rope: RotaryEmbedding,
                 rope_dim: int, eps: float) -> None:
        super().__init__()
        if not 0 < rope_dim <= out_dim or rope_dim % 2:
            raise ValueError(f"rope_dim={rope_dim} must be even and in (0, out_dim={out_dim}]")
        self.out_dim, self.ratio, self.overlap, self.rope_dim = out_dim, ratio, overlap, rope_dim
        width = (2 if overlap else 1) * out_dim
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, width))  # position-in-window logit bias
        self.norm = RMSNorm(out_dim, eps)
        self.rope = rope

    def _project(self, x: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and logits (+ ape by position in window) of tokens at positions start, start+1, ..."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        kv = F.linear(x, self.wkv.weight.to(dtype))  # [B, S, coff*c]
        slot = torch.arange(start, start + x.shape[1], device=x.device) % self.ratio  # [S]
        score = F.linear(x, self.wgate.weight.to(dtype)) + self.ape.to(dtype)[slot]  # [B, S, coff*c]
        return kv, score

    def _pool(self, kv: torch.Tensor, score: torch.Tensor, prev_kv: Optional[torch.Tensor],
              prev_score: Optional[torch.Tensor], first_window: int) -> torch.Tensor:
        """Entries of N complete, consecutive windows, the first being window ``first_window``.

        kv/score: [B, N, m, coff*c]. prev_kv/prev_score [B, m, c]: the look-back stream of window
        first_window-1 (CSA), or None when first_window == 0 (empty slots: value 0, logit -inf).
        Returns [B, N, c].
        """
        B, N, m, _ = kv.shape
        c = self.out_dim
        if self.overlap:
            if prev_kv is None:
                prev_kv = kv.new_zeros(B, m, c)
                prev_score = score.new_full((B, m, c), float("-inf"))
            # [B, N+1, m, c]: look-back streams of windows first_window-1 ... first_window+N-1;
            # the first N are the look-back slots of entries first_window ... first_window+N-1.
            back_kv = torch.cat([prev_kv.unsqueeze(1), kv[..., :c]], dim=1)[:, :N]  # [B, N, m, c]
            back_score = torch.cat([prev_score.unsqueeze(1), score[..., :c]], dim=1)[:, :N]  # [B, N, m, c]
            kv = torch.cat([back_kv, kv[..., c:]], dim=2)  # [B, N, 2m, c]
            score = torch.cat([back_score, score[..., c:]], dim=2)  # [B, N, 2m, c]
        pooled = (score.softmax(dim=2) * kv).sum(dim=2)  # [B, N, c]; softmax over slots, per channel
        pooled = self.norm(pooled)
        positions = (first_window + torch.arange(N, device=kv.device)) * self.ratio  # [N]
        cos, sin = self.rope(positions)  # [N, rope_dim/2]
        return rope_tail(pooled, cos, sin, self.rope_dim)

    def _windows(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N*m, C] -> [B, N, m, C]."""
        return t.unflatten(1, (-1, self.ratio))

    def forward(self, x: torch.Tensor, start: int = 0, before: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, S, D] -> entries [B, S//ratio, out_dim] in x's dtype; a trailing partial window is dropped.

        x starts at absolute position ``start`` (a multiple of ratio: a shard of a longer sequence).
        With overlap, ``before`` [B, h <= ratio, D] holds the tokens just before x (the window whose
        look-back stream feeds x's first entry); slots without a token (h < ratio, or None: x starts
        the sequence) are empty. Under sequence parallelism the first shard passes an empty ``before``
        rather than None, so that every shard's backward runs the same collectives.
        """
        if start % self.ratio:
            raise ValueError(f"a compressed chunk must start at a window boundary, not at position {start}")
        cut = x.shape[1] // self.ratio * self.ratio
        kv, score = self._project(x[:, :cut], start)  # [B, cut, coff*c]
        prev_kv = prev_score = None
        if self.overlap and before is not None:
            back_kv, back_score = self._project(before, start - before.shape[1])  # [B, h, 2c]
            missing = self.ratio - before.shape[1]
            prev_kv = F.pad(back_kv[..., :self.out_dim], (0, 0, missing, 0))  # [B, m, c]
            prev_score = F.pad(back_score[..., :self.out_dim], (0, 0, missing, 0), value=float("-inf"))
        return self._pool(self._windows(kv), self._windows(score), prev_kv, prev_score,
                          start // self.ratio).to(x.dtype)

    def new_state(self, batch_size: int, device: Optional[torch.device] = None,
                  dtype: torch.dtype = torch.float32) -> CompressorState:
        """Empty decode state, as before position 0."""
        width = (2 if self.overlap else 1) * self.out_dim
        state = CompressorState(kv=torch.zeros(batch_size, self.ratio, width, device=device, dtype=dtype),
                                score=torch.zeros(batch_size, self.ratio, width, device=device, dtype=dtype))
        if self.overlap:
            state.prev_kv = torch.zeros(batch_size, self.ratio, self.out_dim, device=device, dtype=dtype)
            state.prev_score = torch.full_like(state.prev_kv, float("-inf"))
        return state

    def prefill(self, x: torch.Tensor) -> tuple[torch.Tensor, CompressorState]:
        """Entries of x [B, S, D] (as ``forward``) plus the state to continue decoding at position S."""
        B, S, _ = x.shape
        m, c = self.ratio, self.out_dim
        cut = S // m * m
        kv, score = self._project(x, 0)  # [B, S, coff*c]
        entries = self._pool(self._windows(kv[:, :cut]), self._windows(score[:, :cut]), None, None, 0)
        state = self.new_state(B, x.device, kv.dtype)
        with torch.no_grad():
            state.kv[:, : S - cut] = kv[:, cut:]
            state.score[:, : S - cut] = score[:, cut:]
            if self.overlap and cut > 0:
                state.prev_kv.copy_(kv[:, cut - m : cut, :c])
                state.prev_score.copy_(score[:, cut - m : cut, :c])
        return entries.to(x.dtype), state

    @torch.no_grad()
    def step(self, state: CompressorState, x_t: torch.Tensor, pos: int) -> Optional[torch.Tensor]:
        """Consume the token at absolute position ``pos`` (x_t [B, 1, D]); update ``state`` in place.

        Returns entry pos // ratio as [B, 1, out_dim] when this token closes its window, else None.
        The query at ``pos`` may already use that entry (w < floor((pos+1)/m)). Inference only.
        """
        m, c = self.ratio, self.out_dim
        kv, score = self._project(x_t, pos)  # [B, 1, coff*c]
        slot = pos % m
        state.kv[:, slot] = kv[:, 0]
        state.score[:, slot] = score[:, 0]
        if slot != m - 1:
            return None
        entry = self._pool(state.kv.unsqueeze(1), state.score.unsqueeze(1), state.prev_kv, state.prev_score,
                           pos // m)  # [B, 1, c]
        if self.overlap:
            state.prev_kv.copy_(state.kv[..., :c])
            state.prev_score.copy_(state.score[..., :c])
        return entry.to(x_t.dtype)
