"""Sequence parallelism for DeepSeek-V4 attention: each rank holds one contiguous shard of every sequence.

``apply_sequence_parallel(model, topology)`` sets the model's sequence view (``Transformer.sequence``,
see ``moesaic.model.sequence``) to a ``SequenceShard`` of its sequence-parallel group; every forward
hands it to what reads across positions (attention layers, routers, the LM loss) in its context.
The model code stays single-device; the view answers its questions about the rest of the sequence.
Each attention type says where a shard may start (``AttentionSpec.sp_alignment``, checked by the
config); a type that cannot shard refuses sp > 1 there, with one line.

Scheme: shard-local attention with exchanged context, not Ulysses' head all-to-all
-------------------------------------------------------------------------------------
Every query of a V4 layer attends to (a) the ``window`` keys ending at itself and (b) compressed
entries, all from one shared K = V head; the compressor and the indexer read the layer input. So a
rank keeps its queries, all heads, and fetches only what its queries need from earlier shards:

* window keys: the last ``window - 1`` rows of ``kv`` [B,S,c] of the preceding shards (``preceding``);
* compressed entries: each rank compresses its own windows (shards start at window boundaries, which
  the config enforces) and all shards' entries are all-gathered (``gather``): S/m rows of c. A CSA
  entry's look-back half reads the previous window, the preceding shard's last ``m`` input rows;
* the indexer scores this rank's queries against all index keys (gathered like the entries) and
  picks its top-k exactly as on one device (ties go to the lower entry, independent of length);
* losses are shares: the LM loss, the indexer's KL and the routers' sequence aux loss divide by
  whole-sequence counts (``sum``), so the shards' losses, and hence their gradients, add up to the
  whole sequence's. DeepSpeed sums gradients over the shards (``parallel.topology``).

Why not DeepSpeed's Ulysses (``DistributedAttention`` / ``_SeqAllToAll``): it scatters heads, and its
exchange asserts ``num_kv_heads >= sp`` (V4 has 1), so the single K = V head would have to be
all-gathered anyway (S x c per rank) besides the compressor's input, and the all-to-alls of q and of
the output add 2 (sp-1)/sp^2 x S x H x c received values per rank and layer. Here a rank receives
(sp-1)/sp x S/m x c of entries (+ index keys) and the other shards' tails (window - 1 key rows, m
input rows each; an all-gather, where point-to-point would move one tail): about 2 H m / sp times
less (64x for V4-Flash's CSA layers at sp = 8: H = 64, m = 4), no head-divisibility constraint, and
the same attention FLOPs per rank (the kernel scores every entry for every query, so shards are
balanced; under Ulysses each rank would instead run all S queries for H/sp heads).

All exchanges are autograd-aware all-gathers (``all_gather_single_autograd``; its backward
reduce-scatters, so a row's gradient from a later shard returns to the rank that computed it).
Every rank must issue the same collectives, in backward too: the first shard's halos are empty
tensors that still enter its graph (``Compressor.forward`` takes an empty ``before``), never skipped.
Decoding with a KV cache runs on whole sequences: use ``whole_sequence`` around generation.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist

try:
    from torch.distributed._functional_collectives import all_gather_single_autograd
except ImportError:  # torch < 2.12 names it all_gather_tensor_autograd (renamed, same semantics)
    from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather_single_autograd

from moesaic.model import Transformer
from moesaic.model.sequence import WHOLE, WholeSequence

from .topology import Topology


class SequenceShard(WholeSequence):
    """Shard ``index`` of ``shards`` equal, contiguous shards of a sequence, one per rank of ``group``."""

    def __init__(self, group: dist.ProcessGroup, index: int, shards: int) -> None:
        self.group, self.index, self.shards = group, index, shards

    def preceding(self, t: torch.Tensor, rows: int) -> torch.Tensor:
        """The ``rows`` positions before this shard (fewer near the start) of t [B, S, ...] -> [B, <=rows, ...]."""
        if rows <= 0:
            return t[:, :0]
        tail = t[:, -min(rows, t.shape[1]):].contiguous()  # [B, h, ...]: all a later shard can need of this one
        h = tail.shape[1]
        tails = all_gather_single_autograd(tail, 1, self.group)  # [B, shards * h, ...]
        return tails[:, max(0, self.index * h - rows):self.index * h]

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return all_gather_single_autograd(t.contiguous(), 1, self.group)  # [B, shards * n, ...]

    @torch.no_grad()
    def sum(self, t: torch.Tensor) -> torch.Tensor:
        total = t.detach().clone()
        dist.all_reduce(total, group=self.group)
        return total


def apply_sequence_parallel(model: Transformer, topology: Topology) -> None:
    """Make ``model`` work on this rank's shard of every sequence; call on every rank."""
    model.sequence = SequenceShard(topology.sp_group, topology.sp_rank, topology.sp)


@contextmanager
def whole_sequence(model: Transformer) -> Iterator[None]:
    """Run ``model`` on whole sequences (e.g. KV-cached generation on one rank), then restore the shard."""
    shard, model.sequence = model.sequence, WHOLE
    try:
        yield
    finally:
        model.sequence = shard
