"""dsv3-train: run config -> plan -> process groups, data, model, optimizer -> steps -> logs, checkpoints.

    dsv3-train                                   # tiny preset on the embedded corpus
    dsv3-train --config run.yaml train.steps=50  # YAML plus dotted overrides
    torchrun --nproc-per-node 4 -m megatron_dsv3.train parallel.tensor=2 parallel.expert=2

`Trainer.train` is the loop, in named phases: build, resume, then per step `train_step`,
`check`, `log`, `evaluate` (every `train.eval_interval` steps and at the end), `save`, and `stop`
on preemption or Ctrl-C.

Before it builds anything the run checks that the plan's memory estimate fits the device
(`capacity.py`) and claims `checkpoint.dir` (`checkpoint/lock.py`): writable, room for one
checkpoint, and no other live run using it.

Exit codes (`megatron_dsv3.exit_status`): 0 done; 1 a bug (a traceback, then a line saying so);
2 refused input, named in one line (a bad setting, a plan that does not fit, a locked, read-only
or full checkpoint.dir, a checkpoint that is not what dsv3 writes); 3 diverged (NaN or exploding
loss); 4 a collective or a checkpoint write outlasted its bound (`parallel.timeout_s`,
`checkpoint.save_timeout_s`, at most 3 x it: a rank stalled or died); 5 a checkpoint could not be
written (disk full, I/O error: its partial folder removed, the previous one and `latest` intact);
75 preempted after saving a checkpoint (SIGTERM / SIGUSR1; Slurm requeues on it); 130 Ctrl-C
(SIGINT): saved at the end of the step, or said why not (a second Ctrl-C stops without saving).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_dsv3 import exit_status
from megatron_dsv3.capacity import check_fits, checkpoint_bytes
from megatron_dsv3.checkpoint import dist as ckpt
from megatron_dsv3.checkpoint.lock import RunLockError, claim
from megatron_dsv3.checkpoint.metadata_guard import UnsafeCheckpointError
from megatron_dsv3.cli.guard import entry_point
from megatron_dsv3.compat.megatron_checkpoint import signal_safe_checkpoint_writer
from megatron_dsv3.compat.megatron_cpu import cpu_shims
from megatron_dsv3.config import ConfigError
from megatron_dsv3.data import DataError, build_iterators
from megatron_dsv3.data.tokenizer import TokenizerError
from megatron_dsv3.fp8 import FP8RangeError, Fp8Linear, describe_backend, raise_deferred_overflow
from megatron_dsv3.model.gpt import build_model
from megatron_dsv3.model.moe.router import update_expert_bias
from megatron_dsv3.model.mtp import take_stats
from megatron_dsv3.monitor import ExpertLoadTracker, build_logger, mtp_metrics
from megatron_dsv3.optim import LocalOptimizer, learning_rate, scheduled
from megatron_dsv3.optim.zero1 import ZeRO1Optimizer
from megatron_dsv3.parallel import comm, groups, initialize_parallel
from megatron_dsv3.pipeline.dualpipe import mark_mirror_copies
from megatron_dsv3.pipeline.stages import ScheduledModel, forward_backward, reduce_losses
from megatron_dsv3.plan import PlanError, RunPlan, make_plan
from megatron_dsv3.run_config import RunConfig, RunConfigError, load_run_config

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
HANDLED_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)  # while training; restored when main returns
# Model settings that schedules or the FP8 switch change between runs: not a change of model.
RESUMABLE_MODEL_CHANGES = ("mtp_loss_weight", "bias_update_rate", "fp8")
# The long-context stages (report section 4.3) resume the pretrained model with YaRN and a longer context.
CONTEXT_EXTENSION_CHANGES = ("yarn", "max_position_embeddings")


class TrainingDiverged(RuntimeError):
    pass


def _log(message: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(message, flush=True)


def init_distributed(device: str, save_timeout_s: float = 1800.0) -> None:
    """torchrun's variables, else Slurm's, else a one-process world (Megatron's groups need one).
    The default group carries checkpoint writes and start-up waits, so it is bounded by the save
    timeout; the step's groups get their own bound in `initialize_parallel`."""
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    backend = "nccl" if device == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=save_timeout_s)
    if "RANK" in env:
        if device == "cuda":
            torch.cuda.set_device(int(env.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def world_from_environment() -> int:
    """The world size torchrun (WORLD_SIZE) or Slurm (SLURM_NTASKS) announces, as `init_distributed`
    will read it; 1 without either. Known before the process group starts."""
    env = os.environ
    if "RANK" in env:
        return int(env.get("WORLD_SIZE", "1"))
    return max(1, int(env.get("SLURM_NTASKS", "1")))


def ranks_per_node() -> int:
    """From torchrun (LOCAL_WORLD_SIZE) or Slurm (SLURM_NTASKS_PER_NODE, e.g. "8(x2)"); else the world."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
    return int(value) if value else world_from_environment()


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1 (preemption) or SIGINT (Ctrl-C); checked, and agreed on by all ranks,
    at the end of each step, where the run saves and stops. A second Ctrl-C stops at once."""

    def __init__(self):
        self.raised = False
        self.interrupted = False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handler)
        signal.signal(signal.SIGINT, self._interrupt)

    def _handler(self, signum, frame):
        self.raised = True

    def _interrupt(self, signum, frame):
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("dsv3-train: Ctrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again "
              "stops at once, without saving)", file=sys.stderr, flush=True)

    def agreed(self) -> Optional[int]:
        """The exit code every rank stops with now (INTERRUPTED over PREEMPTED), or None to go on."""
        flag = torch.tensor([2.0 if self.interrupted else 1.0 if self.raised else 0.0])
        comm.all_reduce(flag, groups.world_group(), op=dist.ReduceOp.MAX)
        return {0: None, 1: exit_status.PREEMPTED, 2: exit_status.INTERRUPTED}[int(flag.item())]


@dataclass
class StepResult:
    lm_loss: float
    mtp_loss: float
    balance_loss: float
    grad_norm: float
    lr: float
    bias_update_rate: float
    mtp_loss_weight: float


def check_same_model(saved: dict, config, path: Path) -> list[str]:
    """Refuse to resume a checkpoint saved with another model, naming every differing field. A
    context extension (report section 4.3: YaRN and max_position_embeddings changed, the new model
    with YaRN) is allowed; returns a line describing it (empty otherwise)."""
    now = config.to_dict()
    allowed = RESUMABLE_MODEL_CHANGES + (CONTEXT_EXTENSION_CHANGES if now.get("yarn") is not None else ())
    differing = [f"{key}: {saved.get(key)!r} saved, {now.get(key)!r} now" for key in sorted(set(saved) | set(now))
                 if key not in allowed and saved.get(key) != now.get(key)]
    if differing:
        hint = (" (a context extension changes only yarn and max_position_embeddings, and keeps YaRN on)"
                if any(saved.get(key) != now.get(key) for key in CONTEXT_EXTENSION_CHANGES) else "")
        raise RunConfigError(f"checkpoint {path} was saved with another model ({'; '.join(differing)}){hint}: resume "
                             "it with the model settings it was saved with, or start a fresh run with "
                             "checkpoint.resume=false or another checkpoint.dir")
    if all(saved.get(key) == now.get(key) for key in CONTEXT_EXTENSION_CHANGES):
        return []
    yarn, before = now["yarn"], saved.get("yarn")
    was = f"factor {before['factor']:g} over {before['original_max_position_embeddings']}" if before else "none"
    return [f"context extension: max_position_embeddings {saved.get('max_position_embeddings')} -> "
            f"{now['max_position_embeddings']}, YaRN factor {yarn['factor']:g} over "
            f"{yarn['original_max_position_embeddings']} positions (YaRN before: {was})"]


class Trainer:
    """One run of the plan. Phases: `build`, `resume`, then per step `train_step`, `check`, `log`,
    `evaluate` when due, `save`; `stop` on preemption, `finish` at the end."""

    def __init__(self, run: RunConfig, plan: RunPlan):
        self.run, self.plan = run, plan
        self.ckpt_dir = Path(run.checkpoint.dir)
        self.step = 0
        self.consumed_samples = 0  # by all ranks (Megatron's consumed_samples): where the data resumes
        self.resumed_from: Optional[int] = None
        self.first_loss: Optional[float] = None
        self.last_loss: Optional[float] = None

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        """Process groups, data (checked before any compute), model, schedule, optimizer."""
        run, plan = self.run, self.plan
        self.build_parallel()
        self.resumed_from, notes = ckpt.agree_on_resume(self.ckpt_dir) if run.checkpoint.resume else (None, [])
        for note in notes:
            _log(f"checkpoint: {note}")
        if self.resumed_from is not None:
            path = ckpt.checkpoint_path(self.ckpt_dir, self.resumed_from)
            saved = ckpt.load_common(path)
            for note in check_same_model(saved["model_config"], plan.model, path):
                _log(note)
            self.consumed_samples = saved["consumed_samples"]
        train = run.train
        # the training micro-batches, and a function giving the held-out ones of an evaluation
        self.batches, self.valid_batches = build_iterators(
            run.data, train.seq_length, train.micro_batch_size, train.global_batch_size,
            groups.rank(groups.dp_group()), plan.layout.data, train.seed, plan.model.vocab_size,
            start_sample=self.consumed_samples, eval_iters=train.eval_iters if train.eval_interval else 0)
        self.build_model()

    def build_parallel(self) -> None:
        """Megatron-Core's process groups and the schedule's forward/backward function."""
        layout = self.plan.layout
        initialize_parallel(layout.tensor, layout.pipeline, layout.expert, timeout_s=self.run.parallel.timeout_s)
        # The schedule's forward/backward function, called as Megatron-Core's is.
        self.forward_backward_func = self.plan.schedule.forward_backward_func()

    def build_model(self) -> None:
        """This rank's model stages on `plan.device`, their chunks, DualPipe's mirror, the optimizer.
        On meta (a rehearsal) the model is built there directly and never initialised."""
        run, plan, layout, schedule, train = self.run, self.plan, self.plan.layout, self.plan.schedule, self.run.train
        torch.manual_seed(train.seed)
        # This rank's model stages (two under DualPipe/DualPipeV) in one module, a chunk per stage.
        pp_rank = groups.rank(groups.pp_group())
        stages = schedule.rank_stages(layout.pipeline, pp_rank)
        with torch.device("meta") if plan.device == "meta" else contextlib.nullcontext():
            self.model = build_model(plan.model, seed=train.seed, stages=stages,
                                     num_stages=schedule.num_stages(layout.pipeline)).to(plan.device)
        self.model.recompute = train.recompute
        self.chunks = [ScheduledModel(self.model, layout.tensor, layout.pipeline, torch.bfloat16 if train.bf16
                                      else torch.float32, stage=s) for s in stages]  # the dtype crossing stages
        self.stage = self.chunks[0]
        # Two copies (DualPipe): this rank and pipeline rank PP-1-r hold the same stages (summed
        # gradients, one saved copy)
        self.mirror = groups.mirror_group() if schedule.model_copies == 2 else None
        if self.mirror is not None:
            mark_mirror_copies(self.model, int(pp_rank >= layout.pipeline // 2))
        self.optimizer = self._build_optimizer()

    def _build_optimizer(self):
        train = self.run.train
        adam = dict(lr=train.lr, betas=(train.adam_beta1, train.adam_beta2), weight_decay=train.weight_decay,
                    clip_grad=train.clip_grad)
        if self.plan.optimizer == "zero1":  # Megatron-Core's DDP + distributed optimizer
            return ZeRO1Optimizer(self.model, self.stage.config, bf16_moments=train.bf16_adam_moments,
                                  bf16_params=train.param_dtype == "bfloat16", mirror=self.mirror, **adam)
        return LocalOptimizer(self.model, moment_dtype=torch.bfloat16 if train.bf16_adam_moments else torch.float32,
                              mirror=self.mirror, **adam)

    # ------------------------------------------------------------------ resume
    def resume(self) -> None:
        """Load the agreed checkpoint, set later saves aside, record the run config, start the logs."""
        if self.resumed_from is not None:
            path = ckpt.checkpoint_path(self.ckpt_dir, self.resumed_from)
            common = ckpt.load_common(path)
            self.step, self.optimizer.step_count = common["step"], common["optimizer_steps"]
            ckpt.load(path, self.model, self.optimizer)
            _log(f"resumed from step {self.step} ({path})")
        elif self.run.checkpoint.load_weights:  # weights only: a fresh optimizer, step 0
            for note in ckpt.load_weights(self.run.checkpoint.load_weights, self.model, self.optimizer):
                _log(f"checkpoint: {note}")
            _log(f"started from the weights of {self.run.checkpoint.load_weights} (fresh optimizer, step 0)")
        for note in ckpt.start_line(self.ckpt_dir, self.resumed_from):
            _log(f"checkpoint: {note}")
        self.is_rank0 = dist.get_rank() == 0
        if self.is_rank0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            (self.ckpt_dir / "run_config.yaml").write_text(yaml.safe_dump(self.run.to_dict(), sort_keys=False))
        # every stage's MoE layer numbers, for one tracker of all
        per_stage = comm.all_gather_object([m.layer_number for m in self.model.moe_layers()], groups.pp_group())
        all_moe = sorted({n for numbers in per_stage for n in numbers})  # DualPipe's mirrors hold the same
        self.tracker = ExpertLoadTracker(len(all_moe), self.plan.model.num_routed_experts, all_moe,
                                         self.run.logging.starved_below)
        self.logger = (build_logger(self.run.logging, self.ckpt_dir.parent, self.run.to_dict(), self.run.train.steps,
                                    all_moe) if self.is_rank0 else None)
        self.preemption = PreemptionFlag()
        params = sum(p.numel() for p in self.model.parameters())
        _log(f"training {self.run.model.preset} ({params / 1e6:.2f}M params on this rank) for {self.run.train.steps} "
             f"steps: {self.plan.describe()}; Adam moments {self.optimizer.state_bytes() / 2**20:.2f} MiB on this rank")
        if self.plan.model.fp8 == "tile":
            linears = sum(isinstance(m, Fp8Linear) for m in self.model.modules())
            _log(f"fp8: {linears} linears with 1x128/128x128 scaling; backend {describe_backend()}")

    # ------------------------------------------------------------------ one step
    def train_step(self) -> StepResult:
        """The step on the device (`device_step`), then its losses and expert loads on the host."""
        lr, mtp_weight, gamma = self.step_values()
        stage_losses, grad_norm, loads = self.device_step(lr, mtp_weight, gamma)
        lm, mtp, balance = reduce_losses(stage_losses)
        for moe, load in zip(self.model.moe_layers(), loads):
            self.tracker.update(moe.layer_number, load, moe.router.expert_bias, moe.router.routing_entropy)
        self.step += 1
        self.consumed_samples += self.run.train.global_batch_size
        return StepResult(lm, mtp, balance, grad_norm, lr, gamma, mtp_weight)

    def step_values(self) -> tuple[float, float, float]:
        """This step's learning rate, MTP weight lambda and routing-bias rate gamma, from their schedules."""
        train, model_config = self.run.train, self.plan.model
        tokens_seen = self.step * train.global_batch_size * train.seq_length
        lr = learning_rate(self.step, train.steps, train.lr, train.min_lr, train.warmup_steps)
        mtp_weight = scheduled(train.mtp_loss_weight_schedule, tokens_seen, model_config.mtp_loss_weight)
        gamma = scheduled(train.bias_update_rate_schedule, tokens_seen, model_config.bias_update_rate)
        return lr, mtp_weight, gamma

    def device_step(self, lr: float, mtp_weight: float, gamma: float) -> tuple[list[float], float, list[torch.Tensor]]:
        """Forward and backward over the micro-batches, the optimizer step, the routing-bias step:
        what a rehearsal (`megatron_dsv3.rehearse`) runs on meta. Returns this stage's losses, the
        gradient norm and each MoE layer's load of the global batch."""
        train = self.run.train
        self.optimizer.zero_grad()
        stage_losses = forward_backward(self.forward_backward_func, self.chunks, self.batches, self.plan.micro_batches,
                                        train.micro_batch_size, train.seq_length, train.bf16, mtp_weight)
        grad_norm = self.optimizer.step(lr)  # reduce over replicas, clip, update
        # the load of every token through these stages: DualPipe's mirror ran half of them
        loads = update_expert_bias(self.model.routers(), gamma, groups.dp_group() if self.mirror is None
                                   else groups.dp_mirror_group())
        return stage_losses, grad_norm, loads

    def check(self, result: StepResult) -> None:
        """Stop on a NaN or exploding loss (every rank sees the same reduced values). A NaN/Inf that
        reached an FP8 quantiser makes the loss or the norm NaN too; the FP8 record names it."""
        lm, norm = result.lm_loss, result.grad_norm
        if lm != lm or abs(lm) == float("inf") or lm > self.run.train.max_loss or norm != norm:
            raise TrainingDiverged(self._roll_back(self.step, lm, norm) + self._fp8_overflow())
        self.first_loss = lm if self.first_loss is None else self.first_loss
        self.last_loss = lm

    def _fp8_overflow(self) -> str:
        if self.plan.model.fp8 != "tile":
            return ""
        try:
            raise_deferred_overflow()  # the one host sync of the FP8 checks, only when a step went bad
        except FP8RangeError as error:
            return f"; FP8: {error}"
        return ""

    def _roll_back(self, bad_step: int, loss: float, grad_norm: float) -> str:
        """Roll the checkpoints back to the last good one (all ranks verify it) and say what happened."""
        message = f"loss diverged at step {bad_step}: loss={loss:.4g}, grad norm={grad_norm:.4g}; "
        good, moved = ckpt.roll_back(self.ckpt_dir, bad_step)
        if dist.get_rank() != 0:
            return message + "rank 0 names the last good checkpoint"
        aside = f"; {len(moved)} later save(s) set aside in {self.ckpt_dir / 'abandoned'}" if moved else ""
        if good is None:
            return message + f"no checkpoint holds weights that gave a good loss and match their checksums{aside}"
        return message + f"the last good checkpoint is {good}, which `latest` now names{aside}"

    # ------------------------------------------------------------------ logs
    def log(self, result: StepResult, tokens_per_s: float) -> None:
        """Metrics, expert load and MTP counts from every pipeline stage, on rank 0's sinks."""
        mtp = {}
        if self.plan.model.mtp_num_modules:  # the last stage's counts: one small sum per logging step
            stats = take_stats(self.model.mtp, self.plan.model.mtp_num_modules, torch.device(self.plan.device))
            mtp = mtp_metrics(comm.all_reduce(stats, groups.world_group()))
        pp = groups.pp_group()
        if groups.size(pp) > 1:  # bring every stage's expert-load counts to the first stage
            states = comm.all_gather_object(self.tracker.state(), pp)
            if groups.rank(pp) == 0:
                # DualPipe: ranks PP/2.. mirror the first half's stages and counts
                for state in states[1:len(states) // 2 if self.mirror is not None else None]:
                    self.tracker.absorb(state)
        if self.logger is None:
            self.tracker.reset()
            return
        self.logger.log_expert_load(self.step, self.tracker, last=self.step == self.run.train.steps)
        self.logger.log(self.step, {
            "loss": result.lm_loss, "mtp_loss": result.mtp_loss, "balance_loss": result.balance_loss,
            "grad_norm": result.grad_norm, "lr": result.lr, "tokens_per_s": tokens_per_s,
            "bias_update_rate": result.bias_update_rate, "mtp_loss_weight": result.mtp_loss_weight, **mtp})

    # ------------------------------------------------------------------ validation
    def evaluation_due(self) -> bool:
        every = self.run.train.eval_interval
        return bool(every) and (self.step % every == 0 or self.step == self.run.train.steps)

    def evaluate(self) -> dict[str, float]:
        """The LM loss and the MTP loss on the held-out split (`train.eval_iters` global batches, the
        same at every evaluation), logged as valid/loss and valid/mtp_loss, and returned. The schedule
        runs its forward-only pass (`forward_backward(..., forward_only=True)`, under no_grad) with
        the model in eval mode: its routers count no validation token into the bias update or the
        expert-load monitor, its MTP modules none into their statistics, no balance loss is formed,
        and no parameter, gradient or optimizer state changes."""
        train, model = self.run.train, self.plan.model
        batches = self.valid_batches()
        sums = [0.0, 0.0, 0.0]
        self.model.eval()
        try:
            for _ in range(train.eval_iters):
                losses = forward_backward(self.forward_backward_func, self.chunks, batches, self.plan.micro_batches,
                                          train.micro_batch_size, train.seq_length, train.bf16, forward_only=True)
                sums = [total + loss / train.eval_iters for total, loss in zip(sums, losses)]
        finally:
            self.model.train()
        lm, mtp, _ = reduce_losses(sums)
        metrics = {"valid/loss": lm}
        if model.mtp_num_modules and model.mtp_loss_weight > 0:  # the model config's lambda > 0: MTP ran
            metrics["valid/mtp_loss"] = mtp
        if self.logger is not None:
            self.logger.log(self.step, metrics)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        common = {"step": self.step, "optimizer_steps": self.optimizer.step_count,
                  "consumed_samples": self.consumed_samples, "model_config": self.plan.model.to_dict()}
        return ckpt.save(self.ckpt_dir, self.step, self.model, self.optimizer, common, keep=self.run.checkpoint.keep)

    def stop(self, saved: Optional[Path], code: int) -> int:
        """Preempted or Ctrl-C: save (unless this step was just saved) and exit with `code`."""
        path = saved or self.save()
        if code == exit_status.PREEMPTED:
            _log(f"preempted: saved {path} at step {self.step}; exiting with {code} to be requeued")
        else:
            _log(f"interrupted (Ctrl-C): saved {path} at step {self.step}; exiting with {code}")
        return code

    def finish(self) -> int:
        """The final save (whatever checkpoint.save_interval, but not of a step just resumed) and the
        summary line."""
        path = self.save() if self.step != self.resumed_from else None
        if self.first_loss is not None:
            _log(f"done: {self.step} steps, loss {self.first_loss:.4f} -> {self.last_loss:.4f}"
                 + (f", saved {path}" if path else ""))
        return 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> int:
        """Run the plan; returns the process exit code."""
        steps, every = self.run.train.steps, self.run.checkpoint.save_interval
        self.build()
        self.resume()
        progress = self._progress_bar()
        window_start, window_steps = time.perf_counter(), 0
        self.model.train()
        try:
            while self.step < steps:
                result = self.train_step()
                self.check(result)
                window_steps += 1
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{result.lm_loss:.3f}")
                if self.step % self.run.logging.interval == 0 or self.step == steps:
                    tokens = window_steps * self.run.train.global_batch_size * self.run.train.seq_length
                    self.log(result, tokens / (time.perf_counter() - window_start))
                    window_start, window_steps = time.perf_counter(), 0
                if self.evaluation_due():
                    began = time.perf_counter()
                    self.evaluate()
                    window_start += time.perf_counter() - began  # not counted in the training throughput
                saved = self.save() if every and self.step % every == 0 and self.step < steps else None
                code = self.preemption.agreed()
                if code is not None:
                    return self.stop(saved, code)
            return self.finish()
        finally:
            if progress is not None:
                progress.close()
            if self.logger is not None:
                self.logger.close()

    def _progress_bar(self):
        if not (self.is_rank0 and sys.stderr.isatty()):
            return None
        return tqdm(total=self.run.train.steps, initial=self.step, unit="step", dynamic_ncols=True)


def claim_checkpoint_dir(run: RunConfig, plan: RunPlan):
    """Rank 0 claims `checkpoint.dir` (`checkpoint.lock.claim`: writable, room for a checkpoint, no
    other live run); every rank learns the outcome and refuses with the same sentence. Returns
    rank 0's lock (None elsewhere)."""
    lock, problem, notes = None, None, []
    if dist.get_rank() == 0:
        try:
            lock = claim(run.checkpoint.dir, checkpoint_bytes(plan), notes)
        except RunLockError as error:
            problem = str(error)
    if dist.get_world_size() > 1:
        problem = comm.broadcast_object(problem, src=0)
    if problem is not None:
        raise RunLockError(problem)
    for note in notes:
        _log(f"checkpoint: {note}")
    return lock


def main(argv: Optional[list[str]] = None, exiting: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="dsv3-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run YAML (default: the tiny preset on the embedded corpus)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.expert=2")
    args = parser.parse_args(argv)
    refused = (RunConfigError, ConfigError, DataError, PlanError, TokenizerError, RunLockError, UnsafeCheckpointError)
    try:
        run = load_run_config(args.config, tuple(args.overrides))
    except refused as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return exit_status.REFUSED
    cuda = torch.cuda.is_available()
    try:  # before the process group starts: a rank that refuses must not leave others connecting to it
        plan = make_plan(run, world_from_environment(), ranks_per_node(), cuda)
        check_fits(plan, ranks_per_node())
    except refused as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return exit_status.REFUSED
    init_distributed(plan.device, run.checkpoint.save_timeout_s)
    previous_handlers = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    lock, trainer = None, None
    try:
        lock = claim_checkpoint_dir(run, plan)
        with cpu_shims() if plan.device == "cpu" else contextlib.nullcontext(), signal_safe_checkpoint_writer():
            trainer = Trainer(run, plan)
            return trainer.train()
    except TrainingDiverged as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return exit_status.DIVERGED
    except ckpt.CheckpointWriteError as error:
        print(f"dsv3-train: stopped: {error}", file=sys.stderr)
        return exit_status.WRITE_FAILED
    except refused as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return exit_status.REFUSED
    except KeyboardInterrupt:
        where = (f"at step {trainer.step}, before the end of the step: not saved" if trainer is not None and
                 getattr(trainer, "preemption", None) else "before the first step: nothing to save")
        print(f"dsv3-train: interrupted (Ctrl-C) {where}; `latest` in {run.checkpoint.dir} names the checkpoint "
              "a rerun resumes", file=sys.stderr)
        return exit_status.INTERRUPTED
    except RuntimeError as error:
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        print(f"dsv3-train: rank {dist.get_rank()}: a collective outlasted parallel.timeout_s="
              f"{run.parallel.timeout_s:g} s or a checkpoint write checkpoint.save_timeout_s="
              f"{run.checkpoint.save_timeout_s:g} s; another rank stalled or died "
              f"({str(error).splitlines()[0][:200]})", file=sys.stderr)
        return exit_status.TIMED_OUT
    finally:
        if lock is not None:
            lock.release()
        if dist.is_initialized():
            parallel_state.destroy_model_parallel()  # its groups die with the process group
            dist.destroy_process_group()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)


def cli() -> None:
    """The console script. Python restores default handlers while the interpreter exits, and the
    default for SIGUSR1 is to die: a warning signal repeated by the batch script must not turn
    exit 0 or 75 into a kill, so the process ignores both signals from the end of `main` on.
    The code is also recorded for dsv3-torchrun (megatron_dsv3.exit_status). An exception that
    escapes `main` is a bug: its traceback, then a line saying so, exit 1."""
    code = entry_point("dsv3-train")(main)(exiting=True)
    exit_status.record(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
