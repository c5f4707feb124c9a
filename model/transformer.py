"""The single-device DeepSeek-V4-style language model: embed -> decoder layers -> norm -> head.

With mHC (hc_mult = n > 1) the embedding is copied into n residual streams, the layers mix them,
and ``hc_head_*`` collapses them before the final norm (``mhc.py``). MTP blocks (``mtp.py``), if
any, run on the final streams when labels are given and add ``mtp_loss_coef`` x their mean loss.

Gemma 4's model-level options (MOSAIC_SPEC §1.5, §1.6), off by default: ``embed_scale`` multiplies
the token embedding by sqrt(D) (a tied head keeps the unscaled weight), ``ple_dim`` adds per-layer
embeddings (``ple.py``, computed once here, a slice per layer), and ``final_logit_softcap`` caps the
logits, in the plain head, the fused loss (``loss.py``) and the MTP heads alike.

ZAYA1's (MOSAIC_SPEC §3.4): ``residual_scale`` adds the embedding's ``input_hidden_states_scale`` and ``_bias``
[D] (transformers' names), (embed + bias) * scale, and the blocks' scaled residual adds (block.py);
``fp32_residual`` keeps the stream in fp32 up to the final norm.

moesaic name          transformers Gemma 4 name (Gemma4ForCausalLM)   shape
embed.weight          model.embed_tokens.weight                       [V, D]
norm.weight           model.norm.weight                               [D]
head.weight           lm_head.weight (tied to embed_tokens)           [V, D]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from moesaic.configs.schema import ModelConfig

from . import mhc
from .attention import ForwardContext, StatsSink, layer_specs
from .block import Block
from .budget import fit_modes
from .loss import linear_cross_entropy, softcap
from .mtp import MTPBlock
from .norm import RMSNorm
from .ple import PerLayerEmbedding, embedding_scale
from .sequence import WHOLE, WholeSequence


@dataclass
class ModelOutput:
    logits: Optional[torch.Tensor]  # [B,S,V]; None when labels were given (the head is fused into the loss)
    loss: Optional[torch.Tensor]  # lm_loss + aux_loss (+ mtp_loss_coef * mtp_loss); None without labels
    lm_loss: Optional[torch.Tensor]  # mean cross-entropy over labels != -100; None without labels
    aux_loss: torch.Tensor  # sum of the layers' auxiliary losses (MoE balance, indexer), scalar
    mtp_loss: Optional[torch.Tensor] = None  # mean over MTP depths of their cross-entropy; None without MTP/labels


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # The positions a forward holds (moesaic.model.sequence): the whole sequence, or a shard of it once
        # parallel.sp applies sequence parallelism; every forward hands it to the layers in its context.
        self.sequence: WholeSequence = WHOLE
        # The token that ends each packed document (the tokenizer's EOS; set by the trainer, None: unknown). Layers
        # that mix neighbouring tokens (cca) restart at the token after it instead of reading the previous document.
        self.doc_end_token: Optional[int] = None
        specs = layer_specs(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.ple = PerLayerEmbedding(cfg) if cfg.ple_dim else None
        if cfg.residual_scale:  # ZAYA: the embedding's scale and bias (residual.py)
            self.input_hidden_states_scale = nn.Parameter(torch.ones(cfg.hidden_size))
            self.input_hidden_states_bias = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i, specs[i]) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.hc = mhc.HCSpec.from_config(cfg)
        if self.hc.n > 1:
            self.hc_head_fn, self.hc_head_base, self.hc_head_scale = mhc.head_parameters(
                self.hc, cfg.hidden_size, cfg.init_std)
        self.mtp = nn.ModuleList(MTPBlock(cfg, i, specs[cfg.num_layers + i]) for i in range(cfg.mtp_layers))
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
                caches: Optional[Sequence[object]] = None, stats: Optional[StatsSink] = None) -> ModelOutput:
        """input_ids [B,S] -> logits [B,S,V]; with ``caches`` the tokens continue the cached sequence;
        with ``stats`` every attention layer adds its statistics of this forward to the sink."""
        doc_ends = None if self.doc_end_token is None else input_ids == self.doc_end_token  # [B,S]
        ctx = ForwardContext(sequence=self.sequence, caches=caches, stats=stats, doc_ends=doc_ends)
        x = self.embed_tokens(input_ids)
        ple = self.ple(input_ids, x) if self.ple is not None else None  # [B,S,L,P]
        if self.cfg.residual_scale:
            x = (x + self.input_hidden_states_bias) * self.input_hidden_states_scale
        if self.cfg.fp32_residual:
            x = x.float()
        if self.hc.n > 1:
            x = x.unsqueeze(2).expand(-1, -1, self.hc.n, -1)  # [B,S,n,D]: every stream starts as the embedding
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, layer_aux = layer(x, input_ids, ctx, None if ple is None else ple[:, :, i])
            aux_loss = aux_loss + layer_aux
        h = mhc.head_collapse(x, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, self.hc) \
            if self.hc.n > 1 else x
        h = self.norm(h.to(self.norm.weight.dtype))
        cap = self.cfg.final_logit_softcap
        if labels is None:
            return ModelOutput(logits=softcap(self.head(h), cap), loss=None, lm_loss=None, aux_loss=aux_loss)
        # With labels the head is fused into the loss (model/loss.py): no [B, S, V] logits are formed.
        lm_loss = self._mean_loss(linear_cross_entropy(h, self.head.weight, labels, cap=cap), labels)
        if not self.mtp:
            return ModelOutput(logits=None, loss=lm_loss + aux_loss, lm_loss=lm_loss, aux_loss=aux_loss)
        mtp_loss, mtp_aux = self._mtp_loss(x, input_ids, labels, ctx)
        aux_loss = aux_loss + mtp_aux
        loss = lm_loss + aux_loss + self.cfg.mtp_loss_coef * mtp_loss
        return ModelOutput(logits=None, loss=loss, lm_loss=lm_loss, aux_loss=aux_loss, mtp_loss=mtp_loss)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B,S,D] of input_ids [B,S], times sqrt(D) with embed_scale (Gemma); the main
        model's and the MTP blocks' input."""
        x = self.embed(input_ids)
        return x * embedding_scale(self.cfg.hidden_size, x.dtype) if self.cfg.embed_scale else x

    def _mean_loss(self, total: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over labels != -100 of a summed loss; sum / count so a batch with every label ignored gives
        0, not NaN. On a shard of the sequences the count is the whole sequences': the shards' losses add
        up to the mean."""
        return total / self.sequence.sum((labels != -100).sum()).clamp(min=1)

    def _mtp_loss(self, x: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor,
                  ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the MTP depths and their aux loss; x [B,S,(n,)D] the final streams.

        Depth d predicts labels[:, t + d] (the token after t + d) from depth d-1's state at t and
        input token t + d, for t < S - d; depths without positions left are skipped.
        """
        losses, aux_loss, h = [], x.new_zeros((), dtype=torch.float32), x
        for depth, block in enumerate(self.mtp, start=1):
            if input_ids.shape[1] <= depth:
                break
            hidden, h, block_aux = block.predict(h[:, :-1], input_ids[:, depth:], self.embed_tokens, ctx)
            depth_labels = labels[:, depth:]  # no [B, S, V] logits: the head is fused into the loss
            losses.append(self._mean_loss(linear_cross_entropy(hidden, self.head.weight, depth_labels,
                                                               cap=self.cfg.final_logit_softcap), depth_labels))
            aux_loss = aux_loss + block_aux
        return (torch.stack(losses).mean() if losses else aux_loss.new_zeros(())), aux_loss

    def routers(self) -> list[nn.Module]:
        """MoE routers, i.e. modules with ``update_bias``; the trainer updates their bias per optimizer step."""
        return [m for m in self.modules() if callable(getattr(m, "update_bias", None))]

    def num_params(self, active_only: bool = False) -> int:
        """Parameter count of the whole model; ``active_only`` counts top_k of num_experts routed experts
        per MoE layer. Under expert parallelism a rank holds num_local_experts of each layer's experts:
        the count still covers all of them (the same number on every rank and layout).

        The routed experts are the ``GroupedExperts`` modules (sharded or not), wherever the MoE sits
        ("moe" and "dense+moe" layers, MTP blocks).
        """
        from .moe import GroupedExperts  # lazily, as the blocks: dense-only models need no MoE package

        total = float(sum(p.numel() for p in self.parameters()))
        moe = self.cfg.moe
        for experts in (m for m in self.modules() if isinstance(m, GroupedExperts)):
            local = sum(p.numel() for p in experts.parameters())
            routed = local * experts.num_experts / experts.num_local_experts  # every rank's share
            total += routed - local
            if active_only:
                total -= routed * (1 - moe.top_k / moe.num_experts)
        return round(total)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 kv_budget: Optional[float] = None) -> torch.Tensor:
        """Prefill the prompt [B,S0] into fresh KV caches, then decode one token per step -> [B, S0 + n].

        temperature 0 is greedy; otherwise sample softmax(logits / temperature), over the top_k
        logits if given. ``kv_budget`` (bytes of the whole decode cache) lets the budget controller pick
        each elastic layer's mode for this call (model/budget.py); without it they run their eval_mode.
        ``decode_kv_bytes`` holds the bytes the caches hold at the end (MODEL_SPEC §8.2's count).
        """
        fit_modes(self, input_ids.shape[1] + max_new_tokens, kv_budget, input_ids.shape[0])
        caches = self.make_caches(input_ids.shape[0])
        tokens = [input_ids]
        logits = self(input_ids, caches=caches).logits[:, -1]  # [B,V]
        for step in range(max_new_tokens):
            nxt = self._pick(logits.float(), temperature, top_k, generator)  # [B,1]
            tokens.append(nxt)
            if step + 1 < max_new_tokens:
                logits = self(nxt, caches=caches).logits[:, -1]
        self.decode_kv_bytes = sum(c.kv_bytes() for c in caches if c is not None)
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
