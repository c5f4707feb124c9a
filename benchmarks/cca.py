"""ZAYA1's CCA layer vs GQA and MHA layers at equal hidden size: KV-cache bytes per token and forward + backward time.

    python benchmarks/cca.py [--hidden 1024] [--lengths 4096 8192 16384] [--reps 1] [--rounds 2] [--threads 2]

One attention layer each, the widths in ZAYA1-8B's proportions at hidden size D with head_dim 128:
MHA has D/128 heads for q, k and v; GQA the same query heads over a quarter as many KV heads; CCA
(ZAYA1) compresses the queries to half of them (D/2 wide) and the keys/values to an eighth (D/8),
with 2+2 convolution taps. KV bytes come from the specs' accounting (bf16, per token, no window;
CCA's constant convolution/value-shift state is reported beside it). Time is the best over rounds of
``--reps`` forward + backward passes of one layer on x [1, S, D] (fp32), the three layers alternating
within each round so that a slow spell of the host affects all of them.
"""

from __future__ import annotations

import argparse
import time

import torch

from moesaic.configs.schema import AttentionConfig, ModelConfig
from moesaic.model.attention import AttentionSpec
from moesaic.model.attention.cca import CCASpec
from moesaic.model.attention.gqa import GQASpec

HEAD_DIM = 128


def layers(hidden: int) -> dict[str, AttentionSpec]:
    heads = hidden // HEAD_DIM
    return {"MHA": GQASpec(num_heads=heads, num_kv_heads=heads, head_dim=HEAD_DIM, qk_norm=False),
            "GQA": GQASpec(num_heads=heads, num_kv_heads=max(1, heads // 4), head_dim=HEAD_DIM, qk_norm=False),
            "CCA": CCASpec(num_heads=heads // 2, num_kv_heads=max(1, heads // 8), head_dim=HEAD_DIM)}


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    out, _ = layer(x)
    out.square().mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--reps", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    specs = layers(args.hidden)
    cfg = ModelConfig(hidden_size=args.hidden, num_layers=1, attention=AttentionConfig(menu=dict(specs)))
    torch.manual_seed(0)
    built = {name: spec.build(cfg, 0) for name, spec in specs.items()}
    kv = {name: spec.dense_kv_bytes_per_token("bf16") for name, spec in specs.items()}
    cca = specs["CCA"]
    assert isinstance(cca, CCASpec)
    print(f"hidden {args.hidden}: " + ", ".join(
        f"{name} {s.num_heads} q heads / {s.num_kv_heads} kv heads of {HEAD_DIM}" for name, s in specs.items()))
    print("KV bytes per token per layer (bf16): " + ", ".join(f"{name} {b:.0f}" for name, b in kv.items())
          + f"; MHA / CCA = {kv['MHA'] / kv['CCA']:.1f}x, GQA / CCA = {kv['GQA'] / kv['CCA']:.1f}x; "
          f"CCA constant state {cca.state_bytes('bf16'):.0f} B per sequence")
    print("| tokens | MHA fwd+bwd (s) | GQA (s) | CCA (s) | CCA / MHA | CCA / GQA |")
    print("|---|---|---|---|---|---|")
    for tokens in args.lengths:
        x = torch.randn(1, tokens, args.hidden, generator=torch.Generator().manual_seed(tokens), requires_grad=True)
        times = {name: float("inf") for name in built}
        for layer in built.values():
            fwd_bwd(layer, x[:, :512])  # warm-up
        for _ in range(args.rounds):
            for name, layer in built.items():
                times[name] = min(times[name], *(fwd_bwd(layer, x) for _ in range(args.reps)))
                layer.zero_grad(set_to_none=True)
        print(f"| {tokens} | {times['MHA']:.3f} | {times['GQA']:.3f} | {times['CCA']:.3f} | "
              f"{times['CCA'] / times['MHA']:.3f} | {times['CCA'] / times['GQA']:.3f} |")


if __name__ == "__main__":
    main()
