"""mHC around one sublayer on CUDA: the Triton kernels (``model.attention.backend=triton``) vs the torch ops.

    python benchmarks/mhc_triton.py [--tokens 8192] [--dim 4096] [--streams 4] [--reps 20] [--dtype bfloat16]

One sublayer site as a block runs it (``mhc.sublayer_collapse``, a stand-in sublayer F(x) = x, ``mhc.expand``)
forward + backward, both paths on the same inputs, alternating within each repetition, the device synchronised
after each pass. Prints the median time of each, the median of the paired ratios (triton / torch) and each path's
peak memory above the inputs. GPU only (the interpreter's CPU times say nothing about the kernels).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moesaic.model import mhc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/mhc_triton.py needs a CUDA device")
    dev, dtype, n, D = torch.device("cuda"), getattr(torch, args.dtype), args.streams, args.dim
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.tokens, n, D, generator=g).to(dev, dtype).requires_grad_()
    fn = (torch.randn((2 + n) * n, n * D, generator=g) / (n * D) ** 0.5).to(dev).requires_grad_()
    base = torch.zeros((2 + n) * n, device=dev, requires_grad=True)
    scale = torch.ones(3, device=dev, requires_grad=True)
    cot = torch.randn(x.shape, generator=g).to(dev, dtype)

    def run(backend: str) -> tuple[float, int]:
        spec = mhc.HCSpec(n, 20, 1e-6, 1e-6, backend)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        h, post, comb = mhc.sublayer_collapse(x, fn, base, scale, spec)
        mhc.expand(h, x, post, comb, backend).backward(cot)
        torch.cuda.synchronize()
        return time.perf_counter() - start, torch.cuda.max_memory_allocated() - before

    for backend in ("triton", "torch"):  # warm-up (compiles the kernels)
        run(backend)
    times: dict[str, list[float]] = {"triton": [], "torch": []}
    peak: dict[str, int] = {}
    for rep in range(args.reps):
        for backend in (("triton", "torch") if rep % 2 == 0 else ("torch", "triton")):
            x.grad = fn.grad = base.grad = scale.grad = None
            seconds, peak[backend] = run(backend)
            times[backend].append(seconds)
    ratios = [a / b for a, b in zip(times["triton"], times["torch"])]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {args.dtype}, {args.tokens} tokens, n={n}, "
          f"D={D}; median of {args.reps} fwd+bwd of one sublayer site")
    for backend, ts in times.items():
        print(f"{backend:>6}: {statistics.median(ts) * 1e3:8.3f} ms, "
              f"peak {peak[backend] / 2**20:8.1f} MiB above the inputs")
    print(f"triton / torch: {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
