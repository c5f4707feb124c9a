"""Numerical comparisons that hold on any CPU.

Which kernels run differs between hosts and settings (ATen's vector width, MKL's code path, the
target numba compiles for), and with them the order of every floating-point sum. So:

* where the claim is that a method is exact, the reference runs in fp64 and an fp32 result may be
  off by its own rounding only;
* where two fp32 implementations must agree, they may differ by rounding only;
* bit-identity (``torch.equal``, ``== 0``) only where the same kernels compute both sides.

Rounding errors of sums scale with the largest magnitudes summed, not with each result element
(which may cancel to near zero), so a tolerance here is a number of fp32 eps times a tensor's scale:
its largest absolute entry. Each call site states what it observed where it allows more than 16.
"""

from __future__ import annotations

import copy
from typing import TypeVar

import torch

FP32_EPS = torch.finfo(torch.float32).eps  # 2^-23 ~ 1.19e-7: the spacing of fp32 numbers at 1

M = TypeVar("M", bound=torch.nn.Module)


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol_eps: float, what: str = "",
                        scale: float | None = None) -> None:
    """max |actual - expected| <= rtol_eps * FP32_EPS * ``scale`` (default: max |expected|).

    Infinities and NaNs must sit at the same places with the same values.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    finite = e.isfinite()
    torch.testing.assert_close(a[~finite], e[~finite], rtol=0, atol=0, equal_nan=True, msg=f"{what}: non-finite")
    a, e = a[finite], e[finite]
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    assert diff <= rtol_eps * FP32_EPS * scale, (
        f"{what}: max |difference| {diff:.3g} is {diff / (FP32_EPS * scale) if scale else float('inf'):.1f} fp32 "
        f"eps of the scale {scale:.3g}; {rtol_eps} allowed")


def fp64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs of an fp64 reference; its gradients still reach (and round to) the fp32 tensors."""
    return [t.double() for t in tensors]


def fp64_copy(module: M) -> M:
    """An fp64 copy of a module, for a reference computed without fp32 rounding."""
    return copy.deepcopy(module).double()
