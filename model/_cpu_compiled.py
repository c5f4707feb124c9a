"""What the compiled CPU hot spots (``_mhc_cpu``, ``attention/_window_cpu``) share on the torch side:
when they apply, and how tensors are handed to them."""

from __future__ import annotations

import torch


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take these tensors: all fp32 on CPU (GPUs and other dtypes run torch ops)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def as_numpy(*tensors: torch.Tensor) -> list:
    """Contiguous numpy views of the tensors (a write to one reaches its tensor when that was contiguous)."""
    return [t.detach().contiguous().numpy() for t in tensors]
