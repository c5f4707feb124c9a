"""Gemma 4's per-layer embeddings (PLE, MOSAIC_SPEC §1.5): a small extra input for every decoder layer.

Computed once per forward from the token ids and the (scaled) token embedding e [B,S,D], with
L = num_layers and P = ple_dim (``PerLayerEmbedding``):

    tok = embed(ids) * sqrt(P)            # table [V_ple, L*P] -> [B,S,L,P], layer-major: layer i owns columns
    ctx = norm(proj(e) * D^-0.5)          # Linear D -> L*P -> [B,S,L,P]; weighted RMSNorm over P
    ple = (ctx + tok) * 2^-0.5            # layer i reads ple[:, :, i]

and applied at the end of decoder layer i, after the FFN residual add and before ``layer_scalar``
(``PerLayerInput``): ``h = h + norm(proj(act(gate(h)) * ple_i))``, the gate reading the stream h itself.
act is ``model.ffn_activation``, as transformers uses its one ``hidden_activation`` for the MLP, the
experts and this gate (Gemma 4: gelu_tanh). It is per token, so a sequence shard (SP) or a decode
step computes its own slice; MTP blocks have no PLE.

moesaic name                  transformers Gemma 4 name                      shape
ple.embed.weight              model.embed_tokens_per_layer.weight            [V_ple, L*P]
ple.proj.weight               model.per_layer_model_projection.weight        [L*P, D]
ple.norm.weight               model.per_layer_projection_norm.weight         [P]
layers.{i}.ple.gate.weight    model.layers.{i}.per_layer_input_gate.weight   [P, D]
layers.{i}.ple.proj.weight    model.layers.{i}.per_layer_projection.weight   [D, P]
layers.{i}.ple.norm.weight    model.layers.{i}.post_per_layer_input_norm.weight  [D]
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from .ffn import activation_fn
from .norm import RMSNorm


@functools.lru_cache(maxsize=None)
def embedding_scale(dim: int, dtype: torch.dtype) -> float:
    """sqrt(dim) rounded to fp32 and then to the weight dtype, as transformers' Gemma4TextScaledWordEmbedding
    (bf16: sqrt(1536) = 39.19 becomes 39.25), so a bf16 model scales exactly as the reference. Cached: the
    rounding goes through a host tensor, which a forward need not build again."""
    return torch.tensor(dim ** 0.5, dtype=torch.float32).to(dtype).item()


class PerLayerEmbedding(nn.Module):
    """The model-level half: ids and embedding -> every layer's per-layer input [B,S,L,P]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_layers, self.dim = cfg.num_layers, cfg.ple_dim
        width = cfg.num_layers * cfg.ple_dim
        self.embed = nn.Embedding(cfg.ple_vocab_size or cfg.vocab_size, width)
        self.proj = nn.Linear(cfg.hidden_size, width, bias=False)
        self.norm = RMSNorm(cfg.ple_dim, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """input_ids [B,S], embedded [B,S,D] (the scaled token embedding) -> [B,S,L,P]."""
        shape = (*input_ids.shape, self.num_layers, self.dim)
        tok = (self.embed(input_ids) * embedding_scale(self.dim, self.embed.weight.dtype)).view(shape)
        ctx = self.norm((self.proj(embedded) * embedded.shape[-1] ** -0.5).view(shape))
        return (ctx + tok) * 2 ** -0.5


class PerLayerInput(nn.Module):
    """The block-level half: adds ``norm(proj(act(gate(h)) * ple_i))`` to the stream h."""

    def __init__(self, dim: int, ple_dim: int, eps: float, activation: str) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, ple_dim, bias=False)
        self.proj = nn.Linear(ple_dim, dim, bias=False)
        self.norm = RMSNorm(dim, eps)
        self.act = activation_fn(activation)

    def forward(self, h: torch.Tensor, ple: torch.Tensor) -> torch.Tensor:
        """h [B,S,D] (or mHC streams [B,S,n,D]), ple [B,S,P] (or [B,S,1,P]) -> h with the layer's PLE added."""
        return h + self.norm(self.proj(self.act(self.gate(h)) * ple))
