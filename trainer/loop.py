"""The DeepSpeed training loop: data -> engine -> router balance -> metrics -> checkpoints.

Determinism is the design constraint: the samples of optimizer step s are a function of
(seed, s) alone, every RNG is checkpointed, and router biases change only at optimizer steps,
so a resumed run reproduces the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configs import Config, ConfigError, check_trainable, save_config, validate
from ..model import Transformer
from . import checkpoint as ckpt_io
from .balance import update_router_biases
from .data import DataBundle, GlobalSampler, prepare_data, rank_slice
from .distributed import DistInfo, all_reduce_sum, barrier, destroy, init_distributed
from .rng import get_rng_state, seed_everything, set_rng_state
from .schedule import lr_multiplier
from .sinks import MetricSinks


@dataclass
class TrainResult:
    step: int
    val_loss: float | None
    unigram_baseline: float
    checkpoint: Path | None
    sample: str | None


def deepspeed_config(cfg: Config, dp: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW (no JIT-compiled ops); matrices decay, vectors (norms, sinks, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    t = cfg.train
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, foreach=False)


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo) -> None:
        import deepspeed

        self.cfg, self.dist = cfg, dist_info
        self.dp = dist_info.world_size // cfg.parallel.sp
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else self.run_dir / "checkpoints"
        if dist_info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        self.data = self._prepare_data()
        seed_everything(cfg.train.seed)
        model = Transformer(cfg.model)
        optimizer = build_optimizer(model, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.train))
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(cfg, self.dp))
        self.model: Transformer = self.engine.module
        self.dtype = torch.bfloat16 if cfg.train.dtype == "bf16" else torch.float32
        self.sampler = GlobalSampler(len(self.data.train), cfg.train.seed)
        self.step = 0

    def _prepare_data(self) -> DataBundle:
        """The main rank tokenises and fills the cache, then the others read it.

        A data error on the main rank is reported on every rank instead of leaving them at a barrier.
        """
        error: ConfigError | None = None
        if self.dist.is_main:
            try:
                data = prepare_data(self.cfg)
            except ConfigError as exc:
                error = exc
        if all_reduce_sum(torch.tensor([float(error is not None)])).item():
            raise error or ConfigError("data preparation failed on rank 0; see its error line")
        return data if self.dist.is_main else prepare_data(self.cfg)

    def log(self, msg: str) -> None:
        if self.dist.is_main:
            print(msg, flush=True)

    # ---- checkpoints -------------------------------------------------------------------------
    def resume_path(self) -> Path | None:
        resume = self.cfg.checkpoint.resume
        if resume is None:
            return None
        if resume == "auto":
            return ckpt_io.find_resumable(self.ckpt_root, log=self.log)
        path = Path(resume)
        ckpt_io.verify(path)
        return path

    def load(self, path: Path) -> None:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if client is None:
            raise ckpt_io.CheckpointError(f"checkpoint {path} could not be loaded by DeepSpeed")
        self.step = client["step"]
        state = torch.load(path / f"trainer_state_rank{self.dist.rank}.pt", weights_only=False)
        set_rng_state(state["rng"])
        self.log(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        tag = ckpt_io.tag_for(self.step)
        path = self.ckpt_root / tag
        self.engine.save_checkpoint(str(self.ckpt_root), tag=tag, client_state={"step": self.step},
                                    save_latest=False)
        torch.save({"rng": get_rng_state()}, path / f"trainer_state_rank{self.dist.rank}.pt")
        barrier()
        if self.dist.is_main:
            save_config(self.cfg, path / "config.yaml")
            ckpt_io.write_manifest(path, self.step, {"world_size": self.dist.world_size})
            ckpt_io.mark_latest(self.ckpt_root, path)
            ckpt_io.prune(self.ckpt_root, self.cfg.checkpoint.keep_last, keep=path)
        barrier()
        return path

    # ---- steps -------------------------------------------------------------------------------
    def micro_batches(self, step: int) -> list[torch.Tensor]:
        g = self.cfg.train.global_batch_size
        ids = self.sampler.indices(step * g, g)
        dp_rank = self.dist.rank // self.cfg.parallel.sp
        return [self.data.train.batch(mb) for mb in rank_slice(ids, dp_rank, self.dp, self.cfg.train.micro_batch_size)]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this rank's micro-batches.

        Returns [lm loss sum, aux loss sum, micro-batch count] as a device tensor; callers move it
        to the host only at log steps.
        """
        self.engine.train()
        sums = torch.zeros(3, device=self.dist.device)
        for batch in self.micro_batches(self.step):
            batch = batch.to(self.dist.device)
            out = self.engine(batch[:, :-1], labels=batch[:, 1:])
            self.engine.backward(out.loss)
            self.engine.step()
            sums += torch.stack([out.lm_loss.detach().float(), out.aux_loss.detach().float(), sums.new_ones(())])
        update_router_biases(self.model.routers())
        self.step += 1
        return sums

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the first ``eval_batches`` x micro-batch validation blocks, split over dp ranks."""
        self.engine.eval()
        n = min(len(self.data.val), self.cfg.train.eval_batches * self.cfg.train.micro_batch_size)
        mine = list(range(n))[self.dist.rank // self.cfg.parallel.sp::self.dp]
        total = torch.zeros(2, dtype=torch.float64)
        for start in range(0, len(mine), self.cfg.train.micro_batch_size):
            batch = self.data.val.batch(mine[start:start + self.cfg.train.micro_batch_size]).to(self.dist.device)
            out = self.engine(batch[:, :-1], labels=batch[:, 1:])
            total += torch.tensor([out.lm_loss.double().item() * batch.shape[0], batch.shape[0]])
        all_reduce_sum(total)
        return (total[0] / total[1]).item()

    def sample(self) -> str:
        tok = self.data.tokenizer
        prompt = torch.tensor([tok.encode(self.cfg.train.sample_prompt)], device=self.dist.device)
        gen = torch.Generator(device=self.dist.device).manual_seed(self.cfg.train.seed)
        out = self.model.generate(prompt, self.cfg.train.sample_tokens, temperature=0.8, top_k=40, generator=gen)
        return tok.decode(out[0].tolist())

    def fit(self) -> TrainResult:
        cfg = self.cfg
        resume = self.resume_path()
        if resume is not None:
            self.load(resume)
        sinks = MetricSinks(cfg, self.run_dir, resume_step=self.step if resume else None) if self.dist.is_main else None
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        self.log(f"moesaic: {self.model.num_params(active_only=False) / 1e6:.2f}M params "
                 f"({self.model.num_params(active_only=True) / 1e6:.2f}M active), world {self.dist.world_size}, "
                 f"{len(self.data.train)} train / {len(self.data.val)} val sequences of {cfg.data.seq_len}, "
                 f"unigram baseline {self.data.unigram_entropy:.3f} nats")
        bar = None
        if self.dist.is_main and cfg.logging.progress_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)
        val_loss, path = None, None
        # Sums of lm loss, aux loss and micro-batch count since the last log, kept on the device.
        window = torch.zeros(3, device=self.dist.device)
        steps_in_window, t_window = 0, time.perf_counter()
        end = cfg.train.stop_at or cfg.train.steps
        while self.step < end:
            window += self.train_step()
            steps_in_window += 1
            last = self.step == end
            metrics: dict[str, float] = {}
            if self.step % cfg.train.log_every == 0 or last:
                sums = all_reduce_sum(window).cpu()
                elapsed = time.perf_counter() - t_window
                metrics.update({
                    "train/loss": (sums[0] / sums[2]).item(),
                    "train/aux_loss": (sums[1] / sums[2]).item(),
                    "train/lr": self.scheduler.get_last_lr()[0],
                    "train/grad_norm": float(self.engine.get_global_grad_norm() or 0.0),
                    "perf/tokens_per_s": tokens_per_step * steps_in_window / elapsed,
                    "perf/step_time_s": elapsed / steps_in_window,
                    "train/tokens": float(self.step * tokens_per_step),
                })
                window.zero_()
                steps_in_window, t_window = 0, time.perf_counter()
            if self.step % cfg.train.eval_every == 0 or last:
                val_loss = self.evaluate()
                metrics["val/loss"] = val_loss
            if self.step % cfg.checkpoint.every == 0 or last:
                path = self.save()
            if sinks is not None and metrics:
                sinks.log(self.step, metrics)
            if bar is not None:
                bar.update(1)
                if metrics:
                    bar.set_postfix({k.split("/")[1]: f"{v:.4g}" for k, v in metrics.items()
                                     if k in ("train/loss", "val/loss", "perf/tokens_per_s")})
        if bar is not None:
            bar.close()
        finished = self.step == cfg.train.steps
        text = self.sample() if finished and cfg.train.sample_tokens and self.dist.is_main else None
        if text is not None:
            self.log(f"sample: {text!r}")
        if sinks is not None:
            sync = sinks.close()
            if sync:
                self.log(f"wandb ran offline; upload with: {sync}")
        if val_loss is not None:
            self.log(f"final val loss {val_loss:.4f} nats (unigram baseline {self.data.unigram_entropy:.4f})")
        return TrainResult(self.step, val_loss, self.data.unigram_entropy, path, text)


def train(cfg: Config) -> TrainResult:
    """Run (or resume) a training job in this process; under torchrun each rank calls this."""
    dist_info = init_distributed(cfg.train.device)
    try:
        validate(cfg, world_size=dist_info.world_size)
        check_trainable(cfg)
        return Trainer(cfg, dist_info).fit()
    finally:
        destroy()
