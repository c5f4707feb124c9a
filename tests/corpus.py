"""A generated JSONL corpus of any size made from the bundled plays, with variation (offline, deterministic)."""

from __future__ import annotations

import json
import random
from pathlib import Path

from moesaic.trainer.sources import shakespeare_source


def paragraphs() -> list[str]:
    source = shakespeare_source()
    return [p.strip() for play in source.read(0, source.units) for p in play.split("\n\n") if p.strip()]


def write_corpus(root: Path, mib: float, parts: int = 4, seed: int = 0) -> str:
    """``parts`` JSONL files of about ``mib`` MiB in all, documents of 2-40 paragraphs in the field "text";
    returns their glob. Every document gets a number, and a few are empty or whitespace."""
    rng = random.Random(seed)
    paras = paragraphs()
    root.mkdir(parents=True, exist_ok=True)
    files = [open(root / f"part-{i:03d}.jsonl", "w", encoding="utf-8") for i in range(parts)]
    written, budget, n = 0, int(mib * 2**20), 0
    while written < budget:
        if rng.random() < 0.01:
            text = rng.choice(["", "   \n"])
        else:
            start = rng.randrange(len(paras))
            text = f"Document {n}.\n\n" + "\n\n".join(paras[start:start + rng.randint(2, 40)])
        line = json.dumps({"id": n, "text": text}) + "\n"
        files[min(parts - 1, written * parts // budget)].write(line)
        written += len(line.encode())
        n += 1
    for f in files:
        f.close()
    return str(root / "*.jsonl")
