"""The LM loss fused with the output head: cross-entropy of h @ W^T without the [tokens, vocab] logits.

Training only needs the loss and its gradients, and the gradients of a cross-entropy with respect
to its logits are known in closed form (softmax - one-hot), so the forward pass walks the tokens
in chunks and, for each chunk, forms its logits, adds its loss and immediately turns
softmax - one-hot into the gradients of h and W (as Liger-Kernel's fused linear cross-entropy
does). What is kept for backward is those two gradients ([T, D] and [V, D]); the backward scales
them by the incoming gradient of the loss. Peak memory holds one chunk's logits instead of the
logits, their log-softmax and their gradient ([T, V] each, 3 x 128 MiB at 8k tokens and a vocab
of 4096 in fp32); the work is the same GEMMs as head + cross-entropy. Without gradients (eval)
only the loss is formed.

A final-logit softcap (Gemma 4, ``softcap``) caps each chunk's logits, z -> cap * tanh(z / cap), and
chains its derivative 1 - tanh(z / cap)^2 into that chunk's gradient (one more [C, V] while the
chunk lives).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

CHUNK_TOKENS = 2048  # logits of this many tokens at a time: [2048, V] fp32


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(logits / cap) (Gemma's final_logit_softcapping, in its order of operations); cap 0 = identity."""
    return torch.tanh(logits / cap) * cap if cap > 0 else logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int,
                cap: float) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        d_h = torch.empty_like(h) if want_grad else None
        d_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_grad else None
        for s in range(0, h.shape[0], chunk):
            hc, lab = h[s:s + chunk], labels[s:s + chunk]  # [C, D], [C]
            logits = (hc @ weight.T).float()  # [C, V]
            if cap > 0:
                tanh = torch.tanh(logits / cap)  # [C, V], kept for the derivative
                logits = tanh * cap
            keep = lab != -100
            target = lab.clamp(min=0).unsqueeze(1)  # [C, 1]; ignored rows read class 0, then count 0
            lse = logits.logsumexp(dim=-1)  # [C]
            total += ((lse - logits.gather(1, target).squeeze(1)) * keep).sum()
            if want_grad:
                grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in the logits' memory
                grad.scatter_add_(1, target, grad.new_full(target.shape, -1.0))  # - one-hot
                if cap > 0:
                    grad.mul_(tanh.square_().neg_().add_(1))  # d(cap tanh(z / cap)) / dz = 1 - tanh^2
                grad = (grad * keep.unsqueeze(1)).to(h.dtype)  # [C, V]
                d_h[s:s + chunk] = grad @ weight
                d_w += (grad.T @ hc).float()
        ctx.save_for_backward(d_h, d_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d_h, d_w = ctx.saved_tensors
        return d_h * grad_total.to(d_h.dtype), (d_w * grad_total).to(ctx.weight_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         chunk: int = CHUNK_TOKENS, cap: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of logits softcap(h @ weight^T, cap) against labels (-100 = ignored), fp32 scalar.

    h [..., D], weight [V, D], labels [...] (h's leading shape); cap 0 = no softcap.
    """
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, labels.reshape(-1), chunk, cap)
