"""Token-choice top-k router with DeepSeek's aux-loss-free balancing (MODEL_SPEC §6).

Selection uses ``scores + expert_bias``; the gates use the unbiased scores, so the bias steers load
without entering the gradient or the output scale. The bias moves only when the trainer calls
``update_bias`` once per optimizer step with all-reduced counts, so every rank holds the same bias
whatever the gradient accumulation. The forward is sync-free: no ``.item()``, no branching on
tensor values.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.checkpointing import recomputing
from moesaic.model.norm import rms_normalize
from moesaic.model.sequence import WHOLE, WholeSequence

# Buffers kept in fp32 whatever the module dtype: a bf16 bias cannot absorb steps of 1e-3, and
# bf16 counts stop being exact past 256.
_FP32_BUFFERS = ("expert_bias", "load_counts", "stat_counts", "stat_sums")


class RouterOutput(NamedTuple):
    topk_idx: torch.Tensor  # [T, k] long, selected experts per token (T = B*S)
    gates: torch.Tensor  # [T, k] fp32, weights of the selected experts' outputs
    aux_loss: torch.Tensor  # scalar fp32, sequence-wise balance loss + router z-loss (already times their coefs)


def hash_routing_table(vocab_size: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """Deterministic token id -> k distinct experts table [vocab_size, k] long, balanced over experts.

    moesaic's own construction (DeepSeek's is unconfirmed, MODEL_SPEC §14). Token ids are visited
    in a seeded random order, which decorrelates the table from id order (in a BPE vocabulary id
    order follows merge order, hence frequency), and each takes the next k entries of a stream of
    rounds, every round a seeded random permutation of all experts. So every expert serves
    floor or ceil(vocab_size * k / num_experts) ids, and pairs of experts vary between rows. A row
    that straddles two rounds could repeat an expert: the new round is reordered so that its first
    entries avoid the experts that row already has (always possible as k <= num_experts).
    """
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(vocab_size, generator=gen, device="cpu")  # [V] id of the r-th row
    stream: list[int] = []
    while len(stream) < vocab_size * k:
        perm = torch.randperm(num_experts, generator=gen, device="cpu").tolist()
        open_row = stream[len(stream) - len(stream) % k:]
        head = [e for e in perm if e not in open_row][: (k - len(open_row)) % k]
        stream += head + [e for e in perm if e not in head]
    table = torch.empty(vocab_size, k, dtype=torch.long, device="cpu")
    table[order] = torch.tensor(stream[: vocab_size * k], device="cpu").view(vocab_size, k)
    return table


class Router(nn.Module):
    """Scores tokens against the experts, selects k per token and weights them.

    Parameter and buffer names follow the official checkpoint (``ffn.gate.weight``); the official
    ``ffn.gate.bias`` is ``expert_bias`` here.

    Hash routing (the first ``num_hash_layers`` layers, MODEL_SPEC §6): ``_select`` takes the
    experts from the frozen ``tid2eid[input_ids]`` buffer [vocab, k] instead of the biased top-k;
    the gates still come from the learned scores at those experts, normalised and scaled as
    above (V4 and transformers do the same). A hash layer never uses ``expert_bias``, so it stays
    zero (``update_bias`` skips it). The table is ``hash_routing_table`` when training from
    scratch and the checkpoint's when importing one.

    DeepSeek-V3's group-limited routing (``n_group`` > 1, ``_limit_groups``) restricts the biased top-k to each
    token's best ``topk_group`` groups of experts; the gates are still the unbiased scores.

    Gemma 4's router (``Gemma4TextRouter``, MOSAIC_SPEC §1.7) is two options: ``router_input_norm``
    scores z = rms_normalize(x) * scale * D^-0.5 instead of x (``scale`` [D] from 1 = HF ``router.scale``),
    and ``per_expert_scale`` multiplies the selected, renormalised gates by ``per_expert_scale[idx]``
    ([E] from 1 = HF ``router.per_expert_scale``); ``weight`` is HF ``router.proj.weight``. With
    softmax scores, norm_topk_prob, routed_scaling_factor 1 and no bias update this is Gemma's router.

    Laguna's (``LagunaTopKRouter``, MOSAIC_SPEC §2.4) is sigmoid scores of logits optionally
    soft-capped (``router_logit_softcap`` c: c * tanh(logits / c)), the bias (HF
    ``e_score_correction_bias``) for selection only, gates always renormalised, then times
    ``routed_scaling_factor``. transformers' Laguna aux loss takes a softmax over these sigmoid logits
    (§2.5), a Switch loss that does not fit the router, so it has no counterpart here: balance comes from
    the bias update and ``seq_aux_loss_coef``, and the panel's balance metrics read the real selections.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        moe = cfg.moe
        self.layer_idx = layer_idx
        self.hash = layer_idx < moe.num_hash_layers
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.score_func = moe.score_func
        self.norm_topk_prob = moe.norm_topk_prob
        self.routed_scaling_factor = moe.routed_scaling_factor
        self.n_group, self.topk_group = moe.n_group, moe.topk_group
        self.bias_update_rate = moe.bias_update_rate
        self.seq_aux_loss_coef = moe.seq_aux_loss_coef
        self.z_loss_coef = moe.z_loss_coef
        self.weight = nn.Parameter(torch.empty(moe.num_experts, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.init_std)
        self.eps = cfg.rms_norm_eps
        self.logit_softcap = moe.router_logit_softcap
        self.scale = nn.Parameter(torch.ones(cfg.hidden_size)) if moe.router_input_norm else None
        self.per_expert_scale = nn.Parameter(torch.ones(moe.num_experts)) if moe.per_expert_scale else None
        self.register_buffer("expert_bias", torch.zeros(moe.num_experts), persistent=True)
        # Tokens routed to each expert since the last reset_load_counts(); trainer-owned lifecycle.
        self.register_buffer("load_counts", torch.zeros(moe.num_experts), persistent=False)
        if self.hash:
            self.register_buffer("tid2eid", hash_routing_table(cfg.vocab_size, moe.num_experts, moe.top_k, layer_idx),
                                 persistent=True)
        # Metrics accumulators over the trainer's log window, separate from load_counts (which the
        # bias update clears every optimizer step): tokens per expert, and sums over tokens of the
        # score entropy (nats) and of the sequence aux loss. Reset by reset_stats() at log steps.
        self.register_buffer("stat_counts", torch.zeros(moe.num_experts), persistent=False)
        self.register_buffer("stat_sums", torch.zeros(2), persistent=False)
        self.track_stats = True  # the metrics panel's switch; off skips the accumulation entirely

    fp32_buffers: tuple[str, ...] = _FP32_BUFFERS

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """Follow device moves but never dtype casts for the fp32 buffers (model.bfloat16())."""
        originals = {name: self._buffers[name] for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in originals.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [..., E] in fp32 (routing decisions are precision sensitive)."""
        x = x.float()
        if self.scale is not None:  # Gemma: the un-normed stream, normalised and scaled here
            x = rms_normalize(x, self.eps) * self.scale.float() * x.shape[-1] ** -0.5
        logits = F.linear(x, self.weight.float())
        if self.logit_softcap > 0:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities [..., E] in fp32: the score function of the logits."""
        return self._activate(self.logits(x))

    def _activate(self, logits: torch.Tensor) -> torch.Tensor:
        if self.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        if self.score_func == "sigmoid":
            return logits.sigmoid()
        return logits.softmax(dim=-1)

    def _select(self, scores: torch.Tensor, input_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """Top-k experts of scores + bias [T, E] -> [T, k]; ties go to the lower expert index.

        Hash layers look the experts of input_ids [B, S] up in tid2eid instead.
        """
        if self.hash:
            if input_ids is None:
                raise ValueError(f"layer {self.layer_idx} routes by token-id hash and needs input_ids")
            return self.tid2eid[input_ids.reshape(-1)]
        biased = scores + self.expert_bias
        if self.n_group > 1:
            biased = self._limit_groups(biased)
        # A stable descending sort keeps equal values in index order; topk gives no such promise.
        return biased.sort(dim=-1, descending=True, stable=True).indices[:, : self.top_k]

    def _limit_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3's group-limited routing (MOSAIC_SPEC §4.5): biased scores [T, E] with -inf outside each
        token's topk_group groups, ranked by the sum of their two best biased scores (ties: the lower group)."""
        grouped = biased.view(biased.shape[0], self.n_group, -1)  # [T, G, E/G]
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
        keep = group_scores.sort(dim=-1, descending=True, stable=True).indices[:, :self.topk_group]  # [T, topk_group]
        allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        return grouped.masked_fill(~allowed.unsqueeze(-1), float("-inf")).view_as(biased)

    def forward(self, x: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                sequence: WholeSequence = WHOLE, carry: Optional[dict] = None) -> RouterOutput:
        """Route x [B, S, D] (input_ids [B, S]: hash layers); counts the selections into load_counts while training.

        ``sequence``: the positions x holds, a shard of the sequences under SP (the aux loss's statistics).
        ``carry``: state routers hand from layer to layer (the MLP router's); this router has none.
        """
        batch, seq, _ = x.shape
        logits = self.logits(x).view(batch * seq, self.num_experts)  # [T, E]
        scores = self._activate(logits)
        topk_idx = self._select(scores, input_ids)  # [T, k]
        gates = scores.gather(-1, topk_idx)  # [T, k], unbiased
        if self.norm_topk_prob:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + 1e-20)
        if self.per_expert_scale is not None:
            gates = gates * self.per_expert_scale.float()[topk_idx]
        gates = gates * self.routed_scaling_factor
        aux_loss = self._seq_aux_loss(scores.view(batch, seq, -1), topk_idx.view(batch, seq, -1), sequence)
        if self.training and not recomputing():  # a checkpointed block's recompute was counted in its forward
            self._count(topk_idx)
            if self.track_stats:
                self._accumulate_stats(scores, topk_idx, aux_loss, sequence.shards)
        return RouterOutput(topk_idx, gates, aux_loss + self._z_loss(logits, sequence))

    @torch.no_grad()
    def _count(self, topk_idx: torch.Tensor, taken: Optional[torch.Tensor] = None) -> None:
        """Accumulate on device (index_add_, not bincount, which syncs on CUDA); ``taken`` [T, k] (0/1) leaves
        out selections that reach no expert (the MLP router's skip)."""
        flat = topk_idx.reshape(-1)
        ones = torch.ones_like(flat, dtype=self.load_counts.dtype) if taken is None else taken.reshape(-1)
        self.load_counts.index_add_(0, flat, ones.to(self.load_counts.dtype))

    @torch.no_grad()
    def _accumulate_stats(self, scores: torch.Tensor, topk_idx: torch.Tensor, aux_loss: torch.Tensor,
                          shards: int, taken: Optional[torch.Tensor] = None) -> None:
        """Add this batch to the metrics window: O(T*E) elementwise work, no host sync."""
        flat = topk_idx.reshape(-1)
        ones = torch.ones_like(flat, dtype=self.stat_counts.dtype) if taken is None else taken.reshape(-1)
        self.stat_counts.index_add_(0, flat, ones.to(self.stat_counts.dtype))
        probs = scores / scores.sum(dim=-1, keepdim=True)  # [T, E]
        entropy = torch.special.entr(probs).sum()  # summed over tokens
        # aux_loss is this shard's share of the sequences' loss: x shards gives the whole sequence's weight.
        self.stat_sums += torch.stack([entropy, aux_loss.detach().float() * scores.shape[0] * shards])

    @torch.no_grad()
    def reset_stats(self) -> None:
        """Start a new metrics window (after the trainer has read the stats at a log step)."""
        self.stat_counts.zero_()
        self.stat_sums.zero_()

    def _seq_aux_loss(self, scores: torch.Tensor, topk_idx: torch.Tensor, sequence: WholeSequence,
                      taken: Optional[torch.Tensor] = None) -> torch.Tensor:
        """DeepSeek-V3's sequence-wise balance loss alpha * sum_i f_i P_i, averaged over sequences.

        scores [B, S, E], topk_idx [B, S, k]. f_i = E/(k*S) * (tokens of the sequence choosing i)
        carries no gradient; P_i = mean over the sequence of s_i / sum_j s_j does. On a shard of the
        sequences (``sequence``) f counts the whole sequences and P sums this shard's tokens only, so
        the shards' losses add up to the whole sequences' loss and gradient.
        """
        if self.seq_aux_loss_coef == 0:
            return scores.new_zeros(())
        batch, seq, _ = scores.shape
        shards = sequence.shards
        chosen = scores.new_zeros(batch, self.num_experts)
        ones = scores.new_ones(batch, seq * self.top_k) if taken is None else taken.reshape(batch, -1).to(scores.dtype)
        chosen.scatter_add_(1, topk_idx.reshape(batch, -1), ones)
        f = sequence.sum(chosen) * (self.num_experts / (self.top_k * seq * shards))  # [B, E]
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1) / shards  # [B, E]
        return self.seq_aux_loss_coef * (f * p).sum(dim=-1).mean()

    def _z_loss(self, logits: torch.Tensor, sequence: WholeSequence) -> torch.Tensor:
        """ST-MoE's router z-loss, coef * mean over tokens of logsumexp_j(logits)^2 (as Megatron), on logits
        [T, E]: keeps the logits small; a shard's mean is divided by the shards so that they add up."""
        if self.z_loss_coef == 0:
            return logits.new_zeros(())
        return self.z_loss_coef * logits.logsumexp(dim=-1).square().mean() / sequence.shards

    @torch.no_grad()
    def update_bias(self, global_counts: torch.Tensor) -> None:
        """V3 rule bias += rate * sign(mean - count): starve overloaded experts, feed idle ones.

        Called by the trainer once per optimizer step with counts summed over all ranks and
        micro-batches, so the result is identical on every rank.
        """
        if self.bias_update_rate == 0 or self.hash:
            return
        counts = global_counts.to(device=self.expert_bias.device, dtype=torch.float32)
        self.expert_bias += self.bias_update_rate * torch.sign(counts.mean() - counts)

    @torch.no_grad()
    def reset_load_counts(self) -> None:
        """Start a new accumulation window (after the trainer has consumed the counts)."""
        self.load_counts.zero_()
