"""Data preparation: tokens/s with 1 and 2 workers, peak memory at 1x and 4x the corpus, and training
start-up time on a prepared corpus, against the previous in-memory pipeline on the same corpus.

    python benchmarks/data_prep.py [--mib 12] [--baseline PYTHONPATH]

The corpus is generated JSONL (tests/corpus.py: paragraphs of the bundled plays, numbered documents)
of ``--mib`` and 4x ``--mib`` MiB. Every case runs in a fresh process (``data.prepare_data`` on the
tiny config, vocab 4096, its own cache) and reports the preparation time, the time of a second
``prepare_data`` (what a training start costs once the data is prepared) and the process's peak RSS.
The new pipeline trains its BPE on an 8 MB sample; the baseline (``--baseline``: the PYTHONPATH under
which ``import moesaic`` is the previous version; "" = the installed one) trains it on all the text.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from corpus import write_corpus  # noqa: E402

CHILD = """
import json, resource, sys, time
from moesaic.configs import load_config
from moesaic.trainer.data import prepare_data
cfg = load_config("tiny", sys.argv[1:])
start = time.perf_counter(); bundle = prepare_data(cfg); prep = time.perf_counter() - start
start = time.perf_counter(); prepare_data(cfg); startup = time.perf_counter() - start
tokens = bundle.stats["train_tokens"] + bundle.stats["val_tokens"]
print(json.dumps({"prep_s": prep, "startup_s": startup, "tokens": tokens,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run(pythonpath: str | None, overrides: list[str]) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", CHILD, *overrides], env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=float, default=12)
    parser.add_argument("--baseline", default=None, help='PYTHONPATH of the previous version ("" = installed)')
    args = parser.parse_args()
    ours = os.environ.get("PYTHONPATH", str(Path(__file__).resolve().parents[2]))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 4):
            glob = write_corpus(Path(tmp) / f"corpus{scale}", args.mib * scale)
            cases = [(f"new, {n} worker(s)", ours, [f"data.num_proc={n}", "data.tokenizer_sample_bytes=8000000"])
                     for n in (1, 2)]
            if args.baseline is not None:
                cases.append(("previous (in memory)", args.baseline, []))
            for name, path, extra in cases:
                cache = Path(tmp) / f"cache-{scale}-{len(rows)}"
                r = run(path, [f"data.dataset={glob}", f"data.cache_dir={cache}", *extra])
                rows.append((scale, name, r))
                print(f"{args.mib * scale:6.0f} MiB  {name:22s} {r['tokens'] / r['prep_s']:10.0f} tok/s  "
                      f"prep {r['prep_s']:6.1f} s  start-up {r['startup_s']:6.3f} s  peak {r['peak_mib']:6.0f} MiB",
                      flush=True)
    print("| corpus | pipeline | tokens | tokens/s | prep s | start-up s | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for scale, name, r in rows:
        print(f"| {args.mib * scale:.0f} MiB | {name} | {r['tokens']} | {r['tokens'] / r['prep_s']:.0f} | "
              f"{r['prep_s']:.1f} | {r['startup_s']:.3f} | {r['peak_mib']:.0f} |")


if __name__ == "__main__":
    main()
