"""Bad command-line input, tried as a new user would: every command's options with a zero, negative, missing or
malformed value, a config with a YAML syntax error, missing files. Each ends with exit status 2 and one error line
naming the option, field or file, never a traceback. All in-process and before any work starts: cheap."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesaic.launch.cli import main as cli

SLURM = ["slurm", "tiny", "--nodes", "1", "--gpus-per-node", "1", "--time", "1:00:00"]
GEN = ["generate", "/no/run", "--prompt", "hi"]
CASES = [
    (["launch", "tiny", "--nproc", "0"], "argument --nproc: 0 must be >= 1"),
    (["launch", "tiny", "--nproc", "-2"], "argument --nproc: -2 must be >= 1"),
    (["launch", "tiny", "--nproc", "two"], "argument --nproc: 'two' is not an integer"),
    (["launch", "tiny"], "the following arguments are required: --nproc"),
    (["launch", "tiny", "--nproc", "1", "--nnodes", "0"], "argument --nnodes: 0 must be >= 1"),
    (["launch", "tiny", "--nproc", "1", "--master-port", "0"], "argument --master-port: 0 must be >= 1 and <= 65535"),
    (["launch", "tiny", "--nproc", "1", "--master-port", "99999"], "argument --master-port: 99999 must be"),
    (["launch", "tiny", "--nproc", "1", "--max-restarts", "-1"], "argument --max-restarts: -1 must be >= 0"),
    (["launch", "tiny", "--nproc", "1", "--hostfile", "/no/hostfile"], "--hostfile /no/hostfile does not exist"),
    (["launch", "tiny", "--nproc", "3", "--dry-run"], "must be a multiple of train.micro_batch_size=16 x "
                                                      "data-parallel size 3"),
    (["launch", "tiny", "--nproc", "2", "--dry-run", "parallel.sp=2", "model.mtp_layers=1"],
     "model.mtp_layers=1 cannot run with parallel.sp=2"),  # what only `train` checked before
    ([*SLURM[:3], "0", *SLURM[4:]], "argument --nodes: 0 must be >= 1"),
    ([*SLURM[:5], "-1", *SLURM[6:]], "argument --gpus-per-node: -1 must be >= 1"),
    (SLURM[:6], "the following arguments are required: --time"),
    ([*SLURM, "--cpus-per-task", "0"], "argument --cpus-per-task: 0 must be >= 1"),
    ([*SLURM, "--master-port", "x"], "argument --master-port: 'x' is not an integer"),
    (["prepare-data", "tiny", "--num-proc", "0"], "argument --num-proc: 0 must be >= 1"),
    (["prepare-data", "tiny", "--shard-tokens", "-5"], "argument --shard-tokens: -5 must be >= 1"),
    (["prepare-data", "tiny", "--world", "0"], "argument --world: 0 must be >= 1"),
    (["prepare-data", "tiny", "--rank", "-1"], "argument --rank: -1 must be >= 0"),
    (["prepare-data", "tiny", "--rank", "2", "--world", "2"], "--rank 2 must be in [0, --world 2)"),
    (["kv-report", "tiny", "--context", "0"], "argument --context: --context 0 must be >= 1"),
    (["kv-report", "tiny", "--context", "12q"], "argument --context: --context '12q' must be an integer"),
    (["kv-report", "tiny", "--context", ""], "argument --context: --context '' must be an integer"),
    (["kv-report", "tiny", "--dtype", "fp16"], "argument --dtype: invalid choice: 'fp16'"),
    (["report", "/no/run"], "/no/run"),
    (["convert", "/no/src", "/no/dst"], "/no/src is neither a transformers checkpoint"),
    (["convert", "a", "b", "--shard-gib", "0"], "argument --shard-gib: 0 must be > 0"),
    (["export", "/no/run", "/no/out"], "/no/run does not exist"),
    (["export", "/no/run", "/no/out", "--format", "onnx"], "argument --format: invalid choice: 'onnx'"),
    (["export", "/no/run", "/no/out", "--dtype", "fp8"], "argument --dtype: invalid choice: 'fp8'"),
    (["export", "/no/run", "/no/out", "--shard-gib", "-1"], "argument --shard-gib: -1 must be > 0"),
    (["generate", "/no/run"], "the following arguments are required: --prompt"),
    (GEN, "/no/run does not exist"),
    ([*GEN, "--max-new-tokens", "0"], "argument --max-new-tokens: 0 must be >= 1"),
    ([*GEN, "--top-k", "0"], "argument --top-k: 0 must be >= 1"),
    ([*GEN, "--temperature", "-1"], "argument --temperature: -1 must be >= 0"),
    ([*GEN, "--temperature", "nan"], "argument --temperature: nan must be >= 0"),
    ([*GEN, "--temperature", "hot"], "argument --temperature: 'hot' is not a number"),
    ([*GEN, "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    ([*GEN, "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["eval", "/no/run"], "/no/run does not exist"),
    (["eval", "/no/run", "--seq-len", "0"], "argument --seq-len: 0 must be >= 1"),
    (["eval", "/no/run", "--batch-size", "-1"], "argument --batch-size: -1 must be >= 1"),
    (["eval", "/no/run", "--max-batches", "0"], "argument --max-batches: 0 must be >= 1"),
    (["train", "no_such_config"], "config file 'no_such_config' not found (bundled configs:"),
    (["train", "tiny", "train.steps=0"], "train.steps=0 must be > 0"),
    (["config", "tiny", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
]


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    try:
        code = cli(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_option_is_one_error_line(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    code, err = run_cli(argv, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("moesaic") and "error: " in last and message in last, err


@pytest.mark.parametrize("text, where, problem", [
    ("model:\n  hidden_size: 64\n  layer_types: [swa, csa\ntrain:\n  steps: 3\n", "4:6",
     "did not find expected ',' or ']'"),
    ("model:\n  hidden_size: 64\n   x: 1\n", "3:5", "mapping values are not allowed in this context"),
    ("train: {steps: 3\n", "2:1", "did not find expected ',' or '}'"),
    ("train:\n\tsteps: 3\n", "2:1", "found character that cannot start any token"),
])
def test_yaml_syntax_error_names_file_line_and_column(text: str, where: str, problem: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    code, err = run_cli(["train", str(tmp_path / "bad.yaml")], capsys)
    assert code == 2 and err.strip() == f"moesaic: error: {tmp_path / 'bad.yaml'}:{where}: YAML syntax error: {problem}"


def test_help_lists_exit_codes_and_every_bundled_config(capsys: pytest.CaptureFixture) -> None:
    from moesaic.configs import CONFIG_DIR

    with pytest.raises(SystemExit) as exc:
        cli(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    assert all(p.stem in out for p in CONFIG_DIR.glob("*.yaml")) and len(list(CONFIG_DIR.glob("*.yaml"))) >= 10
    for code in ("0 done", "2 bad input", "3 training diverged", "75 stopped by SIGTERM/SIGUSR1"):
        assert code in out
    for command in ("export", "generate", "eval"):
        assert command in out
