"""The DeepSpeed training loop: data -> engine -> router balance -> metrics -> checkpoints.

Determinism is the design constraint: the samples of optimizer step s are a function of
(seed, s) alone, every RNG is checkpointed, and router biases change only at optimizer steps,
so a resumed run reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import math
import signal
import statistics
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configs import Config, ConfigError, check_trainable, save_config, validate
from ..model import Transformer
from ..model.attention import StatsSink
from ..model.attention.elastic import draw_modes, mode_shares
from . import checkpoint as ckpt_io
from .balance import update_router_biases
from .data import DataBundle, prepare_data, rank_slice, sequence_shard
from .mixture import MixtureSampler
from .distributed import DistInfo, all_reduce_sum, barrier, broadcast_text, destroy, init_distributed
from .engine import build_engine
from .resume import find_resume
from .rng import get_rng_state, set_rng_state
from .metrics import MetricsPanel, layer_label
from .sinks import MetricSinks


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM/SIGUSR1; requeue and resume
DIVERGED_EXIT_CODE = 3


class Preempted(Exception):
    """A stop signal arrived; a checkpoint of the current step was written on every rank."""


class TrainingDiverged(RuntimeError):
    """Faults kept recurring after the allowed rollbacks; the last good checkpoint is untouched."""


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    unigram_baseline: float
    checkpoint: Path | None
    sample: str | None


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo) -> None:
        from ..parallel.topology import Topology  # deepspeed loads after init_distributed

        self.cfg, self.dist = cfg, dist_info
        self.topology = Topology(cfg.parallel)
        self.dp = self.topology.dp
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        self.resume = find_resume(cfg, self.ckpt_root, self.log)  # refused before anything is written
        if dist_info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.data = self._prepare_data()
        self.engine, self.scheduler, self.stepper = build_engine(cfg, self.topology)
        self.model: Transformer = self.engine.module
        self.model.doc_end_token = self.data.tokenizer.eos_id  # blocks pack documents, each ending with EOS
        self.dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        self.step = 0
        self.rollbacks = 0  # rollbacks so far; each one changes the data order
        self.skipped_steps = 0
        self.bad_in_row = 0  # consecutive skipped steps (see _check_steps)
        self.sampler = self._make_sampler()
        self.stop_signal: int | None = None

    def _make_sampler(self) -> MixtureSampler:
        return self.data.sampler(self.cfg.train.seed + 1000 * self.rollbacks)

    def _prepare_data(self) -> DataBundle:
        """The main rank tokenises and fills the cache, then the others read it.

        Any error there (data, tokenizer, cache) ends every rank with the main rank's one-line message
        instead of leaving the others waiting in a collective.
        """
        error: str | None = None
        if self.dist.is_main:
            try:
                data = prepare_data(self.cfg)
            except ConfigError as exc:
                error = str(exc)
            except Exception as exc:  # e.g. an OSError writing the cache: one line on every rank, not a hang
                error = f"data preparation failed on rank 0: {type(exc).__name__}: {str(exc).partition(chr(10))[0]}"
        error = broadcast_text(error)
        if error is not None:
            raise ConfigError(error)
        return data if self.dist.is_main else prepare_data(self.cfg)

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    # ---- checkpoints -------------------------------------------------------------------------
    def _layout(self) -> dict:
        from ..parallel import portable

        return portable.layout(self.cfg, self.dist.world_size)

    def load(self, path: Path) -> None:
        """Through DeepSpeed at the saved layout (bit-identical); from the portable state otherwise."""
        from ..parallel import portable

        manifest = ckpt_io.read_manifest(path)
        if portable.same_layout(manifest, self._layout()):
            _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True,
                                                    custom_load_fn=portable.module_loader(path))
            if client is None:
                raise ckpt_io.CheckpointError(f"checkpoint {path} could not be loaded by DeepSpeed")
        elif portable.has_portable_state(path):
            self.log(f"resharding {path} to {self._layout()}")
            client = portable.load_resharded(self.engine, self.scheduler, path)
        else:
            saved = {k: manifest.get(k) for k in self._layout()}
            raise ckpt_io.CheckpointError(f"checkpoint {path} has no topology-independent state: resume it at "
                                          f"its own layout {saved}")
        # Nested under one key: DeepSpeed drops client keys that collide with its own (e.g. skipped_steps).
        progress = client["moesaic"]
        self.step, self.rollbacks = progress["step"], progress["rollbacks"]
        self.skipped_steps = progress["skipped_steps"]
        self.sampler = self._make_sampler()
        # RNG streams are per rank; after a world-size change rank r continues saved rank r mod saved world.
        saved_rank = self.dist.rank % manifest.get("world_size", self.dist.world_size)
        state = torch.load(path / f"trainer_state_rank{saved_rank}.pt", weights_only=False)
        set_rng_state(state["rng"])
        self.stepper.adopt_loaded_state()
        self.log(f"resumed from {path} at step {self.step}")

    def _progress(self) -> dict[str, int]:
        return {"step": self.step, "rollbacks": self.rollbacks, "skipped_steps": self.skipped_steps}

    def save(self) -> Path:
        tag = ckpt_io.tag_for(self.step)
        path = self.ckpt_root / tag
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"moesaic": self._progress()},
                                    save_latest=False)
        torch.save({"rng": get_rng_state()}, path / f"trainer_state_rank{self.dist.rank}.pt")
        from ..parallel import portable

        portable.save(self.engine, path)
        barrier()
        if self.dist.is_main:
            save_config(self.cfg, path / "config.yaml")
            self.data.tokenizer.save(path / "tokenizer.json")  # export, generate and eval read it
            ckpt_io.write_manifest(path, self.step, self._layout())
            ckpt_io.mark_latest(self.ckpt_root, path)
            ckpt_io.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, keep=path)
        barrier()
        return path

    # ---- steps -------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[torch.Tensor]:
        g = self.cfg.train.global_batch_size
        ids = self.sampler.indices(step * g, g)
        return [self.data.train.batch(mb)
                for mb in rank_slice(ids, self.topology.dp_rank, self.dp, self.cfg.train.micro_batch_size)]

    def train_step(self, stats: StatsSink | None = None) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches (``stats``: collects their attention statistics).

        Returns [lm loss sum, aux loss sum, micro-batch count] as a device tensor; callers move it
        to the host only at log steps. Under sequence parallelism the losses are this shard's shares
        and the count 1/sp per micro-batch, so that sums over all ranks are as without it.
        """
        self.engine.train()
        draw_modes(self.model, self.step, self.cfg.train.seed)
        sums = torch.zeros(3, device=self.dist.device)
        for batch in self.micro_batches(self.step):
            if self.dist.device.type == "cuda":  # from pinned memory the copy does not wait for the GPU's queue
                batch = batch.pin_memory()
            batch = batch.to(self.dist.device, non_blocking=True)
            inputs, labels = sequence_shard(batch, self.topology.sp_rank, self.topology.sp)
            out = self.engine(inputs, labels=labels, stats=stats)
            poison = math.nan if self.step in self.cfg.train.inject_nan_at else self._spike_factor()
            self.engine.backward(out.loss * poison)
            self.stepper.step()
            sums += torch.stack([out.lm_loss.detach().float() * poison, out.aux_loss.detach().float(),
                                 sums.new_full((), 1 / self.topology.sp)])  # a fill, not a host-to-device copy
        update_router_biases(self.model.routers())
        self.step += 1
        return sums

    def val_sequences(self) -> int:
        """Validation sequences a pass scores: the first ``eval_batches`` x micro-batch (0: no validation split)."""
        n = min(len(self.data.val), self.cfg.train.eval_batches * self.cfg.train.micro_batch_size)
        if self.cfg.parallel.ep > 1:  # expert-parallel forwards are collective: equal shares on every rank
            n -= n % self.dp
            together = f"fewer than the {self.dp} data-parallel ranks that expert parallelism scores together"
            if 0 < len(self.data.val) < self.dp:
                raise ConfigError(f"data.val_fraction={self.cfg.data.val_fraction} gives {len(self.data.val)} "
                                  f"validation sequences, {together}; hold out more text or set data.val_fraction=0")
            if 0 < len(self.data.val) and n == 0:
                t = self.cfg.train
                raise ConfigError(f"train.eval_batches={t.eval_batches} x train.micro_batch_size={t.micro_batch_size}"
                                  f" validation sequences per evaluation are {together}; raise train.eval_batches")
        return n

    def _spike_factor(self) -> float:
        """Testing aid: ``train.inject_spike_at`` multiplies a step's loss by 100 before any rollback."""
        return 100.0 if self.rollbacks == 0 and self.step in self.cfg.train.inject_spike_at else 1.0

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over ``val_sequences`` validation blocks, split over dp ranks; None without validation."""
        n = self.val_sequences()
        if n == 0:
            return None
        self.engine.eval()
        mine = list(range(n))[self.topology.dp_rank::self.dp]
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), self.cfg.train.micro_batch_size):
            batch = self.data.val.batch(mine[start:start + self.cfg.train.micro_batch_size]).to(self.dist.device)
            out = self.engine(*sequence_shard(batch, self.topology.sp_rank, self.topology.sp))
            # A shard's loss is its share of the batch's mean: its sequences count 1/sp times.
            total += torch.tensor([out.lm_loss.double().item() * batch.shape[0],
                                   batch.shape[0] / self.topology.sp])
        all_reduce_sum(total)
        return (total[0] / total[1]).item()

    def sample(self) -> str:
        from ..parallel.sp import whole_sequence  # KV-cached decoding runs on whole sequences

        tok = self.data.tokenizer
        prompt = torch.tensor([tok.encode(self.cfg.train.sample_prompt)], device=self.dist.device)
        gen = torch.Generator(device=self.dist.device).manual_seed(self.cfg.train.seed)
        with whole_sequence(self.model):
            out = self.model.generate(prompt, self.cfg.train.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        return tok.decode(out[0].tolist())

    # ---- faults and signals -------------------------------------------------------------------
    def _check_steps(self, pending: list[tuple[torch.Tensor, torch.Tensor]], recent: deque[float],
                     window: torch.Tensor) -> str | None:
        """Classify the steps finished since the last check, in order; add the healthy ones' sums to ``window``.

        ``pending``: each step's [lm loss sum, aux loss sum, count] and whether its update was skipped (device
        tensors). They reach the host in one transfer here, not one per step: the loop checks only
        before it logs, evaluates, saves or stops, so nothing faulty is ever saved. Returns the reason to
        roll back, or None; steps after a faulty one in the same batch are dropped with the rollback.
        """
        stacked = torch.stack([stats for stats, _ in pending])  # [P, 3]
        # Global mean losses (NaN if any rank's is): every rank reaches the same verdicts.
        totals = all_reduce_sum(stacked[:, [0, 2]])
        skipped = torch.stack([flag for _, flag in pending]).to(totals.dtype)  # the same on every rank
        first = self.step - len(pending) + 1
        host = torch.cat([totals, skipped[:, None]], 1).cpu()  # one device-to-host copy
        for i, (loss_sum, count, skip) in enumerate(host.tolist()):
            fault = self._check_step(loss_sum / count, skip > 0, recent)
            self.bad_in_row = self.bad_in_row + 1 if fault == "skipped" else 0
            if fault == "skipped":
                self.skipped_steps += 1
                self.log(f"step {first + i}: non-finite loss or gradient, update skipped ({self.bad_in_row} in a row)")
            if fault in ("corrupt", "spike") or self.bad_in_row >= self.cfg.train.max_bad_steps:
                return f"{self.bad_in_row} non-finite steps in a row" if fault == "skipped" else fault
            if fault is None:
                window += stacked[i]
        return None

    def _check_step(self, loss: float, skipped: bool, recent: deque[float]) -> str | None:
        """Classify a finished step by its global mean loss: None (healthy), "skipped", "corrupt" (applied
        non-finite) or "spike"."""
        if skipped or not math.isfinite(loss):
            # A non-finite gradient's update is skipped (step_guard); a non-finite loss alone was applied.
            return "skipped" if skipped else "corrupt"
        z = self.cfg.train.spike_zscore
        if z > 0 and len(recent) >= recent.maxlen // 2:
            mean, std = statistics.fmean(recent), statistics.pstdev(recent)
            if loss > mean + z * max(std, 1e-6):
                return "spike"
        recent.append(loss)
        return None

    def _rollback(self, reason: str) -> None:
        """Reload the newest intact checkpoint and continue with a new data order, or give up."""
        path = ckpt_io.find_resumable(self.ckpt_root, log=self.log)
        if self.rollbacks >= self.cfg.train.max_rollbacks or path is None:
            kept = f"the last good checkpoint {path} is intact" if path else "no checkpoint was written yet"
            raise TrainingDiverged(f"training diverged at step {self.step} ({reason}) after {self.rollbacks} "
                                   f"rollback(s) (train.max_rollbacks={self.cfg.train.max_rollbacks}); {kept}")
        rollbacks, skipped = self.rollbacks + 1, self.skipped_steps
        self.log(f"step {self.step}: {reason}; rolling back to {path} with a new data order")
        self.load(path)
        self.rollbacks, self.skipped_steps = rollbacks, skipped
        self.sampler = self._make_sampler()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: object) -> None:
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, request_stop)

    def _stop_requested(self) -> bool:
        """Every rank stops at the same step boundary if any rank received a stop signal."""
        flag = torch.tensor([float(self.stop_signal is not None)])  # on the host: no device sync to read it
        return all_reduce_sum(flag).item() > 0

    def fit(self) -> TrainResult:
        cfg = self.cfg
        resume = self.resume
        if resume is not None:
            self.load(resume)
        self.log(f"moesaic: {self.model.num_params(active_only=False) / 1e6:.2f}M params "
                 f"({self.model.num_params(active_only=True) / 1e6:.2f}M active), world {self.dist.world_size}, "
                 f"{len(self.data.train)} train / {len(self.data.val)} val sequences of {cfg.data.seq_len}, "
                 f"unigram baseline {self.data.unigram_entropy:.3f} nats")
        if self.val_sequences() == 0:  # raises if there are too few for the layout
            self.log("no validation: data.val_fraction=0 holds out no text, so val/loss is not computed")
        sinks = MetricSinks(cfg, self.run_dir, resume_step=self.step if resume else None) if self.dist.is_main else None
        bar = None
        if self.dist.is_main and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        self._install_signal_handlers()
        try:
            val_loss, path = self._loop(sinks, bar)
        finally:
            if bar is not None:
                bar.close()
            sync = sinks.close() if sinks is not None else None
            if sync:
                self.log(f"wandb ran offline; upload with: {sync}")
        text = None
        # Every rank samples under expert parallelism (its forwards are collective); only rank 0 logs.
        if self.step == cfg.train.steps and cfg.train.sample_tokens and (self.dist.is_main or cfg.parallel.ep > 1):
            text = self.sample()
            self.log(f"sample: {text!r}")
        if val_loss is not None:
            self.log(f"final val loss {val_loss:.4f} nats (unigram baseline {self.data.unigram_entropy:.4f})")
        return TrainResult(self.step, val_loss, self.data.unigram_entropy, path, text)

    def _loop(self, sinks: MetricSinks | None, bar) -> tuple[float | None, Path | None]:
        """Train until ``stop_at``/``steps``: skip or roll back faulty steps, log, evaluate, checkpoint."""
        cfg = self.cfg
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        val_loss, path = None, None
        # Sums of lm loss, aux loss and micro-batch count over healthy steps since the last log.
        window = torch.zeros(3, device=self.dist.device)
        steps_in_window, t_window = 0, time.perf_counter()
        end = cfg.train.stop_at or cfg.train.steps
        panel = MetricsPanel(self.model, cfg, self.dist.device, self.dist.world_size)
        recent: deque[float] = deque(maxlen=cfg.train.spike_window)
        pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # steps not yet checked for faults (_check_steps)
        while self.step < end:
            log_step = (self.step + 1) % cfg.train.log_every == 0 or self.step + 1 == end
            stats = self.train_step(panel.arm() if log_step else None)  # attention statistics of log steps
            pending.append((stats, self.stepper.skipped))
            steps_in_window += 1
            last = self.step == end
            stop = self._stop_requested()
            act = [self.step % every == 0 or last for every in (cfg.train.log_every, cfg.train.eval_every,
                                                                  cfg.checkpoint.every)]
            if not (any(act) or stop):  # no host sync on the other steps
                if bar is not None:
                    bar.update(1)
                continue
            reason = self._check_steps(pending, recent, window)
            pending.clear()
            if reason is not None:
                self._rollback(reason)
                recent.clear()
                self.bad_in_row = 0
                window.zero_()
                steps_in_window, t_window = 0, time.perf_counter()
                if bar is not None:
                    bar.reset(total=cfg.train.steps)
                    bar.update(self.step)
                continue
            metrics: dict[str, float] = {}
            log_now, eval_now, save_now = act
            if log_now:
                sums = all_reduce_sum(window).cpu()
                elapsed = time.perf_counter() - t_window
                metrics.update({
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": self.stepper.grad_norm.item(),
                    "perf/tokens_per_s": tokens_per_step * steps_in_window / elapsed,
                    "perf/step_time_s": elapsed / steps_in_window,
                    "train/tokens": float(self.step * tokens_per_step),
                    "train/skipped_steps": float(self.skipped_steps),
                    "train/rollbacks": float(self.rollbacks),
                })
                if len(self.data.weights) > 1:  # tokens drawn from each source of a mixture
                    drawn = self.sampler.drawn(self.step * cfg.train.global_batch_size)
                    metrics.update({f"data/tokens/{i}": float(n * cfg.data.seq_len) for i, n in enumerate(drawn)})
                if sums[2] > 0:
                    metrics["train/loss"] = (sums[0] / sums[2]).item()
                    metrics["train/aux_loss"] = (sums[1] / sums[2]).item()
                window.zero_()
                steps_in_window, t_window = 0, time.perf_counter()
                metrics.update(panel.collect(self.step, metrics["perf/tokens_per_s"]))  # counted in the next window
                metrics.update({f"attn_layers/{layer_label(layer)}/{k}": v
                                for layer, shares in mode_shares(self.model).items() for k, v in shares.items()})
            if eval_now:
                val_loss = self.evaluate()
                if val_loss is not None:
                    metrics["val/loss"] = val_loss
            # Log before checkpointing: once the checkpoint exists a resume starts after this step, so
            # its metrics must already be written (a resume from an older checkpoint drops the rows past it).
            if sinks is not None and metrics:
                sinks.log(self.step, metrics)
            if save_now:
                path = self.save()
            if stop:
                if path is None or path.name != ckpt_io.tag_for(self.step):
                    path = self.save()
                self.log(f"received signal {self.stop_signal}: checkpoint {path} written; "
                         f"exiting with {PREEMPTED_EXIT_CODE} so the scheduler requeues the job")
                raise Preempted(str(path))
            if bar is not None:
                bar.update(1)
                if metrics:
                    bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in metrics.items()
                                     if k in ("train/loss", "val/loss", "perf/tokens_per_s")})
        return val_loss, path


def train(cfg: Config) -> TrainResult:
    """Run (or resume) a training job in this process; under torchrun each rank calls this.

    Raises Preempted after checkpointing on SIGTERM/SIGUSR1 and TrainingDiverged when faults persist.
    """
    dist_info = init_distributed(cfg.train.device)
    try:
        validate(cfg, world_size=dist_info.world_size)
        check_trainable(cfg)
        return Trainer(cfg, dist_info).fit()
    finally:
        destroy()
