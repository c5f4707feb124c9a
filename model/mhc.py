"""mHC: manifold-constrained hyper-connections (MODEL_SPEC §5), the residual of DeepSeek-V4.

The residual state is n = ``hc_mult`` streams X [B,S,n,D]. Around each sublayer F (attention or
MoE) one projection of the RMS-normalised flattened streams gives three mappings:

    mix  = (phi . X~) / rms(X~)                          X~ = flatten(X) [n*D], phi [(2+n)*n, n*D]
    pre  = sigmoid(a0 * mix[:n] + b[:n]) + eps           how much each stream feeds F
    post = 2 * sigmoid(a1 * mix[n:2n] + b[n:2n])         how much of F's output each stream gets
    comb = Sinkhorn(softmax_j(a2 * mix[2n:] + b[2n:]))   [i, j], doubly stochastic stream mixer
    X'_j = post_j * F(sum_i pre_i X_i) + sum_i comb[i, j] X_i

comb is used transposed (stream j gathers from all i along comb's first axis), and the Sinkhorn
starts with a column normalisation after the softmax, then (iters - 1) row/column rounds: this is
the official ``hc_split_sinkhorn`` and transformers >= 5.10.4 (5.8.0 got all three wrong, §13.2).
A doubly stochastic comb has spectral norm <= 1, so the residual mixing cannot blow up with depth.
The last step normalises columns, so those sum to 1 exactly; with V4's 20 iterations the rows do
to 1e-4 while the comb logits are mild (std <~ 0.7), and sharper logits (as training makes them)
leave rows off by up to a few 1e-2, in transformers alike; raise ``hc_sinkhorn_iters`` to tighten.
Before the final norm, ``head_collapse`` sums the streams with sigmoid weights (no Sinkhorn/post).

Parameters live on the owning module under the official checkpoint names (``hc_attn_fn``,
``hc_attn_base``, ``hc_attn_scale``, ``hc_ffn_*``, ``hc_head_*``); this module holds the math.

Initialisation (DeepSeek's is unconfirmed, §14): phi ~ N(0, init_std), b = 0, a = 1, as
transformers does. It starts as a plain pre-norm residual: at phi = 0 (its mean), with the
embedding copied into every stream, the streams stay equal, pre = 1/2 each, post = 1 and
comb = 1/n, so X' = X + F(X) exactly (F reads 2X, the same after its RMS norm); the small random
phi only perturbs this, and the streams diverge as phi, b and a learn. On a tiny model this
trains as well as the plain residual (tests/test_mhc.py prints both losses).
All mHC math runs in fp32 (the mappings are precision sensitive); mixing runs in X's dtype.

Kernels by ``model.attention.backend`` (``HCSpec.backend``): "auto" compiled loops for fp32 CPU streams
(``_mhc_cpu``) and torch ops elsewhere, CUDA included; "torch" torch ops; "triton" Triton kernels that read the
streams once per pass (``_mhc_triton``: the projection with the collapse, the expand, their backwards).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs.schema import ModelConfig

from ._cpu_compiled import as_numpy, use_compiled


@dataclass(frozen=True)
class HCSpec:
    """The mHC hyper-parameters of a model."""

    n: int  # streams
    sinkhorn_iters: int
    eps: float  # floor on pre and on the Sinkhorn denominators (hc_eps)
    norm_eps: float  # eps of the unweighted RMS norm of the flattened streams (rms_norm_eps)
    backend: str = "auto"  # model.attention.backend: which kernels mix the streams (``_path``)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "HCSpec":
        return cls(cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps, cfg.attention.backend)


def _path(backend: str, *tensors: torch.Tensor) -> str:
    """The kernels that mix these streams: "triton" (``_mhc_triton``: backend "triton", 32/16-bit streams), "cpu"
    (``_mhc_cpu``: fp32 CPU tensors under "auto" or "cpu") or "torch" (everything else: "auto" on CUDA is torch)."""
    if backend == "triton" and tensors[0].dtype in (torch.float32, torch.float16, torch.bfloat16):
        return "triton"
    return "cpu" if use_compiled(backend, *tensors) else "torch"


def mapping_parameters(n: int, dim: int, outputs: int, scales: int,
                       init_std: float) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """fn [outputs, n*dim] ~ N(0, init_std), base [outputs] = 0, scale [scales] = 1, all fp32."""
    fn = nn.Parameter(torch.empty(outputs, n * dim))
    nn.init.normal_(fn, std=init_std)
    return fn, nn.Parameter(torch.zeros(outputs)), nn.Parameter(torch.ones(scales))


def sublayer_parameters(spec: HCSpec, dim: int, init_std: float) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(fn, base, scale) of one sublayer site: (2+n)*n outputs (pre, post, comb), 3 scales."""
    return mapping_parameters(spec.n, dim, (2 + spec.n) * spec.n, 3, init_std)


def head_parameters(spec: HCSpec, dim: int, init_std: float) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(fn, base, scale) of the final collapse: n outputs, 1 scale."""
    return mapping_parameters(spec.n, dim, spec.n, 1, init_std)


class _Mix(torch.autograd.Function):
    """phi . x~ / rms(x~) with the backward written out: autograd's chain through the norm makes three
    more passes over the [B,S,n*D] streams (the norm's backward, its scaling, the accumulation into the
    projection's input gradient); here the input gradient is one GEMM plus one scaled add of x.

    With lin = x~ phi^T, r = (mean(x~^2) + eps)^-1/2 and out = lin r:
    d lin = g r, d r = sum_o g lin, d x~ = (d lin) phi - (d r) r^3 x~ / K, d phi = (d lin)^T x~.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
        lin = F.linear(flat, fn)  # [B,S,outputs]
        r = torch.rsqrt(torch.linalg.vector_norm(flat, dim=-1, keepdim=True).square() / flat.shape[-1] + norm_eps)
        ctx.save_for_backward(flat, fn, lin, r)
        return lin * r

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        flat, fn, lin, r = ctx.saved_tensors
        d_lin, coef = _mix_terms(g, lin, r, flat.shape[-1])  # [B,S,outputs], [B,S,1]
        d_flat = torch.matmul(d_lin, fn).addcmul_(coef, flat)  # [B,S,n*D]; in place: no second fresh buffer
        d_fn = torch.matmul(d_lin.flatten(0, -2).T, flat.flatten(0, -2))  # [outputs, n*D]
        return d_flat, d_fn, None


def _mix_terms(g: torch.Tensor, lin: torch.Tensor, r: torch.Tensor, K: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_Mix``'s per-token backward terms for the output gradient g [B,S,outputs]: d lin = g r [B,S,outputs] and
    coef = -(d r) r^3 / K [B,S,1], so that d x~ = (d lin) phi + coef x~."""
    return g * r, (g * lin).sum(dim=-1, keepdim=True) * r.pow(3) / -K


def _mix(x: torch.Tensor, fn: torch.Tensor, norm_eps: float) -> torch.Tensor:
    """x [B,S,n,D] -> phi . x~ / rms(x~) [B,S,outputs] in fp32.

    Projecting first and scaling the few outputs after (as the official ``hc_pre``) keeps no
    normalised copy of the streams for backward (``_Mix``).
    """
    return _Mix.apply(x.flatten(2).float(), fn.float(), norm_eps)


class _CollapseTriton(torch.autograd.Function):
    """pre = sigmoid(a0 * mix[:n] + b[:n]) + eps and the collapse sum_i pre_i X_i in one kernel
    (``_mhc_triton.mix_collapse``), returning (collapse, mix) for the rest of the mappings (torch ops).

    Backward, recomputing nothing: dpre in one read of X and the gradient, pre's sigmoid and the projection's
    per-token terms on the few per-token values (torch), then dX (collapse + projection, one kernel) and dphi
    (one kernel, each program summing all tokens for its columns: no atomics, deterministic). Only base[:n] and
    scale[0] get gradients here, the rest reach them through the torch ops on mix.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                norm_eps: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        from ._mhc_triton import mix_collapse

        y, lin, r, pre = mix_collapse(x, fn, base, scale, norm_eps, eps)  # [B,S,D], [B,S,outputs], [B,S,1], [B,S,n]
        ctx.save_for_backward(x, fn, lin, r, pre, scale)
        ctx.eps, ctx.base_shape = eps, base.shape
        return y, lin * r

    @staticmethod
    def backward(ctx, g_y: torch.Tensor, g_mix: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        from ._mhc_triton import collapse_backward, mix_collapse_backward

        x, fn, lin, r, pre, scale = ctx.saved_tensors
        n = pre.shape[-1]
        d_pre = collapse_backward(x, pre, g_y, write_dx=False)[1]  # [B,S,n]
        s = pre - ctx.eps  # the sigmoid
        d_z = d_pre * s * (1 - s)
        g_mix = g_mix.clone()
        g_mix[..., :n] += d_z * scale[0]
        d_lin, coef = _mix_terms(g_mix, lin, r, n * x.shape[-1])
        d_x, d_fn = mix_collapse_backward(x, pre, g_y, d_lin, coef, fn)
        d_base = d_z.new_zeros(ctx.base_shape)
        d_base[:n] = d_z.flatten(0, -2).sum(0)
        d_scale = torch.zeros_like(scale)
        d_scale[0] = (d_z * lin[..., :n] * r).sum()
        return d_x, d_fn, d_base, d_scale, None, None


def _normalisations(iters: int) -> list[int]:
    """Axes of [n(i), n(j), T] that the Sinkhorn steps normalise: columns (sum over i), then rows/columns."""
    return [0] + [1, 0] * (iters - 1)


class _Sinkhorn(torch.autograd.Function):
    """Row softmax + eps, then Sinkhorn-Knopp: comb <- comb / (sum over an axis + eps), on [n, n, T].

    The [n, n, T] layout makes each sum over a leading axis of size n a few vectorised adds over T
    (reducing a trailing axis of size 4 is slow on CPU). The backward is written out: a step
    c' = c / s with s = sum_a c + eps has dL/dc = (g - sum_a g c') / s, and its input is c' * s,
    so only the denominators s ([n, T] each, 2*iters of them) are kept, not the 2*iters matrices.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        comb = logits.softmax(dim=1) + eps
        sums = []
        for axis in _normalisations(iters):
            sums.append(comb.sum(dim=axis, keepdim=True) + eps)
            comb = comb / sums[-1]
        ctx.save_for_backward(comb, *sums)
        ctx.iters, ctx.eps = iters, eps
        return comb

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        comb, *sums = ctx.saved_tensors
        grad = grad.contiguous()  # arrives as a permuted view of [..., n, n]; strided elementwise ops are ~8x slower
        for axis, s in zip(reversed(_normalisations(ctx.iters)), reversed(sums)):
            grad = (grad - (grad * comb).sum(dim=axis, keepdim=True)) / s
            comb = comb * s  # this step's input
        probs = comb - ctx.eps  # the softmax
        return probs * (grad - (grad * probs).sum(dim=1, keepdim=True)), None, None


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Row softmax, then Sinkhorn-Knopp column/row normalisation: [..., n, n] -> doubly stochastic."""
    flat = logits.flatten(0, -3).permute(1, 2, 0).contiguous()  # [n, n, T]
    return _Sinkhorn.apply(flat, iters, eps).permute(2, 0, 1).reshape(logits.shape)


def _post_comb(mix: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
               spec: HCSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """mix [B,S,(2+n)*n] (fp32) -> post [B,S,n], comb [B,S,n,n]."""
    n = spec.n
    post, comb = mix[..., n:2 * n], mix[..., 2 * n:]
    post = 2 * torch.sigmoid(post * scale[1] + base[n:2 * n])
    comb = comb.unflatten(-1, (n, n)) * scale[2] + base[2 * n:].view(n, n)
    return post, sinkhorn(comb, spec.sinkhorn_iters, spec.eps)


def sublayer_mappings(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                      spec: HCSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B,S,n,D] -> pre [B,S,n], post [B,S,n], comb [B,S,n,n] (fp32), by torch ops (``sublayer_collapse``
    takes the Triton path)."""
    mix = _mix(x, fn, spec.norm_eps)
    base, scale = base.float(), scale.float()
    pre = torch.sigmoid(mix[..., :spec.n] * scale[0] + base[:spec.n]) + spec.eps
    return pre, *_post_comb(mix, base, scale, spec)


def sublayer_collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                      spec: HCSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sublayer's input and the mappings for its expand: x [B,S,n,D] -> (sum_i pre_i X_i [B,S,D] in x's dtype,
    post [B,S,n], comb [B,S,n,n]). Backend "triton": the projection, pre and the collapse in one kernel."""
    if _path(spec.backend, x) == "triton":
        base, scale = base.float(), scale.float()
        y, mix = _CollapseTriton.apply(x, fn.float(), base, scale, spec.norm_eps, spec.eps)
        return y, *_post_comb(mix, base, scale, spec)
    pre, post, comb = sublayer_mappings(x, fn, base, scale, spec)
    return collapse(x, pre, spec.backend), post, comb


class _Collapse(torch.autograd.Function):
    """``collapse`` on CPU in fp32 through ``_mhc_cpu`` (saves x and pre, as the matmul would)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        from ._mhc_cpu import collapse_forward

        x3, pre2 = x.reshape(-1, *x.shape[-2:]), pre.reshape(-1, pre.shape[-1])  # [T,n,D], [T,n]
        y = x.new_empty(x3.shape[0], x.shape[-1])  # [T,D]
        collapse_forward(*as_numpy(x3, pre2), y.numpy())
        ctx.save_for_backward(x, pre)
        return y.view(*x.shape[:-2], x.shape[-1])

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from ._mhc_cpu import collapse_backward

        x, pre = ctx.saved_tensors
        dx, dpre = torch.empty_like(x), torch.empty_like(pre)
        collapse_backward(*as_numpy(x.reshape(-1, *x.shape[-2:]), pre.reshape(-1, pre.shape[-1]),
                                  g.reshape(-1, g.shape[-1])),
                          dx.view(-1, *x.shape[-2:]).numpy(), dpre.view(-1, pre.shape[-1]).numpy())
        return dx, dpre


class _Expand(torch.autograd.Function):
    """``expand`` on CPU in fp32 through ``_mhc_cpu``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        from ._mhc_cpu import expand_forward

        n, D = x.shape[-2:]
        out = torch.empty_like(x)
        expand_forward(*as_numpy(y.reshape(-1, D), x.reshape(-1, n, D), post.reshape(-1, n), comb.reshape(-1, n, n)),
                       out.view(-1, n, D).numpy())
        ctx.save_for_backward(y, x, post, comb)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from ._mhc_cpu import expand_backward

        y, x, post, comb = ctx.saved_tensors
        n, D = x.shape[-2:]
        dy, dx = torch.empty_like(y), torch.empty_like(x)
        dpost, dcomb = torch.empty_like(post), comb.new_empty(comb.shape)
        expand_backward(*as_numpy(y.reshape(-1, D), x.reshape(-1, n, D), post.reshape(-1, n), comb.reshape(-1, n, n),
                                g.reshape(-1, n, D)),
                        dy.view(-1, D).numpy(), dx.view(-1, n, D).numpy(), dpost.view(-1, n).numpy(),
                        dcomb.view(-1, n, n).numpy())
        return dy, dx, dpost, dcomb


def collapse(x: torch.Tensor, pre: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Sublayer input sum_i pre_i X_i: x [B,S,n,D], pre [B,S,n] -> [B,S,D] in x's dtype.

    On CPU (fp32) a compiled loop (``_mhc_cpu``); elsewhere a per-token [1,n] x [n,D] matmul, which
    measured (n=4, D=256, 8k tokens, one CPU thread) 5x faster forward + backward than a broadcast
    product summed over the stream axis, and ~15x faster than n multiply-adds. Backend "triton": one
    kernel (``_mhc_triton``).
    """
    path = _path(backend, x)
    if path == "triton":
        from ._mhc_triton import Collapse

        return Collapse.apply(x, pre.float())
    if path == "cpu":
        return _Collapse.apply(x, pre.float())
    return torch.matmul(pre.to(x.dtype).unsqueeze(-2), x).squeeze(-2)


def expand(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
           backend: str = "auto") -> torch.Tensor:
    """New streams X'_j = post_j y + sum_i comb[i, j] X_i: y [B,S,D], x [B,S,n,D] -> [B,S,n,D]."""
    path = _path(backend, x, y)
    if path == "triton":
        from ._mhc_triton import Expand

        return Expand.apply(y, x, post.float(), comb.float())
    if path == "cpu":
        return _Expand.apply(y, x, post.float(), comb.float())
    # comb^T X per token, [B,S,n,D]. comb^T contiguous: ``sinkhorn`` hands back a permuted view, and
    # bmm over batches of strided 4x4 matrices copies each one (~10x slower on CPU at 8k tokens).
    mixed = torch.matmul(comb.to(x.dtype).transpose(-1, -2).contiguous(), x)
    return torch.addcmul(mixed, post.to(x.dtype).unsqueeze(-1), y.unsqueeze(-2))


def head_collapse(x: torch.Tensor, fn: torch.Tensor, base: torch.Tensor, scale: torch.Tensor,
                  spec: HCSpec) -> torch.Tensor:
    """Final collapse before the norm: sum_i (sigmoid(a * mix_i + b_i) + eps) X_i, [B,S,n,D] -> [B,S,D]."""
    if _path(spec.backend, x) == "triton":
        return _CollapseTriton.apply(x, fn.float(), base.float(), scale.float(), spec.norm_eps, spec.eps)[0]
    pre = torch.sigmoid(_mix(x, fn, spec.norm_eps) * scale.float() + base.float()) + spec.eps
    return collapse(x, pre, spec.backend)
