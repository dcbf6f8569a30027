"""The lorakit training loop, readable in one sitting (in the spirit of nanoGPT's ``train.py``).

`train` runs ``config.steps`` optimizer steps on a model with a lorakit adapter attached (with none
attached, on whatever parameters require grad: full fine-tuning) and calls the method's training
hooks exactly where `lorakit.core.hooks` says::

    hooks.on_train_begin(steps)
    every step:  hooks.before_forward(step)
                 for each of grad_accum micro-batches: (task loss + hooks.regularizer()).backward()
                     (`lorakit.core.driver.step_loss`: hooks.after_forward(batch, loss, logits) in between)
                 hooks.after_loss(step, the step's task loss)
                 [under torchrun: gradients summed across ranks, see `_Distributed`]
                 clip; hooks.after_backward(step); set this step's lr; optimizer.step()
                 hooks.after_step(step); optimizer.zero_grad()
                 a fresh optimizer if hooks.optimizer_reset_requested (`lorakit.core.driver.reset_optimizer`)
                 log, evaluate, checkpoint

Checkpoints (``output_dir/checkpoint``: safetensors + JSON, never pickle) hold the adapter, the
optimizer state, the step, the RNG states, the batcher position and the hooks' counters; the whole
directory is written beside the old one, flushed to disk (fsync) and swapped in (`lorakit.core.checkpoint`),
so ``resume=True`` always finds a complete checkpoint and continues bit for bit (on CPU) as if the run had
never stopped; a write that fails (disk full) is a `TrainingError` that leaves the last checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..api import STATE_ATTR, AdapterState
from ..core.checkpoint import find_latest, write_atomically
from ..core.driver import build_optimizer, load_adapter_tensors, reset_optimizer, step_loss, trainable
from ..core.hooks import TrainingHooks
from ..errors import AdapterFileError, ConfigError, TrainingError
from ..io.persistence import (
    _atomic_write,
    adapter_tensors,
    read_adapter_tensors,
    save,
)
from . import data
from .data import IGNORE_INDEX, Batch

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ADAPTER_DIR = "adapter"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
LOG_FILE = "log.jsonl"
STATE_VERSION = 1
SCHEDULES = ("linear", "cosine", "constant")
# A resumed run must draw the same batches: these fields may not change between the two runs; changing the
# others (but the free ones, which do not touch the trajectory) makes it differ from an uninterrupted run.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed", "group_by_length")
_RESUME_FREE = ("resume", "stop_after", "progress", "output_dir", "log_every", "eval_every", "save_every",
                "save_adapter", "gradient_checkpointing", "fsdp")
# What every trainer_state.json holds.
_STATE_KEYS = ("step", "batches_drawn", "world_size", "config", "optimizer", "hooks", "trainable", "progress")

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
EvalFn = Callable[[nn.Module], float | Mapping[str, float]]


@dataclass
class TrainConfig:
    """How to train.  ``batch_size`` is the global micro-batch (split across ranks under torchrun);
    one optimizer step sees ``batch_size * grad_accum`` examples.

    warmup: ``warmup_steps``, or ``warmup_ratio`` of ``steps`` (not both); linear warmup, then the
    ``schedule`` decays to 0.  ``max_grad_norm=None`` disables clipping.  ``eval_every``/``log_every``/
    ``save_every`` count optimizer steps (0 = never; with ``save_every`` the last step is saved too).
    ``bf16``: autocast the forward to bfloat16.  ``save_adapter``: write ``output_dir/adapter`` at the end.
    ``stop_after``: end this run after that many steps as if it were killed there (no final save), to
    test and demonstrate ``resume``.  ``gradient_checkpointing``: recompute each transformers decoder layer's
    activations in backward (non-reentrant ``torch.utils.checkpoint``) instead of keeping them; same gradients.
    ``fsdp``: under torchrun, shard the frozen base weights across ranks with FSDP2 (see `shard_frozen_base`).
    """

    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = 1.0
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    save_every: int = 0
    output_dir: str | None = None
    bf16: bool = False
    group_by_length: bool = True
    resume: bool = False
    save_adapter: bool = True
    stop_after: int | None = None
    progress: bool = True
    gradient_checkpointing: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "log_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 turns it off), got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ConfigError(f"lr must be positive and weight_decay >= 0, got {self.lr} and {self.weight_decay}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError("give warmup_steps or warmup_ratio, not both")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ConfigError(f"max_grad_norm must be positive or None (no clipping), got {self.max_grad_norm}")
        if (self.save_every or self.resume) and not self.output_dir:
            raise ConfigError("save_every and resume need an output_dir for the checkpoint")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"stop_after must be a positive step count or None, got {self.stop_after}")

    @property
    def warmup(self) -> int:
        return self.warmup_steps or round(self.warmup_ratio * self.steps)


def lr_factor(step: int, config: TrainConfig) -> float:
    """The multiplier of every group's base lr at (0-based) ``step``: linear warmup, then the schedule."""
    warmup = config.warmup
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, config.steps - warmup)
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


@dataclass
class TrainResult:
    """What a run did.  ``losses[i]`` is the training loss of step ``i + 1`` (the task loss, averaged over
    the step's micro-batches); ``evals`` holds ``{"step": s, "score": x}`` (or the eval function's keys)."""

    losses: list[float]
    evals: list[dict[str, float]]
    seconds: float
    peak_memory_mib: float
    tokens_per_second: float
    padded_tokens_per_second: float
    trainable_params: int
    steps: int
    adapter_dir: str | None = None

    def steps_to_reach(self, target: float, window: int = 10) -> int | None:
        """First step at which the mean of the last ``window`` losses is at or below ``target``."""
        for i in range(len(self.losses)):
            recent = self.losses[max(0, i - window + 1): i + 1]
            if sum(recent) / len(recent) <= target:
                return i + 1
        return None

    def summary(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- pieces


class _Batches:
    """`data.batches`' order (same seed, same epochs) as index lists, resumable from a count."""

    def __init__(self, features: Sequence[Mapping[str, Any]], batch_size: int, seed: int, group_by_length: bool):
        if not features:
            raise TrainingError("no training features: the data set is empty after encoding")
        self.n, self.batch_size = len(features), batch_size
        self.lengths = [len(f["input_ids"]) for f in features] if group_by_length else None
        self.rng = random.Random(seed)
        self.order: list[list[int]] = []
        self.position = 0
        self.epoch = -1
        self.drawn = 0

    def next(self) -> list[int]:
        if self.position == len(self.order):
            epoch_seed = self.rng.getrandbits(64)
            self.order = (data.length_grouped_batches(self.lengths, self.batch_size, epoch_seed) if self.lengths
                          else data.random_batches(self.n, self.batch_size, epoch_seed))
            self.position, self.epoch = 0, self.epoch + 1
        self.position += 1
        self.drawn += 1
        return self.order[self.position - 1]


def _targets(feature: Mapping[str, Any]) -> int:
    """How many terms the example adds to the mean loss: supervised next tokens, or 1 for a class label."""
    labels = feature.get("labels")
    if isinstance(labels, list):
        return sum(1 for t in labels[1:] if t != IGNORE_INDEX)
    return 1


class _Distributed:
    """torchrun data parallelism: rank, world size and the two all-reduces of a step."""

    def __init__(self, device: torch.device):
        self.created = False
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.created = True
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.device = device

    def sum_(self, tensor: Tensor) -> None:
        if self.active:
            dist.all_reduce(tensor)

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum gradients over ranks, one flat buffer per dtype; a param that no rank touched keeps ``None``."""
        touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        self.sum_(touched)
        live = [p for p, t in zip(params, touched.tolist()) if t > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for dtype in {p.dtype for p in live}:
            group = [p for p in live if p.dtype == dtype]
            flat = torch.cat([p.grad.reshape(-1) for p in group])
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                p.grad.copy_(flat[offset: offset + p.numel()].view_as(p.grad))
                offset += p.numel()

    def gather(self, value: Any) -> list[Any]:
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()


def enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Turn on transformers' activation checkpointing of ``model`` (non-reentrant, RNG state preserved, so dropout
    draws the same masks in the recomputation); returns the function that restores the previous setting."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5; older: gradient_...
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if not (supported and hasattr(model, "gradient_checkpointing_enable")):
        raise ConfigError(f"gradient_checkpointing=True needs a transformers model that supports it; "
                          f"{type(model).__name__} does not (checkpoint its blocks in its own forward instead)")
    was_on = (model.is_activation_checkpointing if enable is not None else model.is_gradient_checkpointing)
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"))
    kwargs = {"use_reentrant": False}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def restore() -> None:
        if was_on:
            return
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if not had_input_hooks:
            model.disable_input_require_grads()

    return restore


def shard_frozen_base(model: nn.Module, device: torch.device) -> None:
    """FSDP2 (``fully_shard``) over the torchrun ranks: each transformers block (``_no_split_modules``), the decoder,
    the output head and the rest are units whose frozen weights each rank holds 1/world of and all-gathers for its
    forward and backward.

    The adapter (every parameter of an adapter layer but its base, and every trainable parameter) is left out of
    the sharding (``ignored_params``): it is small, every rank keeps the whole of it, and `_Distributed.sum_grads`
    sums its gradients as under plain data parallelism, so hooks, optimizer, checkpoints and `save` see ordinary
    tensors and the run matches a single-process one.  What the base weights gain is 1/world of their memory.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    state: AdapterState | None = getattr(model, STATE_ATTR, None)
    kept = {p for p in model.parameters() if p.requires_grad}
    if state is not None:
        kept |= {p for layer in state.layers.values() for n, p in layer.named_parameters() if not n.startswith("base.")}
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if m is not model and type(m).__name__ in block_names]
    # The decoder and the output head are units of their own: `model_loss` calls them one after the other.
    decoder = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is not model:
        units.append(decoder)
    if head is not None:
        tied = any(head.weight is p for p in decoder.parameters()) if decoder is not model else False
        if tied:
            kept.add(head.weight)  # shared with the input embedding: kept whole on every rank
        else:
            units.append(head)
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=kept)
    # The root is a unit only if weights remain: a root unit must run first, and `model_loss` never calls it.
    if any(p not in kept and not isinstance(p, DTensor) for p in model.parameters()):
        fully_shard(model, mesh=mesh, ignored_params=kept)


def _peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _summary_writer(directory: Path) -> Any:
    """A TensorBoard writer if the ``tensorboard`` package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(directory / "tensorboard"))


def _progress_bar(total: int, initial: int) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as tensors ``optimizer.{param}.{key}`` plus JSON for everything else.

    The strides of non-contiguous state (e.g. QR factors) are kept too: a matmul on another memory layout
    can round differently, and a resumed run must repeat the uninterrupted one bit for bit.
    """
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    strides: dict[str, list[int]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                name = f"optimizer.{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                if not value.is_contiguous():
                    strides[name] = list(value.stride())
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"], "strides": strides}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in meta["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            if name in meta["strides"]:
                tensor = torch.empty_strided(tensor.shape, meta["strides"][name], dtype=tensor.dtype).copy_(tensor)
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint in ``out``: ``checkpoint/``, or the previous one if a swap was interrupted."""
    return find_latest(out, CHECKPOINT_DIR, STATE_JSON)


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked (format, version, keys) so that a corrupt one is one clear
    error, before any model is built."""
    path = directory / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise AdapterFileError(f"the checkpoint file {path} is corrupt ({type(err).__name__}: {err}); delete "
                               f"{directory} to start over, or pass another output directory") from None
    if not isinstance(meta, dict) or meta.get("format") != "lorakit-trainer" \
            or not isinstance(meta.get("version"), int) or meta["version"] > STATE_VERSION:
        found = meta if not isinstance(meta, dict) else (meta.get("format"), meta.get("version"))
        raise AdapterFileError(f"{path} is not a lorakit trainer state this version reads (expected format "
                               f"'lorakit-trainer', version <= {STATE_VERSION}; found {found!r}); delete it or "
                               "upgrade lorakit")
    missing = [k for k in _STATE_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict) or not isinstance(meta["progress"], dict):
        raise AdapterFileError(f"{path} is incomplete or damaged (missing {missing or 'valid config/progress'}); "
                               f"delete {directory} to start over")
    return meta


# ---------------------------------------------------------------------------------------------- the run


@dataclass
class _Progress:
    """Everything about the run so far that a checkpoint must carry besides tensors."""

    step: int = 0
    losses: list[float] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    real_tokens: int = 0
    padded_tokens: int = 0
    train_seconds: float = 0.0

    def add(self, stats: _StepStats) -> None:
        self.step += 1
        self.losses.append(stats.loss)
        self.real_tokens += stats.real
        self.padded_tokens += stats.padded
        self.train_seconds += stats.seconds


class _StepStats(NamedTuple):
    loss: float  # task loss, mean over the step's micro-batches (and ranks)
    regularizer: float | None
    grad_norm: float  # before clipping
    real: int  # tokens without padding
    padded: int  # tokens with padding (what the model computed)
    seconds: float


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a ``log.jsonl``; a line that is not a JSON object (a torn tail after a crash, power loss
    or a full disk) is dropped with a warning."""
    records, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        try:
            record = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, RecursionError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif line.strip():
            torn.append(number)
    if torn:
        logger.warning("%s: dropped %d unreadable line(s) (%s), e.g. a record torn by a crash", path, len(torn),
                       ", ".join(map(str, torn[:5])))
    return records


class _Log:
    """Where a run reports: ``log.jsonl`` and TensorBoard (with an output directory), a progress bar (tqdm if
    installed) or else a logging line every ``log_every`` steps.  Silent on ranks other than 0."""

    def __init__(self, out: Path | None, config: TrainConfig, start_step: int, main: bool):
        self.config, self.main = config, main
        self.jsonl = self.tb = self.bar = None
        if out is not None and main:
            out.mkdir(parents=True, exist_ok=True)
            self.jsonl = out / LOG_FILE
            if config.resume and self.jsonl.exists():  # records written after the checkpoint will be replayed
                kept = [json.dumps(r) for r in read_log(self.jsonl) if r.get("step", 0) <= start_step]
                _atomic_write(self.jsonl, lambda p: Path(p).write_text("".join(line + "\n" for line in kept)))
            elif self.jsonl.exists():
                self.jsonl.unlink()
            self.tb = _summary_writer(out)
        if config.progress and main:
            self.bar = _progress_bar(config.steps, start_step)
        self.window_start, self.window_real, self.window_padded = time.perf_counter(), 0, 0

    def step(self, step: int, stats: _StepStats, lr: float, extra: dict[str, float]) -> None:
        self.window_real += stats.real
        self.window_padded += stats.padded
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{stats.loss:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{stats.real / max(stats.seconds, 1e-9):.0f}")
        if not self.config.log_every or (step % self.config.log_every and step != self.config.steps):
            return
        seconds = max(time.perf_counter() - self.window_start, 1e-9)
        record = {"type": "train", "step": step, "loss": stats.loss, "lr": lr, "grad_norm": stats.grad_norm,
                  "tokens_per_s": self.window_real / seconds, "padded_tokens_per_s": self.window_padded / seconds,
                  **({"regularizer": stats.regularizer} if stats.regularizer is not None else {}), **extra}
        self.write(record)
        if self.bar is None and self.main:
            logger.info("step %d/%d  loss %.4f  lr %.3g  %.0f tokens/s (%.0f padded)", step, self.config.steps,
                        stats.loss, lr, record["tokens_per_s"], record["padded_tokens_per_s"])
        self.window_start, self.window_real, self.window_padded = time.perf_counter(), 0, 0

    def write(self, record: dict[str, Any]) -> None:
        if self.jsonl is not None:
            try:
                with open(self.jsonl, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as err:
                raise TrainingError(f"could not append to {self.jsonl} ({err}); the checkpoints are unaffected: "
                                    "free disk space and rerun with resume") from None
        if self.tb is not None:
            for key, value in record.items():
                if key not in ("type", "step") and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{record['type']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


def train(model: nn.Module, train_features: Sequence[Mapping[str, Any]], config: TrainConfig,
          eval_fn: EvalFn | None = None, *, pad_token_id: int | None = None,
          collate: Callable[[list[Mapping[str, Any]]], Batch] | None = None,
          loss_fn: LossFn | None = None) -> TrainResult:
    """Train ``model`` on ``train_features`` (encoded examples, as `lorakit.train.data` makes them).

    Batches come from the seeded batcher (length-grouped unless ``config.group_by_length`` is False)
    and ``collate`` (default: `data.collate` padding with ``pad_token_id``, itself defaulting to the
    model config's pad token).  ``loss_fn(model, inputs)`` defaults to `lorakit.core.loss.model_loss`,
    i.e. ``model(**inputs).loss``.  ``eval_fn(model)`` (in eval mode, no grad needed) returns a score or
    a dict of scores, every ``config.eval_every`` steps.  Runs on the model's device; under torchrun
    (``WORLD_SIZE`` > 1) each rank trains its share of every batch; only rank 0 writes files.
    Raises `TrainingError` at the first non-finite loss or gradient, leaving the last checkpoint intact.
    """
    device = next(model.parameters()).device
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("bf16=True but this GPU has no bfloat16 support; set bf16=False")
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    ddp = _Distributed(device)
    try:
        return _Run(model, train_features, config, eval_fn, collate or functools.partial(
            data.collate, pad_token_id=pad_token_id), loss_fn, ddp).run()
    finally:
        ddp.close()


class _Run:
    """One call of `train`: the loop in `run`, the checkpoint in `save_checkpoint` / `resume`."""

    def __init__(self, model: nn.Module, features: Sequence[Mapping[str, Any]], config: TrainConfig,
                 eval_fn: EvalFn | None, collate: Callable[[list[Mapping[str, Any]]], Batch], loss_fn: LossFn | None,
                 ddp: _Distributed):
        self.model, self.features, self.config = model, features, config
        self.eval_fn, self.collate, self.loss_fn, self.ddp = eval_fn, collate, loss_fn, ddp
        self.device = next(model.parameters()).device
        if config.batch_size < ddp.world:
            raise ConfigError(f"batch_size={config.batch_size} is smaller than the {ddp.world} ranks: every rank "
                              "needs a share of each batch")
        self.adapter: AdapterState | None = getattr(model, STATE_ATTR, None)
        if self.adapter is None:
            logger.info("no lorakit adapter attached: training every parameter that requires grad")
            self.hooks = TrainingHooks(model, {}, None)  # type: ignore[arg-type]
        else:
            self.hooks = self.adapter.hooks
        self.out = Path(config.output_dir) if config.output_dir else None
        self.is_main = ddp.rank == 0
        if config.fsdp:
            if not ddp.active:
                raise ConfigError("fsdp=True shards the model across torchrun ranks: launch with torchrun "
                                  "--nproc_per_node N (N >= 2), or train without fsdp")
            if any(isinstance(p, DTensor) for p in model.parameters()):
                raise ConfigError("fsdp=True: the model is already sharded; give train() the unsharded model with "
                                  "its adapter attached, and it shards the frozen base weights itself")
            shard_frozen_base(model, self.device)
        self.batches = _Batches(features, config.batch_size, config.seed, config.group_by_length)
        self.progress = _Progress()
        self.warned_hook_state = False

    # -- the loop --------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        config, model = self.config, self.model
        torch.manual_seed(config.seed)
        self.hooks.on_train_begin(config.steps)
        self.optimizer = self.build_optimizer()
        if config.resume:
            self.resume()
        self.check_ranks_agree()
        trainable_params = sum(p.numel() for p in self.trainable())
        restore_checkpointing = enable_gradient_checkpointing(model) if config.gradient_checkpointing else None
        self.log = _Log(self.out, config, self.progress.step, self.is_main)
        was_training = model.training
        model.train()
        start = time.perf_counter()
        try:
            while self.progress.step < config.steps:
                stats = self.train_step(self.progress.step)
                p = self.progress
                p.add(stats)
                self.log.step(p.step, stats, self.lr(), {"epoch": self.batches.epoch, **self.hooks.metrics()})
                if self.eval_fn is not None and config.eval_every and p.step % config.eval_every == 0:
                    self.evaluate()
                if config.save_every and (p.step % config.save_every == 0 or p.step == config.steps):
                    self.save_checkpoint()
                if config.stop_after is not None and config.stop_after <= p.step < config.steps:
                    logger.info("stop_after=%d: stopping at step %d", config.stop_after, p.step)
                    break
        finally:
            model.train(was_training)
            if restore_checkpointing is not None:
                restore_checkpointing()
            self.log.close()
        p = self.progress
        adapter_dir = None
        if p.step >= config.steps and self.out is not None and self.adapter is not None and config.save_adapter \
                and self.is_main:
            try:
                adapter_dir = str(save(model, self.out / ADAPTER_DIR))
            except (OSError, SafetensorError) as err:
                raise TrainingError(f"could not write the adapter to {self.out / ADAPTER_DIR} ({err}); free disk "
                                    f"space and resume. {self.checkpoint_note()}") from None
        return TrainResult(
            losses=list(p.losses), evals=list(p.evals), seconds=time.perf_counter() - start,
            peak_memory_mib=_peak_memory_mib(self.device),
            tokens_per_second=p.real_tokens / max(p.train_seconds, 1e-9),
            padded_tokens_per_second=p.padded_tokens / max(p.train_seconds, 1e-9),
            trainable_params=trainable_params, steps=p.step, adapter_dir=adapter_dir)

    def train_step(self, step: int) -> _StepStats:
        """One optimizer step (0-based ``step``) over ``grad_accum`` micro-batches."""
        config, hooks, ddp = self.config, self.hooks, self.ddp
        start = time.perf_counter()
        hooks.before_forward(step)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # task loss, regularizer, real, padded
        has_reg = False
        for _ in range(config.grad_accum):
            indices = self.batches.next()
            shard = indices[ddp.rank::ddp.world]
            idle = not shard  # a short last batch of an epoch has fewer examples than there are ranks
            if idle and not config.fsdp:
                continue
            if idle:  # under FSDP every rank must run the forward and backward (their all-gathers): to no effect
                shard = indices[:1]
            # Weight each rank's mean loss by its share of the batch's loss terms: summed over ranks this is
            # exactly the single-process mean; divided by grad_accum, the step's loss is the micro-batch mean.
            everyone = sum(_targets(self.features[i]) for i in indices)
            mine = sum(_targets(self.features[i]) for i in shard)
            weight = 0.0 if idle else (mine / everyone if everyone else len(shard) / len(indices)) / config.grad_accum
            batch = self.collate([self.features[i] for i in shard]).to(self.device)
            task, reg = step_loss(self.model, batch.inputs, hooks, self.loss_fn,
                                  torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16))
            loss = task if reg is None else task + reg
            (loss * weight).backward()
            totals[0] += task.detach().double() * weight
            if reg is not None:
                has_reg = True
                totals[1] += reg.detach().double() * weight
            if not idle:
                totals[2] += batch.real_tokens
                totals[3] += batch.padded_tokens if "input_ids" in batch.inputs else batch.real_tokens
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        ddp.sum_(totals)
        task_loss, reg_value, real, padded = totals.tolist()
        if not math.isfinite(task_loss + reg_value):
            raise TrainingError(f"the training loss is {task_loss + reg_value} at step {step + 1}; stopped before "
                                f"the optimizer step. {self.checkpoint_note()} Lower the lr, enable clipping "
                                "(max_grad_norm) or check the data.")
        hooks.after_loss(step, task_loss)
        if ddp.active:
            ddp.sum_grads(params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))
        if not math.isfinite(grad_norm):
            raise TrainingError(f"the gradient norm is {grad_norm} at step {step + 1}; stopped before the optimizer "
                                f"step. {self.checkpoint_note()} Lower the lr or check the data.")
        hooks.after_backward(step)
        factor = lr_factor(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        self.optimizer.step()
        hooks.after_step(step)
        self.optimizer.zero_grad(set_to_none=True)
        if hooks.optimizer_reset_requested:
            reset_optimizer(self.model, hooks, self.optimizer, self.config.lr, self.config.weight_decay)
        return _StepStats(task_loss, reg_value if has_reg else None, grad_norm, int(real), int(padded),
                          time.perf_counter() - start)

    # -- helpers -----------------------------------------------------------------------------------------
    def trainable(self) -> list[nn.Parameter]:
        return trainable(self.model)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.model, self.hooks, self.config.lr, self.config.weight_decay)

    def check_ranks_agree(self) -> None:
        """Under torchrun every rank must start from the same adapter (same seeds and init data)."""
        if not self.ddp.active:
            return
        tensors = adapter_tensors(self.model).values() if self.adapter is not None else self.trainable()
        checksum = float(sum(t.detach().double().sum() for t in tensors))
        if len(set(self.ddp.gather(checksum))) > 1:
            raise TrainingError("the ranks start from different adapters: build the model and attach the adapter "
                                "identically on every rank (same seed, same init data)")

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def evaluate(self) -> None:
        """Run ``eval_fn`` (rank 0; every rank under fsdp, whose forward needs them all) without disturbing the
        training RNG stream."""
        if not self.is_main and not self.config.fsdp:
            return
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            result = self.eval_fn(self.model)
        self.model.train()
        if not self.is_main:
            return
        scores = dict(result) if isinstance(result, Mapping) else {"score": float(result)}
        record = {"step": self.progress.step, **scores}
        self.progress.evals.append(record)
        self.log.write({"type": "eval", **record})
        logger.info("eval at step %d: %s", self.progress.step, scores)

    # -- checkpoints ---------------------------------------------------------------------------------------
    def checkpoint_dir(self) -> Path | None:
        assert self.out is not None
        return find_checkpoint(self.out)

    def checkpoint_note(self) -> str:
        directory = None if self.out is None else self.checkpoint_dir()
        if directory is None:
            return "No checkpoint was written."
        try:
            step = json.loads((directory / STATE_JSON).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"The last checkpoint is in {directory}."
        return f"The last good checkpoint (step {step}) in {directory} is intact."

    def save_checkpoint(self) -> None:
        """Write the checkpoint into a fresh directory, then swap it in (rank 0; all ranks send RNG states)."""
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        all_rng = self.ddp.gather(rng)
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable()):
            raise TrainingError(f"a trainable parameter is NaN or inf at step {self.progress.step}; the checkpoint "
                                f"was not written. {self.checkpoint_note()}")
        if not self.is_main:
            return
        assert self.out is not None
        tensors, optimizer_meta = _flatten_optimizer(self.optimizer.state_dict())
        for rank, states in enumerate(all_rng):
            tensors.update({f"rng.{kind}.{rank}": state for kind, state in states.items()})
        if self.adapter is None:
            tensors.update({f"params.{n}": p.detach().cpu().contiguous()
                            for n, p in self.model.named_parameters() if p.requires_grad})
        hook_state, hook_tensors, not_saved = self.hooks.state_dict()
        tensors.update({f"hooks.{k}": v for k, v in hook_tensors.items()})
        if not_saved and not self.warned_hook_state:
            self.warned_hook_state = True
            logger.warning("the %s hooks hold state that the checkpoint cannot carry (%s): a resumed run will not "
                           "match an uninterrupted one exactly", type(self.hooks).__name__, ", ".join(not_saved))
        meta = {"format": "lorakit-trainer", "version": STATE_VERSION, "step": self.progress.step,
                "batches_drawn": self.batches.drawn, "world_size": self.ddp.world,
                "config": dataclasses.asdict(self.config), "optimizer": optimizer_meta,
                "hooks": hook_state,
                "trainable": [n for n, p in self.model.named_parameters() if p.requires_grad],
                "progress": dataclasses.asdict(self.progress)}

        def write(tmp: Path) -> None:
            if self.adapter is not None:
                save(self.model, tmp)
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "lorakit-trainer"})
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")

        try:
            final = write_atomically(self.out, CHECKPOINT_DIR, write)
        except (OSError, SafetensorError) as err:
            raise TrainingError(f"could not write the checkpoint of step {self.progress.step} in "
                                f"{self.out / f'.{CHECKPOINT_DIR}-tmp'} ({err}); free disk space and resume. "
                                f"{self.checkpoint_note()}") from None
        logger.info("checkpoint at step %d in %s", self.progress.step, final)

    def resume(self) -> None:
        """Restore everything `save_checkpoint` wrote; start fresh (with a log line) if there is nothing."""
        assert self.out is not None
        directory = self.checkpoint_dir()
        if directory is None:
            logger.info("resume=True but %s holds no checkpoint: starting from step 0", self.out)
            return
        meta = read_checkpoint_meta(directory)
        try:
            tensors = load_file(str(directory / STATE_TENSORS))
        except (OSError, SafetensorError) as err:
            raise AdapterFileError(f"the checkpoint in {directory} is corrupt ({type(err).__name__}: {err}); "
                                   "delete it to start over, or pass another output directory") from None
        changed = {k: (meta["config"][k], getattr(self.config, k)) for k in _RESUME_FIXED
                   if meta["config"].get(k) != getattr(self.config, k)}
        if changed:
            raise TrainingError(f"cannot resume from {directory}: {changed} (saved, now) changed; a resumed run "
                                "must draw the same batches. Use the saved values or a new output_dir")
        others = [k for k, v in meta["config"].items()
                  if k not in (*_RESUME_FIXED, *_RESUME_FREE) and getattr(self.config, k) != v]
        if others:
            logger.warning("resuming with changed settings %s: the run will differ from an uninterrupted one", others)

        trainable = set(meta["trainable"])
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in trainable)
        self.load_model_tensors(directory, tensors)
        self.hooks.load_state_dict(meta["hooks"], {k[len("hooks."):]: v for k, v in tensors.items()
                                                   if k.startswith("hooks.")})
        self.optimizer = self.build_optimizer()
        try:
            self.optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (ValueError, KeyError) as err:
            raise TrainingError(f"the optimizer state in {directory} does not fit this model/method: {err}") from err
        while self.batches.drawn < meta["batches_drawn"]:
            self.batches.next()
        rank = self.ddp.rank if meta["world_size"] == self.ddp.world else 0
        if meta["world_size"] != self.ddp.world:
            logger.warning("checkpoint written by %d ranks, resumed on %d", meta["world_size"], self.ddp.world)
        torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
        if self.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], self.device)
        self.progress = _Progress(**meta["progress"])
        logger.info("resumed from %s at step %d", directory, self.progress.step)

    @torch.no_grad()
    def load_model_tensors(self, directory: Path, tensors: Mapping[str, Tensor]) -> None:
        """Copy the checkpoint's adapter (or, with no adapter, its trainable parameters) into the model."""
        if self.adapter is None:
            for name, p in self.model.named_parameters():
                if f"params.{name}" in tensors:
                    p.copy_(tensors[f"params.{name}"])
            return
        load_adapter_tensors(self.model, read_adapter_tensors(directory), str(directory))
