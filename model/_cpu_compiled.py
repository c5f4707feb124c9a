"""What the compiled CPU hot spots (``_mhc_cpu``, ``attention/_window_cpu``) share on the torch side:
when they apply, and how tensors are handed to them."""

from __future__ import annotations

import torch


def applies(*tensors: torch.Tensor) -> bool:
    """Whether the compiled loops take these tensors: all fp32 on CPU (GPUs and other dtypes run torch ops)."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


BACKENDS = ("auto", "torch", "cpu", "triton")  # model.attention.backend


def use_compiled(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether an attention op runs its compiled CPU kernel under ``backend`` ("auto": where it applies)."""
    if backend == "torch":
        return False
    if backend == "cpu" and not applies(*tensors):
        raise ValueError("model.attention.backend='cpu' runs fp32 CPU tensors only; use 'auto' or 'torch'")
    return backend in ("auto", "cpu") and applies(*tensors)


def as_numpy(*tensors: torch.Tensor) -> list:
    """Contiguous numpy views of the tensors (a write to one reaches its tensor when that was contiguous)."""
    return [t.detach().contiguous().numpy() for t in tensors]
