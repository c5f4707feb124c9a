"""One attention layer of each V4 type against dense causal SDPA on one device: forward + backward time,
achieved TFLOP/s and peak memory at long context, per attention backend.

    python benchmarks/gpu_attention.py [--lengths 8192 32768 65536 131072] [--shapes flash small]
                                       [--kinds dense swa csa hca] [--backends torch triton]
                                       [--torch-max-len 32768] [--dtype bf16] [--reps 3]
                                       [--budget SECONDS] [--json PATH] [--smoke]

Shapes: ``flash`` is V4-Flash's attention (MODEL_SPEC §1.1: hidden 4096, 64 query heads of width 512
over one K=V head, RoPE 64, window 128, indexer 64 heads x 128, top-k 512, ratios 4 / 128); ``small``
the same with 16 query heads of width 128 (hidden 2048). The dense baseline has the same hidden size,
query heads and width, through ``F.scaled_dot_product_attention(is_causal=True)`` (torch picks its fused
kernel). Batch 1; time is the best of ``--reps`` passes after one warm-up, the device synchronised
around each; peak is the allocator's peak over the passes minus what the layer and input held before.
TFLOP/s counts each layer's real attention work as the trainer's MFU does
(``AttentionSpec.flops_per_token``: score and value products over the keys each query sees, x3 for
forward + backward, plus CSA's indexer; dense: all earlier keys), projections excluded. A case that runs
out of memory is reported as such and the sweep goes on. Lengths run shortest first, every shape at one
length before the next; the torch backend (a Python loop of PyTorch ops per query block, the baseline
the Triton kernels replace) only up to ``--torch-max-len``. ``--budget`` starts no case after that many
seconds, so a time-limited run ends with the short lengths complete; ``--json`` is rewritten after every
case. ``--smoke`` runs the small shape at 256 tokens in fp32 on whatever device is there (the CPU check
that the script works; its figures mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from moesaic.configs.schema import ModelConfig
from moesaic.model.attention import build_attention
from moesaic.model.attention.presets import v4_attention

SHAPES = {  # hidden, heads, head width, q/o low rank, o groups, indexer heads x width
    "flash": dict(hidden=4096, heads=64, head_dim=512, rank=1024, o_groups=8, index_heads=64, index_head_dim=128),
    "small": dict(hidden=2048, heads=16, head_dim=128, rank=512, o_groups=4, index_heads=16, index_head_dim=128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def layer_config(shape: dict, kind: str, backend: str) -> ModelConfig:
    a = v4_attention(num_heads=shape["heads"], head_dim=shape["head_dim"], rope_head_dim=64, q_lora_rank=shape["rank"],
                     o_groups=shape["o_groups"], o_lora_rank=shape["rank"], window=128, csa_ratio=4, hca_ratio=128,
                     index_heads=shape["index_heads"], index_head_dim=shape["index_head_dim"], index_topk=512,
                     backend=backend)
    return ModelConfig(hidden_size=shape["hidden"], num_layers=1, layer_types=[kind], attention=a)


class DenseAttention(nn.Module):
    """Causal multi-head attention with the layer's hidden size, query heads and width, via fused SDPA."""

    def __init__(self, hidden: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(hidden, 3 * heads * head_dim, bias=False)
        self.out = nn.Linear(heads * head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)  # 3 x [B,H,S,d]
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B,H,S,d]
        return self.out(o.transpose(1, 2).flatten(2)), x.new_zeros(())


def flops_per_token(shape: dict, kind: str, seq_len: int) -> float:
    if kind == "dense":
        return 12 * shape["heads"] * shape["head_dim"] * (seq_len + 1) / 2  # mean keys per causal query
    cfg = layer_config(shape, kind, "torch")
    return cfg.attention.menu[kind].flops_per_token(seq_len)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(shape_name: str, kind: str, backend: str, seq_len: int, dtype: torch.dtype, reps: int,
             device: torch.device) -> dict:
    shape = SHAPES[shape_name]
    torch.manual_seed(0)
    layer = (DenseAttention(shape["hidden"], shape["heads"], shape["head_dim"]) if kind == "dense"
             else build_attention(layer_config(shape, kind, backend), 0)).to(device, dtype)
    x = torch.randn(1, seq_len, shape["hidden"], device=device, dtype=dtype, requires_grad=True)
    case = {"shape": shape_name, "kind": kind, "backend": "sdpa" if kind == "dense" else backend, "seq_len": seq_len}
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(reps + 1):  # the first is the warm-up
            sync(device)
            start = time.perf_counter()
            out, aux = layer(x)
            (out.float().square().mean() + aux).backward()
            sync(device)
            times.append(time.perf_counter() - start)
        best = min(times[1:])
        case.update(seconds=best, tflops=flops_per_token(shape, kind, seq_len) * seq_len / best / 1e12)
        if device.type == "cuda":
            case["peak_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    except torch.OutOfMemoryError:
        case["error"] = "out of memory"
    del layer, x
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 65536, 131072])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["flash", "small"])
    parser.add_argument("--kinds", nargs="+", choices=["dense", "swa", "csa", "hca"], default=["dense", "csa", "hca"])
    parser.add_argument("--backends", nargs="+", choices=["torch", "triton"], default=["torch", "triton"])
    parser.add_argument("--torch-max-len", type=int, default=32768, help="longest length for the torch backend")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0, help="start no case after this many seconds (0: none)")
    parser.add_argument("--json", default=None, help="also write the cases here")
    parser.add_argument("--smoke", action="store_true", help="small shape, 256 tokens, fp32, torch backend")
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.shapes, args.backends, args.dtype, args.reps = [256], ["small"], ["torch"], "fp32", 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = []
    start = time.perf_counter()
    print(f"device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, {args.dtype}\n")
    print("| shape | layer | backend | tokens | ms fwd+bwd | TFLOP/s | peak GiB | time / dense |")
    print("|---|---|---|---|---|---|---|---|")
    for seq_len in sorted(args.lengths):
        for shape in args.shapes:
            dense = None
            for kind in args.kinds:
                for backend in ["sdpa"] if kind == "dense" else args.backends:
                    if backend == "torch" and seq_len > args.torch_max_len:
                        continue
                    if args.budget and time.perf_counter() - start > args.budget:
                        print(f"time budget of {args.budget:.0f} s spent: cases from {shape} {kind} {backend} "
                              f"{seq_len} on not run")
                        return
                    case = run_case(shape, kind, backend, seq_len, DTYPES[args.dtype], args.reps, device)
                    cases.append(case)
                    if args.json:
                        with open(args.json, "w") as f:
                            json.dump(cases, f, indent=1)
                    if "error" in case:
                        print(f"| {shape} | {kind} | {case['backend']} | {seq_len} | {case['error']} | | | |")
                        continue
                    dense = case["seconds"] if kind == "dense" else dense
                    ratio = f"{case['seconds'] / dense:.2f}" if dense else "-"
                    print(f"| {shape} | {kind} | {case['backend']} | {seq_len} | {1e3 * case['seconds']:.1f} | "
                          f"{case['tflops']:.1f} | {case.get('peak_gib', float('nan')):.2f} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
