"""Data pipeline: sources, split, tokenizer, packing, cache, sample order, and error messages. Offline."""

from __future__ import annotations

import itertools
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from moesaic.configs import Config, ConfigError, validate
from moesaic.trainer import data_prep
from moesaic.trainer.data import prepare_data, rank_slice, unigram_entropy
from moesaic.trainer.mixture import GlobalSampler
from moesaic.trainer.sources import parse_hub_spec, shakespeare_source
from moesaic.trainer.tokenizer import Tokenizer


pytestmark = pytest.mark.usefixtures("offline_hf")  # conftest: HF caches in tmp, no network


def make_cfg(tmp_path: Path, dataset: str, **data: object) -> Config:
    cfg = Config()
    cfg.model.vocab_size = 512
    cfg.data.dataset = dataset
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.seq_len = 32
    cfg.data.val_fraction = 0.2
    for key, value in data.items():
        setattr(cfg.data, key, value)
    validate(cfg)
    return cfg


def eos_joined(docs: list[str], tok: Tokenizer) -> np.ndarray:
    return np.array([t for d in docs for t in tok.encode(d) + [tok.eos_id]], dtype=np.int64)


def split(docs: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) documents in source order, as preparation splits them."""
    val = [data_prep.is_val_document(d, val_fraction) for d in docs]
    return [d for d, v in zip(docs, val) if not v], [d for d, v in zip(docs, val) if v]


def config_error(cfg: Config) -> str:
    with pytest.raises(ConfigError) as info:
        prepare_data(cfg)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- sources ---------------------------------------------------------------------------------


def test_all_local_source_kinds_give_the_same_blocks(tiny_corpus, tmp_path):
    from datasets import Dataset

    docs = tiny_corpus.documents
    jsonl = tmp_path / "jsonl" / "part.jsonl"
    jsonl.parent.mkdir()
    jsonl.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)))
    (tmp_path / "pq").mkdir()
    Dataset.from_dict({"content": docs}).to_parquet(str(tmp_path / "pq" / "part.parquet"))
    Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "disk"))

    ref = prepare_data(make_cfg(tmp_path, tiny_corpus.glob))
    for spec in (str(jsonl), str(tmp_path / "pq" / "*.parquet"), str(tmp_path / "disk")):
        other = prepare_data(make_cfg(tmp_path, spec, text_field="content"))
        assert other.path != ref.path  # a separate build, not a shared cache entry
        assert other.tokenizer.fingerprint == ref.tokenizer.fingerprint  # BPE training is deterministic
        np.testing.assert_array_equal(other.train.blocks, ref.train.blocks)
        np.testing.assert_array_equal(other.val.blocks, ref.val.blocks)


def test_shakespeare_builtin_corpus():
    source = shakespeare_source()
    docs = list(source.read(0, source.units))
    assert len(docs) >= 30
    assert sum(map(len, docs)) > 1_000_000
    assert any("O Romeo, Romeo! wherefore art thou Romeo?" in d for d in docs)


def test_hub_spec_parsing():
    assert parse_hub_spec("hf:roneneldan/TinyStories") == ("roneneldan/TinyStories", None)
    assert parse_hub_spec("hf:wikitext:wikitext-103-raw-v1") == ("wikitext", "wikitext-103-raw-v1")
    for bad in ("hf:", "hf::x", "hf:name:", "hf:a:b:c"):
        with pytest.raises(ConfigError, match="must look like hf:NAME or hf:NAME:CONFIG"):
            parse_hub_spec(bad)


def test_hub_stream_stops_near_the_token_cap(tiny_corpus, tmp_path, monkeypatch):
    """The hub path, offline: a fake endless stream stands in for load_dataset(..., streaming=True)."""
    consumed: list[int] = []

    def fake_load_dataset(name: str, config: str | None, *, split: str, streaming: bool, cache_dir: str):
        assert (name, config, split, streaming) == ("owner/corpus", "en", "train", True)
        assert cache_dir.startswith(str(tmp_path / "cache"))
        docs = tiny_corpus.documents
        for i in itertools.count():
            consumed.append(i)
            yield {"id": i, "text": f"{docs[i % len(docs)]}\nSCENE {i}."}

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    bundle = prepare_data(make_cfg(tmp_path, "hf:owner/corpus:en", max_train_tokens=2000))
    assert len(bundle.train) == 2000 // 33 and len(bundle.val) > 0
    # Each pass (the tokenizer's sample, then preparation) stopped after ~8 bytes per capped token of
    # train text and the first validation document.
    assert max(consumed) < 20 and len(consumed) < 40
    message = config_error(make_cfg(tmp_path, "hf:owner/corpus:en", max_train_tokens=2000, text_field="body"))
    assert message == "data.text_field='body' is not a column of data.dataset='hf:owner/corpus:en' (columns: id, text)"


# --- split -----------------------------------------------------------------------------------


def test_split_is_deterministic_by_content():
    docs = [f"document number {i}" for i in range(1000)]
    train, val = split(docs, 0.2)
    assert 150 < len(val) < 250 and len(train) + len(val) == 1000
    assert split(docs, 0.2) == (train, val)
    assert set(split(docs[::-1], 0.2)[1]) == set(val)  # order does not matter
    assert split(docs, 0.0) == (docs, [])


def test_a_split_without_validation_documents_is_one_line(tiny_corpus, tmp_path):
    """A streamed split cannot move a document after the fact: too small a fraction is reported instead."""
    message = config_error(make_cfg(tmp_path, tiny_corpus.glob, val_fraction=1e-12))
    assert message.startswith(f"data.val_fraction=1e-12 holds out 0 of the {len(tiny_corpus.documents)} documents")


# --- tokenizer, packing, cache ---------------------------------------------------------------


def test_tokenizer_round_trip(tiny_corpus, tmp_path):
    tok = prepare_data(make_cfg(tmp_path, tiny_corpus.glob)).tokenizer
    text = "ROMEO:\nBut soft, what light through yonder window breaks?\n\tCafé naïve — 東京 🎭  end "
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eos_id == 0 and tok.eos_id not in ids
    assert tok.vocab_size <= 512
    assert tok.decode([tok.eos_id]) == "<|endoftext|>"


def test_blocks_are_contiguous_slices_of_eos_joined_documents(tiny_corpus, tmp_path):
    cfg = make_cfg(tmp_path, tiny_corpus.glob)
    bundle = prepare_data(cfg)
    tok = bundle.tokenizer
    train_docs, val_docs = split(tiny_corpus.documents, 0.2)
    for blocks, docs in ((bundle.train, train_docs), (bundle.val, val_docs)):
        stream = eos_joined(docs, tok)
        assert len(blocks) == len(stream) // 33 > 0
        assert blocks.blocks.shape == (len(blocks), 33) and blocks.blocks.dtype == np.uint16
        np.testing.assert_array_equal(blocks.blocks.ravel(), stream[: len(blocks) * 33])
        # EOS sits exactly at the document boundaries inside the kept part of the stream.
        ends = np.cumsum([len(tok.encode(d)) + 1 for d in docs]) - 1
        flat = blocks.blocks.ravel()
        assert np.array_equal(np.flatnonzero(flat == tok.eos_id), ends[ends < flat.size])
    item = bundle.train[3]
    assert item.dtype == torch.long and item.shape == (33,)
    batch = bundle.train.batch([5, 0, 5])
    assert batch.shape == (3, 33) and batch[1].equal(bundle.train[0]) and batch[0].equal(batch[2])
    assert bundle.stats["train_blocks"] == len(bundle.train) and bundle.stats["val_documents"] == len(val_docs)


def test_max_train_tokens_caps_the_train_stream(tiny_corpus, tmp_path):
    full = prepare_data(make_cfg(tmp_path, tiny_corpus.glob))
    capped = prepare_data(make_cfg(tmp_path, tiny_corpus.glob, max_train_tokens=1000))
    assert len(capped.train) == 1000 // 33
    np.testing.assert_array_equal(capped.train.blocks, full.train.blocks[: 1000 // 33])
    np.testing.assert_array_equal(capped.val.blocks, full.val.blocks)


def test_second_call_reads_the_cache(tiny_corpus, tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, tiny_corpus.glob)
    first = prepare_data(cfg)
    assert not first.from_cache
    (shard,) = first.path.glob("train-*.bin")
    mtime = shard.stat().st_mtime_ns

    def fail(*args: object) -> None:
        raise AssertionError("cache miss: documents were read or tokenised again")

    with monkeypatch.context() as m:
        m.setattr(data_prep.Reader, "__iter__", fail)
        m.setattr(Tokenizer, "encode_batch", fail)
        second = prepare_data(cfg)
    assert second.from_cache and second.path == first.path
    assert shard.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(second.train.blocks, first.train.blocks)
    assert second.unigram_entropy == first.unigram_entropy
    assert not list(Path(cfg.data.cache_dir).rglob("*.tmp"))

    with Path(tiny_corpus.glob).with_name("doc_000.txt").open("a") as f:
        f.write("\nJULIET:\nA new line changes the corpus.\n")
    third = prepare_data(cfg)
    assert not third.from_cache and third.path != first.path


def test_concurrent_builds_happen_once(tiny_corpus, tmp_path, monkeypatch):
    """Two callers at once (as ranks would): one builds under the file lock, the other reads its cache."""
    cfg = make_cfg(tmp_path, tiny_corpus.glob)
    build = data_prep.prepare_range

    def slow_build(*args: object) -> bool:
        time.sleep(0.5)  # keep the build open long enough for the other caller to reach the cache check
        return build(*args)

    monkeypatch.setattr(data_prep, "prepare_range", slow_build)
    with ThreadPoolExecutor(2) as pool:
        bundles = list(pool.map(prepare_data, [cfg, cfg]))
    assert sorted(b.from_cache for b in bundles) == [False, True]
    assert bundles[0].path == bundles[1].path


def test_tokenizer_json_path_gives_the_same_blocks(tiny_corpus, tmp_path):
    bpe = prepare_data(make_cfg(tmp_path, tiny_corpus.glob))
    (saved,) = (tmp_path / "cache" / "tokenizers").glob("bpe-*.json")
    cfg = make_cfg(tmp_path, tiny_corpus.glob, tokenizer=str(saved), cache_dir=str(tmp_path / "other"))
    from_file = prepare_data(cfg)
    np.testing.assert_array_equal(from_file.train.blocks, bpe.train.blocks)
    assert from_file.tokenizer.eos_id == bpe.tokenizer.eos_id


def test_no_validation_split(tiny_corpus, tmp_path):
    bundle = prepare_data(make_cfg(tmp_path, tiny_corpus.glob, val_fraction=0.0))
    assert len(bundle.val) == 0 and bundle.val.batch([]).shape == (0, 33)
    expected = unigram_entropy(bundle.train.blocks, bundle.train.blocks, bundle.tokenizer.vocab_size)
    assert bundle.unigram_entropy == pytest.approx(expected)


def test_unigram_entropy():
    train = np.array([[0, 1, 1, 1]])  # counts 1, 3, 0 over vocab 3; smoothed: 2/7, 4/7, 1/7
    val = np.array([[2, 1, 2]])  # labels 1, 2
    assert unigram_entropy(train, val, 3) == pytest.approx(-(math.log(4 / 7) + math.log(1 / 7)) / 2)


def test_bundle_unigram_entropy_is_the_val_baseline(tiny_corpus, tmp_path):
    bundle = prepare_data(make_cfg(tmp_path, tiny_corpus.glob))
    v = bundle.tokenizer.vocab_size
    assert bundle.unigram_entropy == pytest.approx(unigram_entropy(bundle.train.blocks, bundle.val.blocks, v))
    assert 0 < bundle.unigram_entropy < math.log(v)


# --- sample order ----------------------------------------------------------------------------


def test_global_sampler_epochs_are_permutations():
    sampler = GlobalSampler(50, seed=7)
    epoch0, epoch1 = sampler.indices(0, 50), sampler.indices(50, 50)
    assert sorted(epoch0) == sorted(epoch1) == list(range(50))
    assert epoch0 != epoch1
    assert GlobalSampler(50, seed=8).indices(0, 50) != epoch0


def test_global_sampler_is_independent_of_chunking_and_resumable():
    whole = GlobalSampler(37, seed=3).indices(11, 200)
    sampler, pieces, pos = GlobalSampler(37, seed=3), [], 11
    for size in (1, 5, 40, 0, 26, 3, 90, 35):
        pieces += sampler.indices(pos, size)
        pos += size
    assert pieces == whole
    assert GlobalSampler(37, seed=3).indices(150, 61) == whole[139:]  # a fresh sampler resumes at 150


def test_rank_slices_do_not_depend_on_data_parallel_size():
    batch = GlobalSampler(100, seed=0).indices(16 * 5, 16)
    assert rank_slice(batch, 0, 1, 4) == [batch[0:4], batch[4:8], batch[8:12], batch[12:16]]
    for dp in (2, 4):
        per_rank = [rank_slice(batch, r, dp, 4) for r in range(dp)]
        assert all(len(mbs) == 4 // dp and all(len(mb) == 4 for mb in mbs) for mbs in per_rank)
        assert [i for mbs in per_rank for mb in mbs for i in mb] == batch
    with pytest.raises(ValueError):
        rank_slice(batch, 0, 3, 4)


# --- errors ----------------------------------------------------------------------------------


def test_error_glob_matches_nothing(tmp_path):
    spec = f"{tmp_path}/none/*.txt"
    assert config_error(make_cfg(tmp_path, spec)) == f"data.dataset='{spec}' matched no files"


def test_error_missing_path(tmp_path):
    assert "data.dataset='tinystories' does not exist" in config_error(make_cfg(tmp_path, "tinystories"))


def test_error_empty_documents(tmp_path):
    for i in range(2):
        (tmp_path / f"d{i}.txt").write_text("  \n\n")
    message = config_error(make_cfg(tmp_path, f"{tmp_path}/*.txt"))
    assert message == f"data.dataset='{tmp_path}/*.txt' has no text: all 2 documents are empty"


def test_error_empty_files(tmp_path):
    (tmp_path / "a.jsonl").write_text("")
    assert "has no documents: all 1 matched files are empty" in config_error(make_cfg(tmp_path, f"{tmp_path}/*.jsonl"))


def test_error_missing_text_field(tiny_corpus, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"body": d}) + "\n" for d in tiny_corpus.documents))
    message = config_error(make_cfg(tmp_path, str(path)))
    assert message == f"data.text_field='text' is not a column of data.dataset='{path}' (columns: body)"


def test_error_malformed_json_is_one_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{oops\n')
    message = config_error(make_cfg(tmp_path, f"{tmp_path}/bad.jsonl"))
    assert message.startswith(f"data.dataset='{tmp_path}/bad.jsonl' could not be loaded: ") and "JSON" in message


def test_error_not_a_saved_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    message = config_error(make_cfg(tmp_path, str(tmp_path / "folder")))
    assert message.startswith(f"data.dataset='{tmp_path / 'folder'}' could not be loaded: FileNotFoundError")


def test_error_unsupported_or_mixed_files(tmp_path):
    (tmp_path / "a.csv").write_text("text\nhello\n")
    assert "unsupported extension(s) .csv" in config_error(make_cfg(tmp_path, f"{tmp_path}/a.*"))
    (tmp_path / "b.txt").write_text("hello")
    (tmp_path / "c.jsonl").write_text('{"text": "hello"}\n')
    assert "mixes json and text files" in config_error(make_cfg(tmp_path, f"{tmp_path}/[bc].*"))


def test_error_too_small_for_a_train_block(tiny_corpus, tmp_path):
    message = config_error(make_cfg(tmp_path, tiny_corpus.glob, seq_len=100_000))
    assert "fewer training tokens than one block of data.seq_len+1=100001" in message


def test_error_too_small_for_a_val_block(tmp_path):
    (tmp_path / "only.txt").write_text("one single document " * 50)
    message = config_error(make_cfg(tmp_path, str(tmp_path / "only.txt"), val_fraction=0.5))
    assert message.startswith("data.val_fraction=0.5 holds out 0 of the 1 documents")


def test_error_tokenizer_file(tiny_corpus, tmp_path):
    message = config_error(make_cfg(tmp_path, tiny_corpus.glob, tokenizer="nope/tokenizer.json"))
    assert message == "data.tokenizer='nope/tokenizer.json' is neither 'bpe' nor an existing tokenizer.json file"
    n = prepare_data(make_cfg(tmp_path, tiny_corpus.glob)).tokenizer.vocab_size
    (saved,) = (tmp_path / "cache" / "tokenizers").glob("bpe-*.json")
    cfg = make_cfg(tmp_path, tiny_corpus.glob, tokenizer=str(saved))
    cfg.model.vocab_size = n - 1
    assert config_error(cfg) == (f"data.tokenizer='{saved}' has {n} token ids but model.vocab_size={n - 1}: "
                                 f"set model.vocab_size >= {n}")


def test_error_vocab_too_small_for_bpe(tiny_corpus, tmp_path):
    cfg = make_cfg(tmp_path, tiny_corpus.glob)
    cfg.model.vocab_size = 100
    assert config_error(cfg).startswith("model.vocab_size=100 is too small for data.tokenizer='bpe'")


def test_error_hub_needs_a_token_cap(tmp_path):
    message = config_error(make_cfg(tmp_path, "hf:roneneldan/TinyStories"))
    assert message == ("data.max_train_tokens=0 must be > 0 for a streamed hub dataset "
                       "(data.dataset='hf:roneneldan/TinyStories')")
