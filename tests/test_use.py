"""From a trained run to a model people use: ``moesaic export``, ``generate`` and ``eval`` on one short run of the
demo model (configs/tiny.yaml: SWA, CSA and HCA layers, MoE everywhere, plain residual), shared by the tests."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from moesaic.launch.cli import main as cli
from moesaic.model.interop import load_native
from moesaic.model.interop.safetensors_io import SafetensorsDir
from moesaic.model.kv_accounting import layer_kv_bytes
from moesaic.trainer import checkpoint as ckpt_io
from moesaic.trainer.run_model import load_run, run_tokenizer

from hf_checkpoints import spec_tie_topk
from numerics import assert_close_scaled
from trainrun import latest, train

RUN = ["train.steps=4", "train.micro_batch_size=4", "train.global_batch_size=4", "train.warmup_steps=1",
       "train.eval_every=4", "train.eval_batches=1", "train.log_every=2", "train.sample_tokens=0", "checkpoint.every=2",
       "logging.wandb=disabled", "logging.progress_bar=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("use") / "run"
    train(RUN + [f"run_dir={run_dir}"])
    return run_dir


def ids(vocab: int, seed: int = 0, length: int = 40) -> torch.Tensor:
    return torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.numerics
def test_export_to_transformers_gives_the_runs_logits(run: Path, tmp_path: Path, capsys) -> None:
    assert cli(["export", str(run), str(tmp_path / "hf")]) == 0
    assert "step 4" in capsys.readouterr().out  # the run directory's newest checkpoint
    hf, info = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or randomly initialised
    loaded = load_run(run)
    model = loaded.model
    x = ids(model.cfg.vocab_size, length=loaded.cfg.data.seq_len)  # 32 compressed entries > index_topk in CSA
    with torch.no_grad(), spec_tie_topk() as tied:  # transformers' indexer breaks exact ties arbitrarily
        ours, theirs = model(x).logits, hf.float().eval()(x).logits
    # Rounding only: each fp32 model lies up to ~55 fp32 eps of max|logit| from its own fp64 run (avx2, one thread;
    # transformers' with eager experts), the two fp64 runs ~10 apart; without the tie rule the difference is ~20000.
    assert_close_scaled(ours, theirs, 128, "logits")
    assert tied[0] > 0  # the comparison covers index ties (transformers' own topk then differs by ~1e-2)
    # native, bf16, of an older checkpoint named directly
    older = run / "checkpoints" / "step_00000002"
    assert cli(["export", str(older), str(tmp_path / "native"), "--format", "native", "--dtype", "bf16"]) == 0
    assert SafetensorsDir(tmp_path / "native").dtype("embed.weight") == torch.bfloat16
    native = load_native(tmp_path / "native").state_dict()  # fp32 parameters holding the bf16 values
    expected = {k: t.float() for k, t in load_run(older).model.bfloat16().state_dict().items()}  # fp32 biases stay
    assert native.keys() == expected.keys() and all(torch.equal(native[k], expected[k]) for k in native)
    assert not torch.equal(native["embed.weight"], model.state_dict()["embed.weight"].bfloat16().float())


def test_export_refusals_are_one_line_and_write_nothing(run: Path, tmp_path: Path, capsys) -> None:
    # A model transformers cannot express (softmax router scores): the checkpoint edited and its manifest rewritten.
    ckpt = tmp_path / "checkpoints" / "step_00000004"
    shutil.copytree(latest(run), ckpt)
    cfg = OmegaConf.load(ckpt / "config.yaml")
    cfg.model.moe.score_func = "softmax"
    OmegaConf.save(cfg, ckpt / "config.yaml")
    ckpt_io.write_manifest(ckpt, 4, {})

    def damage() -> None:  # a file changed after the manifest was written
        (ckpt / "tokenizer.json").write_text("{}")

    cases = [(ckpt, "model.moe.score_func='softmax'", None), (tmp_path / "nowhere", "does not exist", None),
             (tmp_path / "empty", "no complete checkpoint", lambda: (tmp_path / "empty").mkdir()),
             (ckpt, "tokenizer.json is truncated or altered", damage)]
    for src, message, before in cases:
        if before is not None:
            before()
        assert cli(["export", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists()
    assert cli(["convert", str(latest(run)), str(tmp_path / "out")]) == 2  # convert points to export
    assert f"export a training checkpoint with `moesaic export {latest(run)} OUT_DIR`" in capsys.readouterr().err


@pytest.mark.numerics
def test_generate_prints_what_uncached_greedy_decoding_gives(run: Path, capsys) -> None:
    assert cli(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr()
    assert "6 new tokens in" in out.err and "tokens/s" in out.err
    trained = load_run(run)
    tok = run_tokenizer(trained)
    seq = tok.encode("ROMEO:")
    with torch.no_grad():  # the whole sequence through the model for every token: no KV cache
        for _ in range(6):
            seq.append(int(trained.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.out == tok.decode(seq) + "\n"
    sampled = []
    for _ in range(2):
        assert cli(["generate", str(run), "--prompt", "ROMEO:", "--max-new-tokens", "5", "--top-k", "5",
                    "--temperature", "1.0", "--seed", "3"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1] and sampled[0].startswith("ROMEO:")  # the seed fixes the sample


@pytest.mark.numerics
def test_eval_reproduces_the_trainers_validation_loss(run: Path, tiny_corpus, capsys) -> None:
    assert cli(["eval", str(run), "--json", "--batch-size", "4", "--max-batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if r["step"] == 4 and "val/loss" in r][0]  # eval_batches=1 x 4 sequences
    assert result["step"] == 4 and result["sequences"] == 4 and result["tokens"] == 4 * 128
    assert result["val_loss"] == pytest.approx(val, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(result["val_loss"]), rel=1e-12)
    nats_per_byte = result["bits_per_byte"] * math.log(2)
    assert 2 < result["val_loss"] / nats_per_byte < 6  # UTF-8 bytes per BPE token of English text
    cfg = load_run(run).cfg.model
    kv = sum(layer.total for layer in layer_kv_bytes(cfg, 128, "bf16"))
    assert result["kv_bytes_per_token_bf16"] == kv / 128
    # any dataset spec, at another length, as text
    assert cli(["eval", str(run), "--data", tiny_corpus.glob, "--seq-len", "64", "--max-batches", "2"]) == 0
    out = capsys.readouterr().out
    assert "on " + tiny_corpus.glob in out and "8 sequences of 64 tokens" in out and "bits/byte" in out
