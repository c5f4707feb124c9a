"""The single-device DeepSeek-V4-style language model: embed -> decoder layers -> norm -> head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs.schema import ModelConfig

from .block import Block
from .norm import RMSNorm
from .sequence import WHOLE, WholeSequence


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B,S,V]
    loss: Optional[torch.Tensor]  # lm_loss + aux_loss; None without labels
    lm_loss: Optional[torch.Tensor]  # mean cross-entropy over labels != -100; None without labels
    aux_loss: torch.Tensor  # sum of the layers' auxiliary losses (MoE balance, indexer), scalar


class Transformer(nn.Module):
    sequence: WholeSequence = WHOLE  # a shard of it under sequence parallelism: the LM loss's token count

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)

    def make_caches(self, batch_size: int) -> list:
        """Fresh per-layer decode state, each layer choosing its own cache type."""
        ref = self.head.weight
        return [layer.attn.make_cache(batch_size, ref.device, ref.dtype) for layer in self.layers]

    def forward(self, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None,
                caches: Optional[Sequence[object]] = None) -> ModelOutput:
        """input_ids [B,S] -> logits [B,S,V]; with ``caches`` the tokens continue the cached sequence."""
        x = self.embed(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, input_ids, caches[i] if caches is not None else None)
            aux_loss = aux_loss + layer_aux
        logits = self.head(self.norm(x))
        if labels is None:
            return ModelOutput(logits=logits, loss=None, lm_loss=None, aux_loss=aux_loss)
        # Sum / count instead of mean so a micro-batch with every label ignored gives 0, not NaN.
        total = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        # On a shard of the sequences the count is the whole sequences': the shards' losses add up to the mean.
        lm_loss = total / self.sequence.sum((labels != -100).sum()).clamp(min=1)
        return ModelOutput(logits=logits, loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss)

    def routers(self) -> list[nn.Module]:
        """MoE routers, i.e. modules with ``update_bias``; the trainer updates their bias per optimizer step."""
        return [m for m in self.modules() if callable(getattr(m, "update_bias", None))]

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count; ``active_only`` counts top_k of num_experts routed experts per MoE layer.

        Relies on the MoE keeping its routed experts under ``ffn.experts`` (the official name).
        """
        total = sum(p.numel() for p in self.parameters())
        if not active_only:
            return total
        moe = self.cfg.moe
        inactive = 0.0
        for layer in self.layers:
            if layer.is_moe:
                routed = sum(p.numel() for p in layer.ffn.experts.parameters())
                inactive += routed * (1 - moe.top_k / moe.num_experts)
        return total - round(inactive)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Prefill the prompt [B,S0] into fresh KV caches, then decode one token per step -> [B, S0 + n].

        temperature 0 is greedy; otherwise sample softmax(logits / temperature), over the top_k
        logits if given.
        """
        caches = self.make_caches(input_ids.shape[0])
        tokens = [input_ids]
        logits = self(input_ids, caches=caches).logits[:, -1]  # [B,V]
        for step in range(max_new_tokens):
            nxt = self._pick(logits.float(), temperature, top_k, generator)  # [B,1]
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, caches=caches).logits[:, -1]
        return torch.cat(tokens, dim=1)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: Optional[int],
              generator: Optional[torch.Generator]) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)
