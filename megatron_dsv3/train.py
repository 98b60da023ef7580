"""dsv3-train: config -> process groups -> model -> data -> steps -> logs and checkpoints.

    dsv3-train                                   # tiny preset on the embedded corpus
    dsv3-train --config run.yaml train.steps=50  # YAML plus dotted overrides
    torchrun --nproc-per-node 4 -m megatron_dsv3.train parallel.tensor=2 parallel.expert=2

Exit codes: 0 done, 2 refused input, 3 diverged (NaN or exploding loss), 4 a collective or a
checkpoint write outlasted its bound (`parallel.timeout_s`, `checkpoint.save_timeout_s`: a rank
stalled or died), 75 preempted after saving a checkpoint (SIGTERM / SIGUSR1; Slurm requeues on it).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import yaml

EXIT_REFUSED, EXIT_DIVERGED, EXIT_TIMED_OUT, EXIT_PREEMPTED = 2, 3, 4, 75
# Model settings that schedules or the FP8 switch change between runs: not a change of model.
RESUMABLE_MODEL_CHANGES = ("mtp_loss_weight", "bias_update_rate", "fp8")
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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


class PreemptionFlag:
    """Set by SIGTERM/SIGUSR1; checked (and agreed on by all ranks) at the end of each step."""

    def __init__(self):
        self.raised = False
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True

    def agreed(self) -> bool:
        from megatron_dsv3.parallel import groups

        flag = torch.tensor([1.0 if self.raised else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=groups.world_group())
        return bool(flag.item())


def _gather_expert_load(tracker) -> None:
    """Bring every pipeline stage's expert-load counts to its first stage (where rank 0 logs)."""
    from megatron_dsv3.parallel import groups

    pp = groups.pp_group()
    if groups.size(pp) == 1:
        return
    states = [None] * groups.size(pp)
    dist.all_gather_object(states, tracker.state(), group=pp)
    if groups.rank(pp) == 0:
        for state in states[1:]:
            tracker.absorb(state)


def check_same_model(saved: dict[str, Any], config, path: Path) -> None:
    """Refuse to resume a checkpoint saved with another model, naming every differing field."""
    from megatron_dsv3.run_config import RunConfigError

    now = config.to_dict()
    differing = [f"{key}: {saved.get(key)!r} saved, {now.get(key)!r} now" for key in sorted(set(saved) | set(now))
                 if key not in RESUMABLE_MODEL_CHANGES and saved.get(key) != now.get(key)]
    if differing:
        raise RunConfigError(f"checkpoint {path} was saved with another model ({'; '.join(differing)}): resume it "
                             "with the model settings it was saved with, or start a fresh run with "
                             "checkpoint.resume=false or another checkpoint.dir")


def diverged(ckpt_dir: Path, bad_step: int, loss: float, grad_norm: float) -> str:
    """Roll the checkpoints back to the last good one (rank 0) and say what happened."""
    from megatron_dsv3.checkpoint import dist as ckpt

    message = f"loss diverged at step {bad_step}: loss={loss:.4g}, grad norm={grad_norm:.4g}; "
    if dist.get_rank() != 0:
        return message + "rank 0 names the last good checkpoint"
    good, moved = ckpt.roll_back(ckpt_dir, bad_step)
    aside = f"; {len(moved)} later save(s) set aside in {ckpt_dir / 'abandoned'}" if moved else ""
    if good is None:
        return message + f"no checkpoint holds weights that gave a good loss{aside}"
    return message + f"the last good checkpoint is {good}, which `latest` now names{aside}"


def train(run: dict[str, Any]) -> int:
    """Run the configured training; returns the process exit code."""
    from megatron_dsv3.checkpoint import dist as ckpt
    from megatron_dsv3.launch.preflight import nodes_per_token
    from megatron_dsv3.data import build_train_iterator
    from megatron_dsv3 import registry
    from megatron_dsv3.model.gpt import build_model
    from megatron_dsv3.model.moe.router import update_expert_bias
    from megatron_dsv3.monitor import ExpertLoadTracker, build_logger
    from megatron_dsv3.optim import LocalOptimizer, learning_rate, scheduled
    from megatron_dsv3.parallel import groups, initialize_parallel
    from megatron_dsv3.pipeline.stages import ScheduledModel, forward_backward, reduce_losses
    from megatron_dsv3.run_config import RunConfigError, model_config

    tcfg, pcfg, ccfg = run["train"], run["parallel"], run["checkpoint"]
    config = model_config(run)
    layout = initialize_parallel(pcfg["tensor"], pcfg["pipeline"], pcfg["expert"], timeout_s=pcfg["timeout_s"])
    config.validate(tensor_parallel_size=layout.tensor, expert_parallel_size=layout.expert,
                    pipeline_parallel_size=layout.pipeline)
    # Node-limited routing: each routing group must live on one node (refused otherwise).
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
                         or dist.get_world_size())
    reach = nodes_per_token(config.num_routed_experts, config.num_expert_groups, config.num_limited_groups,
                            layout.expert, 1, ranks_per_node)
    dp_rank, dp_size = groups.rank(groups.dp_group()), layout.data
    gbs, mbs, seq = tcfg["global_batch_size"], tcfg["micro_batch_size"], tcfg["seq_length"]
    if gbs % (mbs * dp_size):
        raise RunConfigError(f"train.global_batch_size={gbs} is not a multiple of micro_batch_size={mbs} x "
                             f"data-parallel size {dp_size}")
    num_micro = gbs // (mbs * dp_size)
    device = torch.device("cuda" if torch.cuda.is_available() and tcfg["device"] != "cpu" else "cpu")

    ckpt_dir = Path(ccfg["dir"])
    resume_step, notes = ckpt.agree_on_resume(ckpt_dir) if ccfg["resume"] else (None, [])
    for note in notes:
        _log(f"checkpoint: {note}")
    # Samples consumed by all ranks so far (Megatron's consumed_samples): resume exactly where the
    # data stopped, even when the global batch size changed between runs.
    consumed = 0
    if resume_step is not None:
        saved = ckpt.load_common(ckpt.checkpoint_path(ckpt_dir, resume_step))
        check_same_model(saved["model_config"], config, ckpt.checkpoint_path(ckpt_dir, resume_step))
        consumed = saved["consumed_samples"]
    # Data first: a missing path or a vocabulary larger than the model's is refused before any compute.
    batches = build_train_iterator(run["data"], seq, mbs, gbs, dp_rank, dp_size, tcfg["seed"],
                                   config.vocab_size, start_sample=consumed)

    torch.manual_seed(tcfg["seed"])
    model = build_model(config, seed=tcfg["seed"]).to(device)
    model.recompute = tcfg["recompute"]
    # Megatron-Core's forward/backward function: 1F1B across pipeline stages, a plain loop without.
    schedule = registry.get("schedule", pcfg["schedule"])()
    stage = ScheduledModel(model, layout.tensor, layout.pipeline)
    if config.fp8 == "tile":
        from megatron_dsv3.fp8 import Fp8Linear, describe_backend

        fp8_linears = sum(isinstance(m, Fp8Linear) for m in model.modules())
        _log(f"fp8: {fp8_linears} linears with 1x128/128x128 scaling; backend {describe_backend()}")
    adam = dict(lr=tcfg["lr"], betas=(tcfg["adam_beta1"], tcfg["adam_beta2"]), weight_decay=tcfg["weight_decay"],
                clip_grad=tcfg["clip_grad"])
    distributed = pcfg["distributed_optimizer"]
    if distributed is True or (distributed == "auto" and device.type == "cuda"):
        # ZeRO-1: Megatron-Core's DDP + distributed optimizer shard the Adam state over data parallel.
        from megatron_dsv3.optim.zero1 import ZeRO1Optimizer

        bf16_params = tcfg["param_dtype"] == "bfloat16"
        optimizer = ZeRO1Optimizer(model, stage.config, bf16_moments=tcfg["bf16_adam_moments"], bf16_params=bf16_params,
                                   **adam)
        optimizer_name = (f"Megatron DistributedOptimizer (ZeRO-1 over DP{layout.data}"
                          f"{', BF16 weights with FP32 master slices' if bf16_params else ''})")
    elif tcfg["param_dtype"] == "bfloat16":
        raise RunConfigError("train.param_dtype=bfloat16 keeps the FP32 master weights in Megatron's distributed "
                             "optimizer, which parallel.distributed_optimizer=auto picks only on GPU: set it to true")
    else:
        optimizer = LocalOptimizer(model, moment_dtype=torch.bfloat16 if tcfg["bf16_adam_moments"] else torch.float32,
                                   **adam)
        optimizer_name = "AdamW, state on every data-parallel rank"
    step = 0
    if resume_step is not None:
        path = ckpt.checkpoint_path(ckpt_dir, resume_step)
        common = ckpt.load_common(path)
        step, optimizer.step_count = common["step"], common["optimizer_steps"]
        ckpt.load(path, model, optimizer)
        _log(f"resumed from step {step} ({path})")
    for note in ckpt.start_line(ckpt_dir, resume_step):
        _log(f"checkpoint: {note}")
    is_rank0 = dist.get_rank() == 0
    if is_rank0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (ckpt_dir / "run_config.yaml").write_text(yaml.safe_dump(run, sort_keys=False))
    logger = build_logger(run["logging"], ckpt_dir.parent, run) if is_rank0 else None
    moe_layers = model.moe_layers()  # this pipeline stage's
    routers = [moe.router for moe in moe_layers]
    per_stage = [None] * layout.pipeline  # the MoE layer numbers of every stage, for one tracker of all
    dist.all_gather_object(per_stage, [m.layer_number for m in moe_layers], group=groups.pp_group())
    all_moe = sorted(n for numbers in per_stage for n in numbers)
    tracker = ExpertLoadTracker(len(all_moe), config.num_routed_experts, all_moe)
    preempt = PreemptionFlag()
    params = sum(p.numel() for p in model.parameters())
    _log(f"training {run['model']['preset']} ({params / 1e6:.2f}M params on this rank) for {tcfg['steps']} steps: "
         f"world {dist.get_world_size()} = TP{layout.tensor} x PP{layout.pipeline} x DP{layout.data} "
         f"(EP{layout.expert}), {pcfg['schedule']} over {num_micro} micro-batches of {mbs}x{seq} per rank, device {device}; "
         f"a token's experts on <= {reach} node(s); {optimizer_name}, Adam moments "
         f"{optimizer.state_bytes() / 2**20:.2f} MiB on this rank")

    def save(at_step: int) -> Path:
        common = {"step": at_step, "optimizer_steps": optimizer.step_count, "consumed_samples": consumed,
                  "model_config": config.to_dict()}
        return ckpt.save(ckpt_dir, at_step, model, optimizer, common, keep=ccfg["keep"])

    progress = None
    if is_rank0 and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=tcfg["steps"], initial=step, unit="step", dynamic_ncols=True)
    first_loss = last_loss = None
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    while step < tcfg["steps"]:
        tokens_seen = step * gbs * seq
        lr = learning_rate(step, tcfg["steps"], tcfg["lr"], tcfg["min_lr"], tcfg["warmup_steps"])
        mtp_weight = scheduled(tcfg["mtp_loss_weight_schedule"], tokens_seen, config.mtp_loss_weight)
        gamma = scheduled(tcfg["bias_update_rate_schedule"], tokens_seen, config.bias_update_rate)
        optimizer.zero_grad()
        stage_losses = forward_backward(schedule, stage, batches, num_micro, mbs, seq, tcfg["bf16"], mtp_weight)
        grad_norm = optimizer.step(lr)  # reduce over replicas, clip, update
        lm, mtp, bal = reduce_losses(stage_losses)
        if not (lm == lm and abs(lm) != float("inf")) or lm > tcfg["max_loss"] or grad_norm != grad_norm:
            raise TrainingDiverged(diverged(ckpt_dir, step + 1, lm, grad_norm))
        loads = update_expert_bias(routers, gamma, groups.dp_group())
        for moe, load in zip(moe_layers, loads):
            tracker.update(moe.layer_number, load, moe.router.expert_bias)
        step += 1
        consumed += gbs
        window_tokens += gbs * seq
        first_loss = lm if first_loss is None else first_loss
        last_loss = lm
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{lm:.3f}")
        if step % tcfg["log_interval"] == 0 or step == tcfg["steps"]:
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": lm, "mtp_loss": mtp, "balance_loss": bal, "grad_norm": grad_norm,
                       "lr": lr, "tokens_per_s": window_tokens / elapsed,
                       "bias_update_rate": gamma, "mtp_loss_weight": mtp_weight}
            _gather_expert_load(tracker)
            if logger is not None:
                logger.log_expert_load(step, tracker)
                logger.log(step, metrics)
            else:
                tracker.reset()
            window_start, window_tokens = time.perf_counter(), 0
        saved = None
        if ccfg["save_interval"] and step % ccfg["save_interval"] == 0 and step < tcfg["steps"]:
            saved = save(step)
        if preempt.agreed():
            path = saved or save(step)  # not a second write of the step the interval save just wrote
            _log(f"preempted: saved {path} at step {step}; exiting with {EXIT_PREEMPTED} to be requeued")
            return EXIT_PREEMPTED
    if progress is not None:
        progress.close()
    path = save(step) if ccfg["save_interval"] and step != resume_step else None  # not the one just resumed
    if logger is not None:
        logger.close()
    if first_loss is not None:
        _log(f"done: {step} steps, loss {first_loss:.4f} -> {last_loss:.4f}" + (f", saved {path}" if path else ""))
    return 0


def main(argv: Optional[list[str]] = None, exiting: bool = False) -> int:
    parser = argparse.ArgumentParser(prog="dsv3-train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="run YAML (default: the tiny preset on the embedded corpus)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=50 parallel.expert=2")
    args = parser.parse_args(argv)
    from megatron_dsv3.config import ConfigError
    from megatron_dsv3.data import DataError
    from megatron_dsv3.launch.preflight import PreflightError
    from megatron_dsv3.parallel.groups import ParallelConfigError
    from megatron_dsv3.run_config import RunConfigError, load_run_config

    refused = (RunConfigError, ConfigError, DataError, ParallelConfigError, PreflightError)
    try:
        run = load_run_config(args.config, tuple(args.overrides))
    except refused as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return EXIT_REFUSED
    from patches.megatron_checkpoint import signal_safe_checkpoint_writer
    from patches.megatron_cpu import cpu_shims

    device = "cuda" if torch.cuda.is_available() and run["train"]["device"] != "cpu" else "cpu"
    init_distributed(device, run["checkpoint"]["save_timeout_s"])
    previous_handlers = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        with cpu_shims() if device == "cpu" else contextlib.nullcontext(), signal_safe_checkpoint_writer():
            return train(run)
    except TrainingDiverged as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return EXIT_DIVERGED
    except refused as error:
        print(f"dsv3-train: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except RuntimeError as error:
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        print(f"dsv3-train: rank {dist.get_rank()}: a collective outlasted parallel.timeout_s="
              f"{run['parallel']['timeout_s']:g} s or a checkpoint write checkpoint.save_timeout_s="
              f"{run['checkpoint']['save_timeout_s']:g} s; another rank stalled or died "
              f"({str(error).splitlines()[0][:200]})", file=sys.stderr)
        return EXIT_TIMED_OUT
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()  # its groups die with the process group
            dist.destroy_process_group()
        for sig, handler in previous_handlers.items():
            signal.signal(sig, signal.SIG_IGN if exiting else handler)


def cli() -> None:
    """The console script. Python restores default handlers while the interpreter exits, and the
    default for SIGUSR1 is to die: a warning signal repeated by the batch script must not turn
    exit 0 or 75 into a kill, so the process ignores both signals from the end of `main` on.
    The code is also recorded for dsv3-torchrun (megatron_dsv3.exit_status)."""
    from megatron_dsv3 import exit_status

    code = main(exiting=True)
    exit_status.record(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
