"""One fine-tuning run from a flat description (`RunConfig`): the engine behind `lorakit train` and `compare`.

load model and task -> score before -> attach the method (data-driven inits on the first training
batches) -> train -> score after -> save.  Defaults depend on the task, so that ``lorakit train`` with
no arguments is the main job: LoRA-SB on SmolLM2-135M-Instruct with the built-in arithmetic task.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import api
from ..core.registry import get_method
from ..errors import ConfigError
from ..models import load_model
from . import evaluate
from .data import Example, TaskSpec, collate, encode_causal_lm, encode_classification, load_task
from .trainer import TrainConfig, TrainResult, train

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
DEFAULT_LR = {FULL: 5e-5, "lora-sb": 1e-2, "lora-xs": 1e-2}


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
    init_samples: int = 16
    chat_template: bool | None = None
    group_by_length: bool = True
    dtype: str = "fp32"
    quantize: str | None = None  # load the base quantized: nf4, fp4, int8, torchao-int8, torchao-int4
    bf16: bool = False
    device: str = "auto"
    output_dir: str = "lorakit-runs/run"
    resume: bool = False

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
        out = dataclasses.replace(self, **changes)
        if out.steps < 1 or out.batch_size < 1:
            raise ConfigError(f"steps and batch_size must be positive, got {out.steps} and {out.batch_size}")
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
    try:
        return method.config_class(**options)
    except TypeError as err:
        known = [f.name for f in dataclasses.fields(method.config_class)]
        raise ConfigError(f"bad option for {run.method}: {err}; its options are {', '.join(known)}") from err


def encode(spec: TaskSpec, examples: list[Example], tokenizer: Any, run: RunConfig) -> list[dict[str, Any]]:
    if spec.type == "classification":
        return encode_classification(examples, tokenizer, run.max_length)
    return encode_causal_lm(examples, tokenizer, run.max_length, use_chat_template(run, tokenizer))


def use_chat_template(run: RunConfig, tokenizer: Any) -> bool:
    """Instruct models get their chat template on prompt-style tasks (``--chat-template`` overrides)."""
    if run.chat_template is not None:
        return run.chat_template
    return bool(getattr(tokenizer, "chat_template", None)) and run.task == "arith"


def score(model: nn.Module, tokenizer: Any, metric: str, examples: list[Example], features: list[dict],
          run: RunConfig) -> tuple[float, list[str]]:
    """The run's metric on the evaluation split, and a few sample completions (generation tasks)."""
    if metric == "accuracy":
        return evaluate.accuracy(model, features, batch_size=64), []
    if metric == "nll":
        return evaluate.answer_nll(model, features, batch_size=16), []
    return evaluate.exact_match(model, tokenizer, examples, max_new_tokens=run.max_new_tokens, batch_size=50,
                                chat_template=use_chat_template(run, tokenizer))


def prepare(run: RunConfig) -> tuple[nn.Module, Any, TaskSpec, list[dict], list[Example], list[dict]]:
    """Model, tokenizer, task spec, training features, evaluation examples and features."""
    spec, train_examples = load_task(run.task, "train", run.data_dir, seed=run.seed)
    _, eval_examples = load_task(run.task, run.eval_split, run.data_dir, seed=run.seed, limit=run.eval_limit)
    torch.manual_seed(run.seed)
    model, tokenizer = load_model(run.model, spec.type, num_labels=spec.num_labels, dtype=run.dtype,
                                  device=run.device, quantize=run.quantize)
    return (model, tokenizer, spec, encode(spec, train_examples, tokenizer, run), eval_examples,
            encode(spec, eval_examples, tokenizer, run))


def attach_method(model: nn.Module, run: RunConfig, spec: TaskSpec, features: list[dict], pad_id: int) -> None:
    """Attach the run's method; data-driven inits use the first ``init_samples`` training examples."""
    if run.method == FULL:
        model.requires_grad_(True)
        return
    config = method_config(run, spec, model)
    data = None
    if get_method(run.method).needs_data:
        device = next(model.parameters()).device
        head = features[: run.init_samples]
        data = [collate(head[i:i + run.batch_size], pad_id).to(device).inputs
                for i in range(0, len(head), run.batch_size)]
    api.attach(model, config, data=data)


def run_training(run: RunConfig) -> RunResult:
    """Do the whole run and write ``run.json`` (and the adapter) into ``run.output_dir``."""
    run = run.resolved()
    start = time.perf_counter()
    model, tokenizer, spec, features, eval_examples, eval_features = prepare(run)
    metric = run.metric or spec.metric
    before, _ = score(model, tokenizer, metric, eval_examples, eval_features, run)
    logger.info("%s before training: %.4f", metric, before)
    attach_method(model, run, spec, features, tokenizer.pad_token_id)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def eval_fn(m: nn.Module) -> float:
        return score(m, tokenizer, metric, eval_examples, eval_features, run)[0]

    out = Path(run.output_dir)
    config = TrainConfig(steps=run.steps, batch_size=run.batch_size, grad_accum=run.grad_accum, lr=run.lr,
                         weight_decay=run.weight_decay, warmup_steps=run.warmup_steps, schedule=run.schedule,
                         max_grad_norm=run.max_grad_norm, seed=run.seed, eval_every=run.eval_every,
                         output_dir=str(out), bf16=run.bf16, group_by_length=run.group_by_length,
                         resume=run.resume, save_adapter=run.method != FULL)
    result = train(model, features, config, eval_fn=eval_fn if run.eval_every else None,
                   pad_token_id=tokenizer.pad_token_id)
    after, samples = score(model, tokenizer, metric, eval_examples, eval_features, run)
    adapter_dir = str(out / "adapter") if run.method != FULL else None
    outcome = RunResult(dataclasses.asdict(run), metric, before, after, trainable, result, samples[:5],
                        time.perf_counter() - start, adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(outcome.summary(), indent=2) + "\n")
    return outcome
