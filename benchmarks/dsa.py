"""A DeepSeek-V3.2 DSA layer vs a DeepSeek-V4 CSA layer at the same top-k (and dense MLA as the baseline):
forward + backward time, peak memory and KV-cache bytes per token at growing sequence lengths, batch 1, fp32.

    python benchmarks/dsa.py [--lengths 4096 8192 16384] [--topk 128] [--reps 2] [--threads N] [--clock wall|cpu]
    python benchmarks/dsa.py --vs-hf [--lengths 1024 2048 4096] ...

``--vs-hf``: a training step (forward + LM loss + backward) of the ``deepseek_v32_tiny`` preset in moesaic vs the
same weights in transformers' DeepseekV32ForCausalLM (eager attention: its sdpa path is wrong for DSA, and
transformers' indexer gets no gradient and no loss, so its step does less work than moesaic's).

Both layers have 4 query heads, hidden 256, a 4-head x 32 lightning indexer and the same top-k: DSA picks
k tokens (MLA: latent 128 + RoPE 16, q/k 64, v 64), CSA picks k entries of 4 tokens each beside its
128-token window (V4 backbone: one K = V head of 64). Each (layer, length) runs in a fresh subprocess
(``attention_scaling.run_case``'s measure: best of ``--reps`` fwd + bwd after a warm-up; peak = ru_maxrss
growth over the passes). KV bytes: the layer's decode cache for one sequence at that length, bf16 (indexer keys
bf16 too), per token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_scaling import HIDDEN, peak_bytes  # noqa: E402

from moesaic.configs.schema import AttentionConfig, ModelConfig  # noqa: E402
from moesaic.model.attention import layer_specs  # noqa: E402
from moesaic.model.attention.csa import CSASpec  # noqa: E402
from moesaic.model.attention.dsa import DSASpec  # noqa: E402
from moesaic.model.attention.mla import MLASpec  # noqa: E402

LAYERS = ("mla", "dsa", "csa")
MLA = dict(num_heads=4, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64,
           query_chunk=256)
INDEX = dict(index_heads=4, index_head_dim=32)


def bench_config(kind: str, topk: int) -> ModelConfig:
    spec = {"mla": lambda: MLASpec(**MLA), "dsa": lambda: DSASpec(**MLA, **INDEX, index_topk=topk),
            "csa": lambda: CSASpec(num_heads=4, head_dim=64, rope_head_dim=16, q_lora_rank=128, o_groups=2,
                                   o_lora_rank=128, window=128, ratio=4, **INDEX, index_topk=topk,
                                   query_chunk=256)}[kind]()
    return ModelConfig(hidden_size=HIDDEN, num_layers=1, layer_types=[kind], ffn_types=["dense"],
                       attention=AttentionConfig(menu={kind: spec}))


def run_case(kind: str, seq_len: int, topk: int, reps: int) -> dict:
    torch.manual_seed(0)
    cfg = bench_config(kind, topk)
    layer = layer_specs(cfg)[0].build(cfg, 0)

    def step(x: torch.Tensor) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        out, aux = layer(x)
        (out.square().mean() + aux).backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    step(torch.randn(1, 256, HIDDEN, requires_grad=True))  # lazy imports (numba) stay out of the peak
    x = torch.randn(1, seq_len, HIDDEN, requires_grad=True)
    base = peak_bytes(x.device)
    step(x)
    walls, cpus = zip(*(step(x) for _ in range(reps)))
    return {"wall": min(walls), "cpu": min(cpus), "peak_mib": (peak_bytes(x.device) - base) / 2**20}


def run_model_case(impl: str, seq_len: int, reps: int) -> dict:
    """One training step of deepseek_v32_tiny (random weights, seed 0) in moesaic or transformers (same weights)."""
    import tempfile

    import transformers

    from moesaic.configs import load_config
    from moesaic.model import Transformer
    from moesaic.model.interop import export_hf, save_native

    torch.manual_seed(0)
    model = Transformer(load_config("deepseek_v32_tiny").model)
    if impl == "transformers":
        with tempfile.TemporaryDirectory() as tmp:
            save_native(model, Path(tmp) / "native")
            export_hf(Path(tmp) / "native", Path(tmp) / "hf")
            model = transformers.DeepseekV32ForCausalLM.from_pretrained(Path(tmp) / "hf", attn_implementation="eager")
    model.float().train()
    ids = torch.randint(0, 4096, (1, seq_len), generator=torch.Generator().manual_seed(1))

    def step() -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        model(ids, labels=ids).loss.backward()
        return time.perf_counter() - wall, time.process_time() - cpu

    base = peak_bytes(ids.device)
    step()
    walls, cpus = zip(*(step() for _ in range(reps)))
    return {"wall": min(walls), "cpu": min(cpus), "peak_mib": (peak_bytes(ids.device) - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--topk", type=int, default=128)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per case (0: torch's default)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="the time the ratios use (cpu with --threads 1: least disturbed on a shared host)")
    parser.add_argument("--vs-hf", action="store_true", help="moesaic's DSA model step vs transformers'")
    parser.add_argument("--case", nargs=2, metavar=("LAYER", "SEQ_LEN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        kind, seq_len = args.case[0], int(args.case[1])
        result = run_case(kind, seq_len, args.topk, args.reps) if kind in LAYERS else run_model_case(kind, seq_len,
                                                                                                      args.reps)
        print(json.dumps(result))
        return

    def measure(kind: str, seq_len: int) -> dict:
        cmd = [sys.executable, __file__, "--case", kind, str(seq_len), "--topk", str(args.topk), "--reps",
               str(args.reps), "--threads", str(args.threads)]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])

    t = args.clock
    if args.vs_hf:
        print(f"deepseek_v32_tiny training step, torch {torch.__version__}, {torch.get_num_threads()} threads; best "
              f"of {args.reps}, batch 1, fp32; ratios by {t} time")
        print("| S | moesaic s (wall / cpu) | transformers s (wall / cpu) | time ratio | moesaic MiB | "
              "transformers MiB | memory ratio |")
        print("|---|---|---|---|---|---|---|")
        for seq_len in args.lengths:
            ours, theirs = measure("moesaic", seq_len), measure("transformers", seq_len)
            print(f"| {seq_len} | {ours['wall']:.2f} / {ours['cpu']:.2f} | {theirs['wall']:.2f} / {theirs['cpu']:.2f} "
                  f"| {ours[t] / theirs[t]:.2f} | {ours['peak_mib']:.0f} | {theirs['peak_mib']:.0f} | "
                  f"{ours['peak_mib'] / theirs['peak_mib']:.2f} |")
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; best of {args.reps} fwd+bwd, batch 1, "
          f"fp32, top-k {args.topk}; ratios by {args.clock} time")
    print("| S | layer | wall s | cpu s | peak MiB | KV B/token (bf16) | time / mla | time / csa | memory / csa |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq_len in args.lengths:
        results = {kind: measure(kind, seq_len) for kind in LAYERS}
        for kind, r in results.items():
            kv = sum(layer_specs(bench_config(kind, args.topk))[0].kv_bytes(seq_len, "bf16", "bf16")) / seq_len
            print(f"| {seq_len} | {kind} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['peak_mib']:.0f} | {kv:.1f} | "
                  f"{r[t] / results['mla'][t]:.2f} | {r[t] / results['csa'][t]:.2f} | "
                  f"{r['peak_mib'] / results['csa']['peak_mib']:.2f} |")


if __name__ == "__main__":
    main()
