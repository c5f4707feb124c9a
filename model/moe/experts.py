"""Routed experts as stacked weights, so an expert-parallel rank holds a slice of them.

Each expert is initialised from its own generator seeded by its *global* id: a rank holding the
slice ``[expert_offset, expert_offset + num_local_experts)`` gets exactly the weights those experts
have in a single-device build, and building experts never consumes the global RNG, so the modules
built after them initialise identically whatever the sharding.

The experts run as three ``torch.nn.functional.grouped_mm`` calls whose group ends are a cumulative
sum of the counts, computed on the device: the layer never waits for the host to learn how many
rows each expert got (on CUDA the bf16 grouped GEMM is one kernel; on CPU ATen loops over groups).
grouped_mm takes fp32/bf16/fp16 with rows of a multiple of 16 bytes; other dtypes (the fp64
references of the tests) and unaligned widths (tiny test models) take a per-expert loop that reads
the split sizes on the host.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch import nn

from moesaic.model.ffn import gated


class GroupedExperts(nn.Module):
    """Clamped SwiGLU (or GeGLU) experts; w1/w3 [L, hidden, D] (gate/up), w2 [L, D, hidden] (down).

    The per-expert layout is nn.Linear's [out, in], matching the official ``experts.{e}.w*.weight``.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        swiglu_limit: float = 0.0,
        init_std: float = 0.02,
        seed: int = 0,
        expert_offset: int = 0,
        num_local_experts: Optional[int] = None,
        activation: str = "silu",
    ) -> None:
        super().__init__()
        local = num_experts - expert_offset if num_local_experts is None else num_local_experts
        if not (0 <= expert_offset and 0 < local and expert_offset + local <= num_experts):
            raise ValueError(
                f"experts [{expert_offset}, {expert_offset + local}) are not a slice of {num_experts} experts")
        self.num_experts = num_experts
        self.expert_offset = expert_offset
        self.num_local_experts = local
        self.swiglu_limit = swiglu_limit
        self.activation = activation
        self.init_std = init_std
        self.seed = seed
        self.w1 = nn.Parameter(torch.empty(local, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(local, hidden, dim))
        self.w2 = nn.Parameter(torch.empty(local, dim, hidden))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, init_std) per expert from a CPU generator seeded by seed + global expert id."""
        if self.w1.is_meta:  # shape-only models (sizing, dry runs) have nothing to initialise
            return
        for i in range(self.num_local_experts):
            gen = torch.Generator().manual_seed((self.seed + self.expert_offset + i) % 2**64)
            for w in (self.w1, self.w3, self.w2):
                w[i].copy_(torch.randn(w.shape[1:], generator=gen) * self.init_std)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [N, D] grouped by local expert (counts [L] rows each, in order) -> [N, D]."""
        if not grouped_mm_takes(x, self.w1):
            return self._per_expert(x, counts)
        ends = counts.cumsum(0, dtype=torch.int32)  # [L] end row of each expert's group, left on the device
        h = gated(_GroupedLinear.apply(x, self.w1, ends), _GroupedLinear.apply(x, self.w3, ends),
                  self.activation, self.swiglu_limit)  # [N, hidden]
        return _GroupedLinear.apply(h, self.w2, ends)  # [N, D]

    def _per_expert(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The same per expert, for what grouped_mm refuses; the split sizes cost a host sync."""
        outs = []
        for i, xe in enumerate(torch.split(x, counts.tolist())):
            h = gated(F.linear(xe, self.w1[i]), F.linear(xe, self.w3[i]), self.activation, self.swiglu_limit)
            outs.append(F.linear(h, self.w2[i]))
        return torch.cat(outs)


class _GroupedLinear(torch.autograd.Function):
    """y[rows of expert i] = x[rows of expert i] @ w[i].T by grouped_mm, forward and backward.

    Autograd's own backward of grouped_mm passes the incoming gradient's layout through, and
    grouped_mm refuses some (an expanded or column-major gradient of a row count that is not a
    multiple of 16 bytes); this one makes it contiguous first.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, ends)
        return F.grouped_mm(x, w.transpose(1, 2), offs=ends)  # x [N, in] @ w [L, out, in] as [L, in, out] -> [N, out]

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], None]:
        x, w, ends = ctx.saved_tensors
        g = g.contiguous()  # [N, out]
        dx = F.grouped_mm(g, w, offs=ends) if ctx.needs_input_grad[0] else None  # [N, in]
        # [out, N] x [N, in], split along N -> [L, out, in]; zero for an expert without rows
        dw = F.grouped_mm(g.t(), x, offs=ends) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def grouped_mm_takes(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether grouped_mm accepts x [N, D] against experts w [L, hidden, D]: its dtypes, and both
    widths (the inner dimension of one of the three products each) a multiple of 16 bytes."""
    return (x.dtype in (torch.float32, torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and all(n * x.element_size() % 16 == 0 for n in w.shape[1:]))
