"""Shared pytest fixtures."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter. Set here, before any test module imports transformers:
# that imports triton, which reads the setting once.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_NAMES = ("ROMEO", "JULIET", "NURSE", "FRIAR", "MERCUTIO", "TYBALT")
_WORDS = ("the love night sweet fair death lord lady hand heart name rose light star kiss sword house "
          "tomorrow morning moon blood tears grave hour gentle thou thee thy art hath doth shall will "
          "good come speak hear see never ever more yet then now here there what why how café naïve").split()


class TinyCorpus(NamedTuple):
    documents: list[str]  # the text of each document, in file (= sorted path) order
    glob: str  # matches one UTF-8 .txt file per document: a value for data.dataset


def _play(rng: random.Random) -> str:
    speeches = []
    for _ in range(rng.randint(30, 60)):
        line = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 12)))
        speeches.append(f"{rng.choice(_NAMES)}:\n{line[0].upper()}{line[1:]}{rng.choice('.!?')}\n")
    return "\n".join(speeches)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> TinyCorpus:
    """24 small offline pseudo-plays (~60 KB): enough for a BPE of vocab 512 and many 33-token blocks."""
    rng = random.Random(0)
    root = tmp_path / "tiny_corpus"
    root.mkdir()
    docs = [_play(rng) for _ in range(24)]
    for i, doc in enumerate(docs):
        (root / f"doc_{i:03d}.txt").write_text(doc, encoding="utf-8")
    return TinyCorpus(docs, str(root / "*.txt"))


@pytest.fixture
def offline_hf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep every Hugging Face cache in tmp and forbid network use (the data tests)."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_home" / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
