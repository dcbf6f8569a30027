"""One fine-tuning run from a flat description (`RunConfig`): the engine behind `lorakit train` and `compare`.

load model and task -> score before -> attach the method (data-driven inits on the first training
batches) -> train -> score after -> save.  Defaults depend on the task, so that ``lorakit train`` with
no arguments is the main job: LoRA-SB on SmolLM2-135M-Instruct with the built-in arithmetic task.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import tempfile
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..config import check_value
from ..core.driver import data_init, init_batches
from ..core.files import check_writable_target, locked_dir, write_text
from ..core.registry import get_method
from ..errors import ConfigError, OutputError, TrainingError
from ..methods.lora_sb import INIT_SAMPLES, default_eta
from ..models import load_model
from . import evaluate
from .compiled import check_compile
from .config import SCHEDULES, TrainConfig
from .data import Example, TaskSpec, collate, encode_causal_lm, encode_classification, encode_conversations, load_task
from .state import find_checkpoint, read_checkpoint_meta
from .trainer import TrainResult, train

logger = logging.getLogger(__name__)

FULL = "full"  # full fine-tuning, the reference every comparison wants beside the adapters

# Per-task defaults (a flag or recipe value always wins).  Classification tasks train a head on the
# encoder, saved with the adapter (``modules_to_save``).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "arith": {"model": "smollm2-135m", "batch_size": 16, "max_length": 96, "steps": 60, "eval_limit": 100},
    "gsm8k": {"model": "smollm2-135m", "batch_size": 8, "max_length": 256, "steps": 30, "eval_limit": 64},
    "sst2": {"model": "minilm-l6", "batch_size": 32, "max_length": 64, "steps": 400, "eval_limit": None},
    "trec": {"model": "minilm-l6", "batch_size": 32, "max_length": 64, "steps": 400, "eval_limit": None},
}
GENERIC_DEFAULTS: dict[str, Any] = {"batch_size": 8, "max_length": 256, "steps": 100, "eval_limit": 200}
ENCODER_TARGETS = ("query", "key", "value", "dense")
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # LoRA-SB trains only r x r cores: the paper uses high ranks and a larger learning rate than LoRA.
    "lora-sb": {"r": 32},
    "lora-xs": {"r": 32},
}
# Per-method learning rates (else 1e-3), from the SST-2 dev sweep of benchmarks/quality.py (results/quality-sweep.md:
# MiniLM-L6, 200 steps, rates 0.3x / 1x / 3x): a method moves to its best swept rate when the old default was more than
# 1 point below it.  LoRA-SB's 1e-2 is the main job's (arith) setting and stays.
DEFAULT_LR = {FULL: 1.5e-4, "lora-sb": 1e-2, "lora-xs": 1e-2, "xgblora": 3e-3, "adalora": 3e-3, "lora2": 3e-3,
              "dora": 3e-3, "flat-lora": 3e-3, "lora-plus": 3e-4, "lora-rite": 3e-4}
DEFAULT_INIT_SAMPLES = 16  # examples behind a data-driven init (LoRA-GA), unless the method has official counts
SEED_MAX = 2**32 - 1  # numpy's and torch's generators all take seeds up to here

# The values a `RunConfig` field may take beyond its type (checked by `check_field`): one line per field.
CHOICES: dict[str, tuple[str, ...]] = {"schedule": SCHEDULES, "metric": ("exact_match", "accuracy", "nll"),
                                       "dtype": ("fp32", "bf16", "fp16"), "device": ("cpu", "cuda", "auto")}
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: v >= 1, "a positive integer"),
    "batch_size": (lambda v: v >= 1, "a positive integer"),
    "grad_accum": (lambda v: v >= 1, "a positive integer"),
    "lr": (lambda v: v > 0, "a positive finite number"),
    "weight_decay": (lambda v: v >= 0, "a finite number >= 0"),
    "warmup_steps": (lambda v: v >= 0, "an integer >= 0"),
    "max_grad_norm": (lambda v: v > 0, "a positive finite number (or null: no clipping)"),
    "max_length": (lambda v: v >= 2, "an integer >= 2 (tokens per example)"),
    "seed": (lambda v: 0 <= v <= SEED_MAX, f"an integer in [0, {SEED_MAX}]"),
    "eval_every": (lambda v: v >= 0, "an integer >= 0 (0: only before and after)"),
    "eval_limit": (lambda v: v >= 1, "a positive integer"),
    "max_new_tokens": (lambda v: v >= 1, "a positive integer"),
    "init_samples": (lambda v: v >= 1, "a positive integer"),
    "save_every": (lambda v: v >= 0, "an integer >= 0 (0: no checkpoints)"),
    "task": (lambda v: v.strip() != "", "a task name or a .jsonl/.csv path"),
    "output_dir": (lambda v: v.strip() != "", "a directory path"),
}


@dataclass
class RunConfig:
    """Everything a run needs; ``None`` means "the task's (or method's) default"."""

    model: str | None = None
    task: str = "arith"
    method: str = "lora-sb"
    method_options: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 5
    schedule: str = "linear"
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    seed: int = 0
    eval_every: int = 0
    eval_limit: int | None = None
    eval_split: str = "test"
    metric: str | None = None
    max_new_tokens: int = 32
    init_samples: int | None = None
    chat_template: bool | None = None
    group_by_length: bool = True
    dtype: str = "fp32"
    quantize: str | None = None  # load the base quantized: nf4, fp4, int8, torchao-int8, torchao-int4
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False
    packing: bool = False
    compile: bool = False  # the training forward under torch.compile (inductor; `lorakit.train.compiled`)
    device: str = "auto"
    output_dir: str = "lorakit-runs/run"
    save_every: int | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, check_field(f.name, getattr(self, f.name), f.name))

    def resolved(self) -> RunConfig:
        """A copy with every task default filled in."""
        defaults = TASK_DEFAULTS.get(self.task, GENERIC_DEFAULTS)
        changes = {k: defaults.get(k, GENERIC_DEFAULTS.get(k)) for k in ("model", "batch_size", "max_length",
                                                                        "steps", "eval_limit")
                   if getattr(self, k) is None}
        if changes.get("model") is None and self.model is None:
            raise ConfigError(f"task {self.task!r} has no default model: pass --model")
        if self.lr is None:
            changes["lr"] = DEFAULT_LR.get(self.method, 1e-3)
        if self.save_every is None:  # about ten checkpoints a run, and always one at the end
            changes["save_every"] = max(1, (self.steps or changes["steps"]) // 10)
        return dataclasses.replace(self, **changes)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_field(name: str, value: Any, where: str) -> Any:
    """``value`` for the `RunConfig` field ``name`` checked against its type, `CHOICES` and `RULES` (an int
    given for a float becomes a float); ``where`` names the value in the error (a flag, a recipe key)."""
    hint = _hints(RunConfig)[name]
    if isinstance(value, Path):  # model, data_dir, output_dir given as paths
        value = str(value)
    test, expected = RULES.get(name, (None, None))
    try:
        check_value(where, value, hint)
    except ConfigError:
        if expected is None:
            raise
        raise ConfigError(f"{where} must be {expected}, got {value!r}") from None
    if value is None:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and float in (*typing.get_args(hint), hint):
        value = float(value)
    if name in CHOICES and value not in CHOICES[name]:
        raise ConfigError(f"{where} must be one of {', '.join(CHOICES[name])}, got {value!r}")
    if test is not None and not test(value):
        raise ConfigError(f"{where} must be {expected}, got {value!r}")
    return value


def check_method_options(method: str, options: dict[str, Any], where: str = "method option") -> None:
    """Check a run's method options against the method's config class (names, types, the class's own
    checks), before any model is loaded; ``full`` fine-tuning takes none."""
    if method == FULL:
        if options:
            raise ConfigError(f"--method full trains every weight and takes no method options; got "
                              f"{', '.join(sorted(options))}")
        return
    config_class = get_method(method).config_class
    hints = _hints(config_class)
    for key, value in options.items():
        if key not in hints:
            raise ConfigError(f"{where} {key!r} is not an option of {method}; its options are "
                              f"{', '.join(f.name for f in dataclasses.fields(config_class))}")
        check_value(f"{where} {key}", value, hints[key])
    try:
        config_class(**{**METHOD_DEFAULTS.get(method, {}), **options})
    except TypeError as err:
        raise ConfigError(f"bad option for {method}: {err}") from err


def check_metric(metric: str | None, spec: TaskSpec) -> None:
    """Classification tasks are scored by accuracy; generation tasks by exact match or NLL."""
    if metric is not None and (metric == "accuracy") != (spec.type == "classification"):
        raise ConfigError(f"metric {metric!r} does not fit task {spec.name} ({spec.type}); use "
                          f"{'accuracy' if spec.type == 'classification' else 'exact_match or nll'}")


def check_output_dir(path: str | Path, where: str = "--output-dir") -> Path:
    """Create ``path`` if needed and make sure files can be written in it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{where} {out} is a file; expected a directory (existing or to be created)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ConfigError(f"{where} {out} is not a writable directory ({err.strerror or err}); pass one you "
                          "can write to") from None
    return out


@dataclass
class RunResult:
    config: dict[str, Any]
    metric: str
    score_before: float
    score_after: float
    trainable_params: int
    train: TrainResult
    samples: list[str]
    seconds: float
    adapter_dir: str | None

    def summary(self) -> dict[str, Any]:
        return {"config": self.config, "metric": self.metric, "score_before": self.score_before,
                "score_after": self.score_after, "trainable_params": self.trainable_params,
                "seconds": self.seconds, "adapter_dir": self.adapter_dir, "samples": self.samples,
                "train": self.train.summary()}


def method_config(run: RunConfig, spec: TaskSpec, model: nn.Module) -> Any:
    """The method's config from the run: method defaults, then the model's usual targets, then options."""
    method = get_method(run.method)
    options: dict[str, Any] = {**METHOD_DEFAULTS.get(run.method, {}), "seed": run.seed}
    if spec.type == "classification":
        options.update(target_modules=ENCODER_TARGETS, modules_to_save=("classifier",))
    options.update(run.method_options)
    if run.method == "lora-sb" and options.get("init_lr") is None:  # the official η of the task's type
        options["init_lr"] = default_eta(spec.type)
    try:
        return method.config_class(**options)
    except TypeError as err:
        known = [f.name for f in dataclasses.fields(method.config_class)]
        raise ConfigError(f"bad option for {run.method}: {err}; its options are {', '.join(known)}") from err


def encode(spec: TaskSpec, examples: list[Example], tokenizer: Any, run: RunConfig,
           evaluation: bool = False) -> list[dict[str, Any]]:
    """The task's features; a conversation is supervised on every assistant turn, for ``evaluation`` (answer NLL)
    on its final one."""
    if spec.type == "classification":
        return encode_classification(examples, tokenizer, run.max_length)
    if spec.conversational:
        return encode_conversations(examples, tokenizer, run.max_length, use_chat_template(run, tokenizer, True),
                                    final_turn_only=evaluation)
    return encode_causal_lm(examples, tokenizer, run.max_length, use_chat_template(run, tokenizer))


def use_chat_template(run: RunConfig, tokenizer: Any, conversational: bool = False) -> bool:
    """Instruct models get their chat template on prompt-style tasks, conversations always (``--chat-template``
    overrides; ``--no-chat-template`` gives conversations lorakit's plain format)."""
    if run.chat_template is not None:
        return run.chat_template
    return conversational or (bool(getattr(tokenizer, "chat_template", None)) and run.task == "arith")


def score(model: nn.Module, tokenizer: Any, metric: str, examples: list[Example], features: list[dict],
          run: RunConfig) -> tuple[float, list[str]]:
    """The run's metric on the evaluation split, and a few sample completions (generation tasks)."""
    if metric == "accuracy":
        return evaluate.accuracy(model, features, batch_size=64), []
    if metric == "nll":
        return evaluate.answer_nll(model, features, batch_size=16), []
    conversational = bool(examples) and examples[0].messages is not None
    return evaluate.exact_match(model, tokenizer, examples, max_new_tokens=run.max_new_tokens, batch_size=50,
                                chat_template=use_chat_template(run, tokenizer, conversational))


def prepare(run: RunConfig) -> tuple[nn.Module, Any, TaskSpec, list[dict], list[Example], list[dict]]:
    """Model, tokenizer, task spec, training features, evaluation examples and features."""
    spec, train_examples = load_task(run.task, "train", run.data_dir, seed=run.seed)
    eval_spec, eval_examples = load_task(run.task, run.eval_split, run.data_dir, seed=run.seed,
                                         limit=run.eval_limit)
    if spec.num_labels is not None and (eval_spec.num_labels or 0) > spec.num_labels:
        raise ConfigError(f"task {run.task}: the {run.eval_split} split has labels up to {eval_spec.num_labels - 1}"
                          f" but the train split only 0..{spec.num_labels - 1}; every class must occur in training")
    check_metric(run.metric, spec)
    torch.manual_seed(run.seed)
    model, tokenizer = load_model(run.model, spec.type, num_labels=spec.num_labels, dtype=run.dtype,
                                  device=run.device, quantize=run.quantize)
    return (model, tokenizer, spec, encode(spec, train_examples, tokenizer, run), eval_examples,
            encode(spec, eval_examples, tokenizer, run, evaluation=True))


def attach_method(model: nn.Module, run: RunConfig, spec: TaskSpec, features: list[dict], pad_id: int) -> None:
    """Attach the run's method; data-driven inits use the first ``init_samples`` training examples."""
    if run.method == FULL:
        model.requires_grad_(True)
        return
    config = method_config(run, spec, model)
    needs_data = get_method(run.method).needs_data
    api.attach(model, config, initialize=not needs_data)
    if needs_data:
        device = next(model.parameters()).device
        data_init(model, init_batches(features, init_samples(run, spec), run.batch_size,
                                      lambda chunk: collate(chunk, pad_id).to(device).inputs))


def init_samples(run: RunConfig, spec: TaskSpec) -> int:
    """``--init-samples``, else LoRA-SB's official count for the task's type (`INIT_SAMPLES`), else 16."""
    if run.init_samples is not None:
        return run.init_samples
    return INIT_SAMPLES[spec.type] if run.method == "lora-sb" else DEFAULT_INIT_SAMPLES


def run_training(run: RunConfig, on_eval: Callable[[dict[str, float]], None] | None = None) -> RunResult:
    """Do the whole run and write ``run.json`` (and the adapter) into ``run.output_dir``; ``on_eval`` receives each
    intermediate evaluation (``{"step": s, "score": x}``, every ``eval_every`` steps), as `train` says."""
    run = run.resolved()
    if run.method != FULL:  # `compare` hands full fine-tuning the adapters' shared options
        check_method_options(run.method, run.method_options)
    check_compile(run.method if run.method != FULL else None, run.compile)  # refused before the model loads
    out = check_output_dir(run.output_dir)
    # one run per output directory (`compare` and the benchmarks' sweeps call this too); other torchrun ranks only read
    with locked_dir(out) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext():
        return _run_locked(run, out, on_eval)


def _run_locked(run: RunConfig, out: Path, on_eval: Callable[[dict[str, float]], None] | None) -> RunResult:
    for name in ("run.json", "log.jsonl"):  # a FIFO, device or directory where a result goes: refused before training
        check_writable_target(out / name)
    if run.resume and (checkpoint := find_checkpoint(out)) is not None:
        read_checkpoint_meta(checkpoint)  # a corrupt checkpoint fails here, before the model is loaded
    start = time.perf_counter()
    model, tokenizer, spec, features, eval_examples, eval_features = prepare(run)
    metric = run.metric or spec.metric
    before, _ = score(model, tokenizer, metric, eval_examples, eval_features, run)
    logger.info("%s before training: %.4f", metric, before)
    attach_method(model, run, spec, features, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def eval_fn(m: nn.Module) -> float:
        return score(m, tokenizer, metric, eval_examples, eval_features, run)[0]

    config = TrainConfig(steps=run.steps, batch_size=run.batch_size, grad_accum=run.grad_accum, lr=run.lr,
                         weight_decay=run.weight_decay, warmup_steps=run.warmup_steps, schedule=run.schedule,
                         max_grad_norm=run.max_grad_norm, seed=run.seed, eval_every=run.eval_every,
                         output_dir=str(out), save_every=run.save_every, bf16=run.bf16,
                         group_by_length=run.group_by_length, resume=run.resume, save_adapter=run.method != FULL,
                         gradient_checkpointing=run.gradient_checkpointing, fsdp=run.fsdp, packing=run.packing,
                         max_length=run.max_length if run.packing else None, compile=run.compile)
    result = train(model, features, config, eval_fn=eval_fn if run.eval_every else None,
                   pad_token_id=tokenizer.pad_token_id, on_eval=on_eval)
    if run.compile:  # `compare` trains several models in one process: each would count against torch's recompile limit
        torch.compiler.reset()
    after, samples = score(model, tokenizer, metric, eval_examples, eval_features, run)
    adapter_dir = str(out / "adapter") if run.method != FULL else None
    outcome = RunResult(dataclasses.asdict(run), metric, before, after, trainable, result, samples[:5],
                        time.perf_counter() - start, adapter_dir)
    try:
        write_text(out / "run.json", json.dumps(outcome.summary(), indent=2) + "\n")
    except OutputError as err:
        raise TrainingError(f"{err}; the adapter is saved in {adapter_dir}: rerun with --resume to write "
                            "run.json") from None
    return outcome
