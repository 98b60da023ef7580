"""The run configuration shared by dsv3-train and dsv3-launch: a YAML file plus dotted overrides
become one frozen `RunConfig` of typed sections, each setting defined once below with its
default and its check.

    run = load_run_config("examples/tiny-cpu.yaml", ("train.steps=50", "parallel.expert=2"))
    run.train.steps, run.parallel.expert        # 50, 2
    run.model_config()                           # the DSV3Config (train.fp8 chosen here, once)

Sections: model, parallel, train, data, checkpoint, logging, launch (read by dsv3-launch). A
dotted override changes only its key. Unknown keys and bad values are refused by name
(`RunConfigError`); the resolved config is saved beside the checkpoints (`to_dict`).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_dsv3 import registry, safe_data
from megatron_dsv3.config import FP8_MODES, RECOMPUTE_MODES, ConfigError, DSV3Config
from megatron_dsv3.data.corpus import DEFAULT_CACHE_DIR, DEFAULT_MAX_BYTES
from megatron_dsv3.pipeline.schedule import ONE_F_ONE_B


class RunConfigError(ValueError):
    """A bad run configuration; the message names the key."""


Check = Callable[[str, Any], Any]  # (dotted key, value) -> the value to store, or RunConfigError


def setting(default: Any, check: Check) -> Any:
    """A section field: its default and the check every value given for it passes."""
    factory = (lambda: copy.deepcopy(default)) if isinstance(default, (list, dict)) else None
    extra = {"default_factory": factory} if factory else {"default": default}
    return dataclasses.field(metadata={"check": check}, **extra)


# ----------------------------------------------------------------------------- checks
INT64_MAX = 2**63 - 1  # what a tensor, a file offset or a Slurm field can hold


def integer(minimum: int, maximum: int = INT64_MAX) -> Check:
    def check(key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise RunConfigError(f"{key} must be {kind}, got {value!r}")
        if value > maximum:
            raise RunConfigError(f"{key} must be at most {maximum}, got {value!r}")
        return value
    return check


def number(low: float, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> Check:
    """A real number in the interval. PyYAML (YAML 1.1) reads 1e6 or 3e-4 without a dot as
    strings, so numeric strings are accepted and stored as floats."""
    def check(key: str, value: Any) -> float:
        parsed = value
        if isinstance(value, str):
            try:
                parsed = float(value)
            except ValueError:
                pass
        ok = (isinstance(parsed, (int, float)) and not isinstance(parsed, bool) and math.isfinite(parsed)
              and (parsed > low if low_open else parsed >= low) and (parsed < high if high_open else parsed <= high))
        if not ok:
            if high == math.inf:
                interval = f"{'>' if low_open else '>='} {low:g}"
            else:
                interval = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            raise RunConfigError(f"{key} must be a number {interval}, got {value!r}")
        return float(parsed)
    return check


def boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RunConfigError(f"{key} must be true or false, got {value!r}")
    return value


def one_of(*choices: Any, meaning: str = "") -> Check:
    def check(key: str, value: Any) -> Any:
        if not any(value == choice and type(value) is type(choice) for choice in choices):
            shown = ", ".join("true" if c is True else "false" if c is False else str(c) for c in choices)
            raise RunConfigError(f"{key}={value!r} is not one of {shown}{meaning}")
        return value
    return check


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def text(key: str, value: Any) -> str:
    """One non-empty line (a number stands for its digits)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RunConfigError(f"{key} must be a string, got {value!r}")
    value = str(value)
    if not value or _CONTROL.search(value):
        raise RunConfigError(f"{key}={value!r} must be one non-empty line without control characters (in a batch "
                             "script a newline would end sbatch's #SBATCH block and run the rest as a command)")
    return value


def without(characters: str, why: str) -> Check:
    def check(key: str, value: Any) -> str:
        value = text(key, value)
        if set(value) & set(characters):
            raise RunConfigError(f"{key}={value!r} must not contain {' or '.join(map(repr, characters))}: {why}")
        return value
    return check


def matching(pattern: str, form: str) -> Check:
    compiled = re.compile(pattern, re.ASCII)  # \\d is 0-9 only: Slurm reads no other digits

    def check(key: str, value: Any) -> str:
        value = text(key, value)
        if not compiled.fullmatch(value):
            raise RunConfigError(f"{key}={value!r} is not {form}")
        return value
    return check


def path(inner: Check = text) -> Check:
    """A file or folder: `~` and `~user` expanded here, as a shell would (else a folder named `~`)."""
    def check(key: str, value: Any) -> str:
        return os.path.expanduser(inner(key, value))
    return check


def split_weights(key: str, value: Any) -> str:
    """Megatron's train,valid,test split: up to three finite weights >= 0 with a positive sum."""
    value = text(key, value)
    try:
        weights = [float(part) for part in re.split(r"[,/]", value)]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise RunConfigError(f"{key}={value!r} is not train,valid,test weights such as \"98,2,0\" (up to three "
                             "finite numbers >= 0 with a positive sum)")
    return value


def valid_weight(split: str) -> float:
    """The validation weight of a checked `data.split` (its second number; 0 when absent)."""
    weights = [float(part) for part in re.split(r"[,/]", split)]
    return weights[1] if len(weights) > 1 else 0.0


def optional(inner: Check) -> Check:
    def check(key: str, value: Any) -> Any:
        return None if value is None else inner(key, value)
    return check


def list_of(inner: Check) -> Check:
    def check(key: str, value: Any) -> list:
        if not isinstance(value, list):
            raise RunConfigError(f"{key} must be a list, got {value!r}")
        return [inner(f"{key}[{i}]", item) for i, item in enumerate(value)]
    return check


def mapping(key: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise RunConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def value_schedule(key: str, value: Any) -> Optional[list]:
    """null, or [[tokens_from, value], ...] of non-negative numbers."""
    if value is None:
        return None
    try:
        ok = isinstance(value, list) and all(isinstance(p, (list, tuple)) and len(p) == 2 and all(
            not isinstance(x, bool) and math.isfinite(float(x)) and float(x) >= 0 for x in p) for p in value)
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise RunConfigError(f"{key} must be null or a list of [tokens_from, value] pairs of finite numbers >= 0, "
                             f"got {value!r}")
    return [[float(a), float(b)] for a, b in value]


def registered(kind: str) -> Check:
    def check(key: str, value: Any) -> str:
        if value not in registry.names(kind):
            raise RunConfigError(f"{key}={value!r} is not a registered {kind.replace('_', ' ')} "
                                 f"(registered: {', '.join(registry.names(kind))})")
        return value
    return check


def model_overrides(key: str, value: Any) -> dict:
    """DSV3Config fields (checked by DSV3Config), except `fp8`: `train.fp8` is the one FP8 switch."""
    value = mapping(key, value)
    if "fp8" in value:
        raise RunConfigError(f"{key}.fp8 is not a model override: train.fp8 is the one FP8 switch (set "
                             f"train.fp8={value['fp8']!r} instead)")
    return value


def blend(key: str, value: Any) -> list:
    """Dataset prefixes `[p1, p2]` or a weighted blend `[w1, p1, w2, p2]` (Megatron's --data-path)."""
    if not isinstance(value, list) or any(isinstance(v, (bool, list, dict)) or v is None for v in value):
        raise RunConfigError(f"{key} must be a list of dataset prefixes or [weight, prefix, ...], got {value!r}")
    return value


def environment(key: str, value: Any) -> dict:
    """VARIABLE: value (null unsets it); names must be shell variable names, values plain scalars."""
    value = mapping(key, value)
    for name, setting_value in value.items():
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise RunConfigError(f"{key} key {name!r} is not a shell variable name (letters, digits and '_', not "
                                 "starting with a digit)")
        if setting_value is not None and not isinstance(setting_value, (str, int, float, bool)):
            raise RunConfigError(f"{key}.{name} must be a string, number, true/false or null (null unsets it), "
                                 f"got {setting_value!r}")
        if _CONTROL.search(str(setting_value)):
            raise RunConfigError(f"{key}.{name}={setting_value!r} must not contain control characters")
    return value


def command(key: str, value: Any) -> Any:
    """The training command: a string or a non-empty list of words (trusted shell input)."""
    if value is None or (isinstance(value, list) and value and all(isinstance(w, str) for w in value)):
        return value
    if not isinstance(value, str):
        raise RunConfigError(f"{key} must be a string or a non-empty list of strings, got {value!r}")
    try:
        words = shlex.split(value)
    except ValueError as error:
        raise RunConfigError(f"{key}={value!r} does not split into words: {error}") from None
    if not words:
        raise RunConfigError(f"{key} is empty; leave it null to run dsv3-train")
    return value


def slurm_time(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RunConfigError(f"{key}={value!r} must be quoted text such as \"24:00:00\" (YAML reads an unquoted "
                             "24:00:00 as the base-60 number 86400)")
    return matching(r"\d+(:\d+){0,2}|\d+-\d+(:\d+){0,2}|UNLIMITED|INFINITE",
                    "a Slurm time limit: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED")(key, value)


# ----------------------------------------------------------------------------- sections
MAX_TIMEOUT_S = 86400.0  # a day: datetime.timedelta and the process groups take no more
SAVE_WAIT_FACTOR = 3  # a save may wait at most this many times the step's stall limit
@dataclasses.dataclass(frozen=True)
class ModelSection:
    preset: str = setting("tiny", registered("preset"))
    overrides: dict = setting({}, model_overrides)


@dataclasses.dataclass(frozen=True)
class ParallelSection:
    tensor: int = setting(1, integer(1))
    pipeline: int = setting(1, integer(1))
    expert: int = setting(1, integer(1))
    schedule: str = setting(ONE_F_ONE_B.name, registered("schedule"))  # a `pipeline.Schedule`'s name
    # Megatron-Core's DDP + distributed optimizer (ZeRO-1); auto = on GPU only.
    distributed_optimizer: Any = setting("auto", one_of("auto", True, False))
    timeout_s: float = setting(600.0, number(0, MAX_TIMEOUT_S, low_open=True))  # every collective of a step


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = setting(300, integer(1))
    micro_batch_size: int = setting(8, integer(1))
    global_batch_size: int = setting(16, integer(1))
    seq_length: int = setting(128, integer(2))
    lr: float = setting(3.0e-3, number(0, low_open=True))
    min_lr: float = setting(3.0e-4, number(0))
    warmup_steps: int = setting(20, integer(0))
    weight_decay: float = setting(0.1, number(0))
    adam_beta1: float = setting(0.9, number(0, 1, high_open=True))
    adam_beta2: float = setting(0.95, number(0, 1, high_open=True))
    clip_grad: float = setting(1.0, number(0))
    seed: int = setting(1234, integer(0, 2**32 - 1))  # what numpy's and Megatron's seeding take
    bf16: bool = setting(False, boolean)
    fp8: str = setting("none", one_of(*FP8_MODES))
    bf16_adam_moments: bool = setting(False, boolean)
    recompute: str = setting("none", one_of(*RECOMPUTE_MODES, meaning=(
        " (selective: RMSNorm, MLA up-projections and SwiGLU outputs rerun in backward; full: every decoder layer)")))
    # bfloat16: BF16 weights, FP32 masters in the distributed optimizer
    param_dtype: str = setting("float32", one_of("float32", "bfloat16"))
    device: str = setting("auto", one_of("auto", "cpu", "cuda"))
    # [[tokens_from, value], ...]; the report's: gamma 0.001 until 14.3T tokens then 0, lambda 0.3
    # until 10T then 0.1. None keeps the model preset's constant value.
    bias_update_rate_schedule: Optional[list] = setting(None, value_schedule)
    mtp_loss_weight_schedule: Optional[list] = setting(None, value_schedule)
    max_loss: float = setting(1.0e3, number(0, low_open=True))  # a loss above this (or NaN) stops the run
    # Validation (Trainer.evaluate): the LM and MTP loss on the held-out split (data.split's second
    # weight) every eval_interval steps and at the end, over its first eval_iters global batches
    # (the same ones each time), through the schedule's forward-only pass. 0: never.
    eval_interval: int = setting(0, integer(0))
    eval_iters: int = setting(10, integer(1))


@dataclasses.dataclass(frozen=True)
class DataSection:
    paths: list = setting([], blend)  # empty: the embedded stdlib corpus
    cache_dir: str = setting(DEFAULT_CACHE_DIR, path())
    tokenizer: str = setting("byte", path())  # "byte" or a tokenizer.json
    backend: str = setting("megatron", one_of("megatron", "dali"))
    split: str = setting("100,0,0", split_weights)  # train,valid,test weights
    valid_samples: Optional[int] = setting(None, optional(integer(1)))
    corpus_max_bytes: int = setting(DEFAULT_MAX_BYTES, integer(1))  # of the embedded corpus


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    dir: str = setting("runs/tiny/checkpoints", path())
    save_interval: int = setting(100, integer(0))  # 0: save only at the end
    resume: bool = setting(True, boolean)
    keep: int = setting(3, integer(0))  # 0 keeps all
    # Every wait of a save (writes, and the waits while rank 0 renames): at most SAVE_WAIT_FACTOR x
    # parallel.timeout_s, the step's stall limit (a larger value is lowered to it); None: exactly
    # that (1800 s with the defaults).
    save_timeout_s: Optional[float] = setting(None, optional(number(0, MAX_TIMEOUT_S * SAVE_WAIT_FACTOR,
                                                                    low_open=True)))
    # A checkpoint folder (dsv3-convert hf-to-dist's OUT, or any iter_NNNNNNN) whose weights a run
    # with nothing to resume in `dir` starts from: a fresh optimizer, step 0, the data from its start.
    load_weights: Optional[str] = setting(None, optional(path()))


@dataclasses.dataclass(frozen=True)
class LoggingSection:
    """What `monitor.build_logger` and the trainer's log phase read; README "Monitoring"."""

    interval: int = setting(10, integer(1))  # steps between logged records
    console: bool = setting(True, boolean)
    jsonl: bool = setting(True, boolean)  # metrics.jsonl beside the checkpoints folder
    wandb: bool = setting(False, boolean)
    wandb_project: str = setting("megatron-dsv3", text)
    wandb_mode: str = setting("offline", one_of("offline", "online"))  # online only when asked for here
    wandb_run_name: Optional[str] = setting(None, optional(text))  # default: the run directory's name
    wandb_bar_charts: bool = setting(False, boolean)
    tensorboard: bool = setting(False, boolean)  # event files under tensorboard/ beside the checkpoints folder
    # wandb/TensorBoard heatmap images at the first logging step from every multiple of this many steps,
    # and at the last step (0: never); drawing the three takes about 0.8 s of a CPU core (tiny)
    heatmap_interval: int = setting(500, integer(0))
    heatmap_layer: Optional[int] = setting(None, optional(integer(0)))  # load over time of this MoE layer; None: mean
    starved_below: float = setting(0.1, number(0, 1, low_open=True, high_open=True))  # x the mean load


SLURM_NAME = r"[A-Za-z0-9_.-]+"
SLURM_NAME_FORM = "letters, digits, '_', '.', '-'"


@dataclasses.dataclass(frozen=True)
class LaunchSection:
    """Read by dsv3-launch. Every value that reaches the batch script is checked here; `setup` and
    `command` are shell by design: trusted input."""

    nodes: int = setting(1, integer(1))
    gpus_per_node: int = setting(8, integer(1))
    tasks_per_node: Optional[int] = setting(None, optional(integer(1)))  # None: one per GPU (1 on CPU)
    partition: Optional[str] = setting(None, optional(matching(
        rf"{SLURM_NAME}(,{SLURM_NAME})*", f"Slurm partition name(s): {SLURM_NAME_FORM}, comma-separated")))
    account: Optional[str] = setting(None, optional(matching(SLURM_NAME, f"a Slurm account name: {SLURM_NAME_FORM}")))
    time: str = setting("04:00:00", slurm_time)
    job_name: str = setting("dsv3", without("/\\", "it names the script and log files, and sbatch reads '\\' "
                                                     "as an escape"))
    env_preset: str = setting("h800", matching(SLURM_NAME, f"a preset name (megatron_dsv3/launch/presets/NAME.yaml; "
                                                            f"{SLURM_NAME_FORM})"))
    env_overrides: dict = setting({}, environment)
    container_image: Optional[str] = setting(None, optional(text))
    container_mounts: list = setting([], list_of(without(",", "pyxis reads a comma as the start of another mount; "
                                                         "give each mount as its own list item")))
    launcher: str = setting("srun", one_of("srun", "torchrun"))
    requeue: bool = setting(True, boolean)
    signal_seconds: int = setting(120, integer(0))
    output_dir: str = setting("runs/slurm", path(without("%\\", "sbatch expands %-patterns in --output and reads "
                                                                "'\\' as an escape")))
    cpu: bool = setting(False, boolean)
    python: Optional[str] = setting(None, optional(text))
    command: Any = setting(None, command)  # None: `dsv3-train` (or `<python> -m megatron_dsv3.train`)
    setup: list = setting([], list_of(text))  # shell lines before the step (module load, source venv, ...)


SECTIONS = {"model": ModelSection, "parallel": ParallelSection, "train": TrainSection, "data": DataSection,
            "checkpoint": CheckpointSection, "logging": LoggingSection, "launch": LaunchSection}
MOVED = {"train.log_interval": "logging.interval"}


def _section(name: str, cls: type, given: Any) -> Any:
    if given is None:
        given = {}
    if not isinstance(given, dict):
        raise RunConfigError(f"{name} must be a mapping of keys, got {given!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in given:
        if key not in fields:
            hint = f" (moved to {MOVED[f'{name}.{key}']})" if f"{name}.{key}" in MOVED else ""
            raise RunConfigError(f"unknown config key {f'{name}.{key}'!r}{hint}; known keys here: "
                                 f"{', '.join(sorted(fields))}")
    # Defaults pass their checks too, so a resolved value (`~` expanded) is what every reader sees.
    values = {key: field.metadata["check"](f"{name}.{key}", given[key] if key in given else field.default)
              for key, field in fields.items() if key in given or field.default is not dataclasses.MISSING}
    return cls(**values)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    parallel: ParallelSection = dataclasses.field(default_factory=ParallelSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)
    launch: LaunchSection = dataclasses.field(default_factory=LaunchSection)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RunConfig":
        """Sections from a mapping (missing keys take their defaults), every value checked."""
        unknown = sorted(set(values) - set(SECTIONS))
        if unknown:
            raise RunConfigError(f"unknown config section(s) {', '.join(map(repr, unknown))}; sections: "
                                 f"{', '.join(SECTIONS)}")
        run = cls(**{name: _section(name, section, values.get(name)) for name, section in SECTIONS.items()})
        bound = SAVE_WAIT_FACTOR * run.parallel.timeout_s
        if run.checkpoint.save_timeout_s is None or run.checkpoint.save_timeout_s > bound:
            run = dataclasses.replace(run, checkpoint=dataclasses.replace(run.checkpoint, save_timeout_s=bound))
        run._check_across_sections()
        return run

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def model_config(self) -> DSV3Config:
        """The model: the preset, its overrides, and FP8 from `train.fp8` (the one switch for it)."""
        try:
            return DSV3Config.preset(self.model.preset, **self.model.overrides, fp8=self.train.fp8)
        except (ConfigError, TypeError) as error:
            raise RunConfigError(f"model: {error}") from None

    def _check_across_sections(self) -> None:
        train, parallel = self.train, self.parallel
        if train.min_lr > train.lr:
            raise RunConfigError(f"train.min_lr={train.min_lr:g} is above train.lr={train.lr:g}")
        if train.param_dtype == "bfloat16" and not train.bf16:
            raise RunConfigError("train.param_dtype=bfloat16 needs train.bf16=true (BF16 weights compute under "
                                 "BF16 autocast)")
        if train.param_dtype == "bfloat16" and parallel.distributed_optimizer is False:
            raise RunConfigError("train.param_dtype=bfloat16 keeps the FP32 master weights in Megatron's distributed "
                                 "optimizer, and parallel.distributed_optimizer is false")
        if train.eval_interval and not valid_weight(self.data.split):
            raise RunConfigError(f"train.eval_interval={train.eval_interval} evaluates on the validation split, and "
                                 f"data.split={self.data.split!r} gives it no weight (e.g. data.split=98,2,0)")
        if train.eval_interval and not registry.get("schedule", parallel.schedule).forward_only:
            evaluating = [name for name in registry.names("schedule") if registry.get("schedule", name).forward_only]
            raise RunConfigError(f"train.eval_interval={train.eval_interval} evaluates through the schedule's "
                                 f"forward-only pass, which parallel.schedule={parallel.schedule!r} does not have: "
                                 f"evaluate with {' or '.join(evaluating)}, or set train.eval_interval=0")
        if train.eval_interval and (self.data.valid_samples or math.inf) < train.eval_iters * train.global_batch_size:
            raise RunConfigError(f"data.valid_samples={self.data.valid_samples} is less than the train.eval_iters x "
                                 f"train.global_batch_size = {train.eval_iters * train.global_batch_size} samples one "
                                 "evaluation reads")
        model = self.model_config()
        if train.seq_length <= model.mtp_num_modules:
            raise RunConfigError(f"train.seq_length={train.seq_length} leaves the deepest of the model's "
                                 f"{model.mtp_num_modules} MTP modules no token to predict; it needs more tokens "
                                 "than MTP modules")
        if train.seq_length > model.max_position_embeddings:
            raise RunConfigError(f"train.seq_length={train.seq_length} is above the model's max_position_embeddings="
                                 f"{model.max_position_embeddings} (model.overrides.max_position_embeddings raises it)")


# ----------------------------------------------------------------------------- loading
VERBATIM_OVERRIDES = ("launch.time",)  # YAML 1.1 reads an unquoted 24:00:00 as the base-60 number 86400


def _apply_override(values: dict, item: str) -> dict:
    """`values` with the dotted override `item` applied: its key (and only its key) takes the value,
    whatever it was, so `model.overrides={}` clears the YAML's overrides and `train.steps=5` leaves
    the other `train` keys alone."""
    key, sep, raw = item.partition("=")
    keys = key.split(".")
    if not sep or len(keys) < 2 or not all(keys):
        raise RunConfigError(f"override {item!r} must look like section.key=value")
    if key in VERBATIM_OVERRIDES:
        value: Any = raw
    else:
        try:
            value = safe_data.load_yaml(raw, f"override {item!r}: the value") if raw != "" else None
        except safe_data.YAMLError as error:
            raise RunConfigError(str(error)) from None
    out = copy.deepcopy(values)
    node = out
    for depth, part in enumerate(keys[:-1]):
        if node.get(part) is None:
            node[part] = {}
        elif not isinstance(node[part], dict):
            raise RunConfigError(f"{'.'.join(keys[:depth + 1])} must be a mapping of keys, got {node[part]!r}")
        node = node[part]
    node[keys[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise RunConfigError(f"config file {path} does not exist")
    try:
        if file.stat().st_size > safe_data.MAX_BYTES:
            raise RunConfigError(f"config file {path} is {file.stat().st_size} bytes, above the "
                                 f"{safe_data.MAX_BYTES} a config may have")
        loaded = safe_data.load_yaml(file.read_text(), f"config file {path}") or {}
    except safe_data.YAMLError as error:
        raise RunConfigError(str(error)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise RunConfigError(f"config file {path} cannot be read: {error}") from None
    if not isinstance(loaded, dict):
        raise RunConfigError(f"config file {path} must hold a mapping of sections")
    return loaded


def load_run_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] = ()) -> RunConfig:
    """Defaults <- YAML file <- dotted overrides, every setting checked once."""
    values = read_yaml(path) if path is not None else {}
    for item in overrides:
        values = _apply_override(values, item)
    return RunConfig.from_dict(values)
