"""Activation checkpointing of the decoder blocks (``train.activation_checkpointing``).

``none``: autograd keeps every activation the backward needs. ``block``: a block keeps only its
inputs and recomputes its forward during the backward (torch's non-reentrant checkpoint), so a
step holds one block's activations at a time, for about one more forward of compute.
``selective``: the same recompute, but the outputs of the matrix products (dense, grouped-expert and
attention products: the expensive ops) are kept from the forward and handed back in order during
the recompute, so only the elementwise and reduction ops between them (norms, activations, RoPE,
mHC mixing, softmax pieces) run again: little extra compute, and the memory of the cheap ops saved.
Products computed inside ``products_not_kept`` are recomputed too: the attention kernel's per-block
scores (its own backward recomputes them from the log-sum-exp, so keeping them would only cost the
memory of the attention probabilities) and the indexer's selection scores (no gradient).
(torch's own selective checkpointing is not used: it numbers every op of the region and requires
the recompute to repeat the forward op for op, which the skipped side effects below do not.)

The recomputation must not repeat a forward's side effects: the routers count their loads (the bias
update and the balance metrics read them) and attention layers add to the statistics sink. The
recompute runs inside ``recomputing()``, which routers consult, and blocks drop the sink.
Recomputing gives the same values as the forward (same kernels, same inputs; the RNG state is
restored by torch's checkpoint), so the routers select the same experts again.
"""

from __future__ import annotations

from collections import defaultdict, deque
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map
from torch.utils.checkpoint import _detach_helper, _VersionWrapper, checkpoint

CHECKPOINT_MODES = ("none", "block", "selective")

_aten = torch.ops.aten
# The products whose outputs "selective" keeps: every matmul form the model's layers reach.
_SAVED_OPS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default,
              _aten._grouped_mm.default, _aten.linear.default, _aten.matmul.default,
              _aten._scaled_dot_product_flash_attention.default,
              _aten._scaled_dot_product_efficient_attention.default,
              _aten._scaled_dot_product_cudnn_attention.default,
              _aten._scaled_dot_product_flash_attention_for_cpu.default}

_recompute_depth = 0  # a plain global: on CUDA the backward (and so the recompute) runs on autograd's own thread
_unkept_depth = 0


def recomputing() -> bool:
    """True while a checkpointed block is recomputing its forward for the backward."""
    return _recompute_depth > 0


@contextmanager
def _recompute(inner: ContextManager) -> Iterator[None]:
    global _recompute_depth
    with inner:
        _recompute_depth += 1
        try:
            yield
        finally:
            _recompute_depth -= 1


@contextmanager
def products_not_kept() -> Iterator[None]:
    """Products inside (also as a decorator) are recomputed by ``selective``, not kept: for large ones no
    backward needs, such as the indexer's chunked selection scores, whose chunks together are O(S x N x heads)."""
    global _unkept_depth
    _unkept_depth += 1
    try:
        yield
    finally:
        _unkept_depth -= 1


class _KeptProducts(TorchDispatchMode):
    """Forward (``replay=False``): keep each product's output, per op in call order. Recompute: return the
    kept outputs in the same order instead of computing them (an output the forward changed in place
    afterwards is computed again). The recompute must consume exactly what the forward kept (unless torch
    stops it early, once the backward has what it needs)."""

    def __init__(self, kept: dict[Any, deque], replay: bool) -> None:
        super().__init__()
        self.kept, self.replay = kept, replay

    def __torch_dispatch__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func not in _SAVED_OPS or _unkept_depth:
            return func(*args, **(kwargs or {}))
        if not self.replay:
            out = func(*args, **(kwargs or {}))
            # torch's own SAC helpers: a detached alias sharing the version counter, checked when handed back
            self.kept[func].append(tree_map(lambda t: _VersionWrapper(_detach_helper(t)), out))
            return out
        if not self.kept[func]:
            raise RuntimeError(f"selective checkpointing: the recompute ran {func} more often than the forward")
        kept = self.kept[func].popleft()
        try:
            return tree_map(lambda w: w.get_val(False), kept)
        except RuntimeError:  # changed in place after the forward (e.g. a relu_ on it): compute it again
            return func(*args, **(kwargs or {}))

    def __exit__(self, exc_type: Any, *rest: Any) -> Any:
        result = super().__exit__(exc_type, *rest)
        if self.replay and exc_type is None and any(self.kept.values()):
            raise RuntimeError("selective checkpointing: the recompute ran fewer matrix products than the forward")
        return result


def _contexts(mode: str) -> tuple[ContextManager, ContextManager]:
    """(forward context, recompute context) for torch's checkpoint."""
    if mode == "selective":
        kept: dict[Any, deque] = defaultdict(deque)
        forward, recompute = _KeptProducts(kept, replay=False), _KeptProducts(kept, replay=True)
    else:
        forward, recompute = nullcontext(), nullcontext()
    return forward, _recompute(recompute)


def run_checkpointed(fn: Callable[..., Any], mode: str, *args: Any) -> Any:
    """fn(*args), its activations handled by ``mode`` (not "none")."""
    return checkpoint(fn, *args, use_reentrant=False, context_fn=partial(_contexts, mode))


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Set every decoder block's (MTP blocks included) checkpointing mode, in place; "none" turns it off."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"activation checkpointing must be one of {', '.join(CHECKPOINT_MODES)}, not {mode!r}")
    from .block import Block

    for block in (m for m in model.modules() if isinstance(m, Block)):
        block.checkpointing = mode
