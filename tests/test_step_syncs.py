"""Training steps that neither log, evaluate, save nor stop do not read device values on the host.

On a GPU each such read (``.item()``, ``.tolist()``, ``.cpu()``, ...) waits for the queued kernels, so
the loop batches its fault checks into the steps that log, evaluate, checkpoint or stop, and DeepSpeed's
ZeRO step is told neither to clip nor to check the norm (``trainer/step_guard.py`` does both on the
device). On CPU the
reads cost nothing and are counted instead (``host_sync.HostSyncCounter``), each attributed to the
training step it happened in and to the first frame outside torch that made it. ``tests/test_cuda.py``
checks the same on a GPU with ``torch.cuda.set_sync_debug_mode``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moesaic.configs import load_config
from moesaic.model import Transformer
from host_sync import HostSyncCounter
from trainrun import FAST, env

# The CPU kernels hand CPU tensors to numba through .numpy(); a GPU step runs torch ops instead.
CPU_KERNELS = re.compile(r"moesaic/model/(attention/_window_cpu|_cpu_compiled|_mhc_cpu)\.py:")

# In a fresh process (DeepSpeed keeps global state): train with the counter on, print what it saw.
SCRIPT = r"""
import json, os, sys, traceback
sys.path.insert(0, {tests!r})
import deepspeed, moesaic
from host_sync import HostSyncCounter
from moesaic.configs import load_config
from moesaic.trainer import loop

# Package roots by where they are installed (an editable moesaic lives in a directory of any name).
ROOTS = [(m.__name__, os.path.dirname(m.__file__) + "/") for m in (moesaic, deepspeed)]
step = [0]
original = loop.Trainer.train_step
def train_step(self, stats=None):
    step[0] = self.step + 1  # what follows, up to the next step, belongs to this step
    return original(self, stats)
loop.Trainer.train_step = train_step

class Attributed(HostSyncCounter):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        before = len(self.calls)
        out = super().__torch_function__(func, types, args, kwargs)
        if len(self.calls) > before:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename]
            path = frames[-1].filename if frames else "?"
            short = next((name + "/" + os.path.relpath(path, root) for name, root in ROOTS if path.startswith(root)),
                         path.split("/")[-1])
            self.calls[-1] = (step[0], self.calls[-1], f"{{short}}:{{frames[-1].name if frames else '?'}}")
        return out

cfg = load_config("tiny", sys.argv[1:])
with Attributed() as syncs:
    loop.train(cfg)
print("SYNCS " + json.dumps(syncs.calls))
"""


def test_steps_between_log_eval_and_checkpoint_steps_do_not_sync(tmp_path: Path) -> None:
    overrides = FAST + [f"run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=5",
                        "train.log_every=3", "train.eval_every=5", "checkpoint.every=5", "train.sample_tokens=0"]
    code = SCRIPT.format(tests=str(Path(__file__).parent))
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    calls = json.loads(proc.stdout.split("SYNCS ", 1)[1])
    quiet = {1, 2, 4}  # steps 3 and 5 log (5 also evaluates and saves)
    in_quiet = [c for c in calls if c[0] in quiet]
    print("host reads in quiet steps:", sorted({(name, where) for _, name, where in in_quiet}))
    device_reads = [c for c in in_quiet
                    if c[2] != "moesaic/trainer/loop.py:_stop_requested"  # a host tensor (gloo beside NCCL)
                    and not CPU_KERNELS.match(c[2])]
    assert device_reads == [], device_reads  # none of moesaic's, DeepSpeed's or torch's optimizer's
    assert any(c[0] in (3, 5) and c[2] == "moesaic/trainer/loop.py:_check_steps" for c in calls)  # checks are seen



@pytest.mark.parametrize("config", ["tiny", "v4_tiny", "deepseek_v32_tiny", "gemma4_tiny", "laguna_tiny", "zaya1_tiny"])
def test_the_torch_path_of_a_training_forward_and_backward_reads_nothing_on_the_host(config: str) -> None:
    """What runs on a GPU (``model.attention.backend=torch``; v4_tiny adds mHC, hash routing and MTP): CSA/HCA/DSA
    selection sizes its chunks from host positions and breaks top-k ties without checking for them first; MoE,
    attention and losses queue only. After a warm-up step (caches built once), forward and backward make no host
    read."""
    cfg = load_config(config, ["model.attention.backend=torch"])
    torch.manual_seed(0)
    model = Transformer(cfg.model).train()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 65))
    model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    with HostSyncCounter() as syncs:
        model(ids[:, :-1], labels=ids[:, 1:]).loss.backward()
    assert syncs.calls == []
