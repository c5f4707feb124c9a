"""Tokenizers for moesaic: a byte-level BPE trained on the training split, or a tokenizer.json.

Byte-level BPE is lossless (every string round-trips through ``encode``/``decode``) and needs no
files from the internet, so a run can train its own vocabulary of exactly ``model.vocab_size``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Sequence

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from moesaic.configs import ConfigError

EOS_TOKEN = "<|endoftext|>"
# End-of-text tokens looked up, in order, in a user-supplied tokenizer.json.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
# 256 byte symbols + EOS: the smallest vocabulary a byte-level BPE can have.
MIN_BPE_VOCAB = 257


class Tokenizer:
    """Thin wrapper over ``tokenizers.Tokenizer`` exposing what packing and sampling need."""

    def __init__(self, tok: HFTokenizer, eos_token: str) -> None:
        eos_id = tok.token_to_id(eos_token)
        if eos_id is None:
            raise ValueError(f"token {eos_token!r} is not in the vocabulary")
        self._tok = tok
        self.eos_token = eos_token
        self.eos_id: int = eos_id
        # One past the largest id, so embeddings of this size cover every id the tokenizer emits.
        self.vocab_size: int = max(tok.get_vocab(with_added_tokens=True).values()) + 1
        self.fingerprint: str = hashlib.sha256(tok.to_str().encode()).hexdigest()

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without any special tokens (packing adds EOS itself)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many documents (Rust-side, in parallel), each framed as the tokenizer frames a sequence
        (a transformers tokenizer.json's template adds its BOS, for instance; moesaic's BPE has none) and ending
        with EOS, appended unless the template already put it there."""
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        docs = [e.ids for e in encode(list(texts), add_special_tokens=True)]
        return [ids if ids and ids[-1] == self.eos_id else [*ids, self.eos_id] for ids in docs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        with atomic_open(Path(path)) as f:
            f.write(self._tok.to_str())


@contextlib.contextmanager
def atomic_open(path: Path, mode: str = "w") -> Iterator[IO[Any]]:
    """Write beside ``path``, then rename into place: readers (other ranks, later runs) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def check_bpe_vocab(vocab_size: int) -> None:
    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"model.vocab_size={vocab_size} is too small for data.tokenizer='bpe' "
                          f"(a byte-level BPE needs >= {MIN_BPE_VOCAB}: 256 bytes + {EOS_TOKEN})")


def train_bpe(texts: Sequence[str], vocab_size: int) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE with ``<|endoftext|>`` as id 0."""
    check_bpe_vocab(vocab_size)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer, length=len(texts))
    return Tokenizer(tok, EOS_TOKEN)


def load_tokenizer_file(spec: str, model_vocab_size: int) -> Tokenizer:
    """Load ``data.tokenizer`` (a tokenizer.json, or a folder holding one) and check it fits the model."""
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"data.tokenizer='{spec}' is neither 'bpe' nor an existing tokenizer.json file")
    try:
        tok = HFTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises bare Exceptions for malformed files
        raise ConfigError(f"data.tokenizer='{spec}' could not be loaded: {str(exc).splitlines()[0]}") from None
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
    if eos is None:
        raise ConfigError(f"data.tokenizer='{spec}' has no end-of-text token (looked for {', '.join(EOS_CANDIDATES)})")
    wrapped = Tokenizer(tok, eos)
    if wrapped.vocab_size > model_vocab_size:
        raise ConfigError(f"data.tokenizer='{spec}' has {wrapped.vocab_size} token ids but "
                          f"model.vocab_size={model_vocab_size}: set model.vocab_size >= {wrapped.vocab_size}")
    return wrapped


def read_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer that moesaic trained and cached itself."""
    return Tokenizer(HFTokenizer.from_file(str(path)), EOS_TOKEN)
