"""Count the operations that make the host wait for the device, on any device.

On CUDA, reading a tensor's value on the host (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``,
...) or an op whose output size depends on values (``nonzero``, boolean-mask indexing,
``repeat_interleave`` without ``output_size``) blocks until the queued kernels finish. On CPU nothing
waits, so a CPU test sees these calls only by intercepting them: a ``TorchFunctionMode`` that records
each one, so a CPU test can assert that a code path would not sync on a GPU. ``.to(device)`` is not
counted: on a CPU run a copy to the training device cannot be told from a copy to the host.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and functions that always read device values on the host.
_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
          "unique", "unique_consecutive", "masked_select", "bincount"}


def _is_sync(name: str, args: tuple, kwargs: dict) -> bool:
    if name in _READS:
        return True
    if name == "repeat_interleave":  # a tensor of repeats sizes the output unless output_size says it
        return isinstance(args[1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) \
            and kwargs.get("output_size") is None
    if name in ("__getitem__", "__setitem__"):  # a boolean mask sizes the result
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
    return False


class HostSyncCounter(TorchFunctionMode):
    """``with HostSyncCounter() as syncs: ...``; then ``syncs.calls`` lists the syncing calls by name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func: Any, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if _is_sync(name, args, kwargs):
            self.calls.append(name)
        return func(*args, **kwargs)
