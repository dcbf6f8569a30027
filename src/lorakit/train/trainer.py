"""The lorakit training loop, readable in one sitting (in the spirit of nanoGPT's ``train.py``).

`train` runs ``config.steps`` optimizer steps on a model with a lorakit adapter attached (with none
attached, on whatever parameters require grad: full fine-tuning) and calls the method's training
hooks exactly where `lorakit.core.hooks` says::

    hooks.on_train_begin(steps)
    every step:  hooks.before_forward(step)
                 for each of grad_accum micro-batches: (task loss + hooks.regularizer()).backward()
                     (`lorakit.core.driver.step_loss`: hooks.after_forward(batch, loss, logits) in between)
                 hooks.after_loss(step, the step's task loss)
                 [under torchrun: gradients summed across ranks, see `lorakit.train.distributed`]
                 clip; hooks.after_backward(step); set this step's lr; optimizer.step()
                 hooks.after_step(step); optimizer.zero_grad()
                 a fresh optimizer if hooks.optimizer_reset_requested (`lorakit.core.driver.reset_optimizer`)
                 log, evaluate, checkpoint

A run is `_Run.setup`, `_Run.loop` (whose body is `_Run.step`), `_Run.cleanup` and `_Run.finish`.  The pieces
live beside this module: `config` (`TrainConfig`, the lr schedule), `distributed` (torchrun ranks, FSDP),
`progress` (logs, `TrainResult`), `state` (the checkpoint: ``resume=True`` continues bit for bit on CPU) and
`memory` (activation checkpointing); batches come from `lorakit.train.data.batch_indices`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from ..api import STATE_ATTR, AdapterState
from ..core.driver import build_optimizer, reset_optimizer, step_loss
from ..core.files import locked_dir
from ..core.hooks import TrainingHooks
from ..errors import ConfigError, LorakitError, OutputError, TrainingError
from ..io.persistence import save
from . import data
from .compiled import CompiledForward, check_compile
from .config import TrainConfig, lr_factor
from .data import Batch
from .distributed import Ranks, shard_frozen_base
from .memory import enable_gradient_checkpointing, peak_memory_mib
from .progress import Progress, RunLog, StepStats, TrainResult
from .state import Checkpoints

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"

LossFn = Callable[[nn.Module, Mapping[str, Any]], Tensor]
EvalFn = Callable[[nn.Module], float | Mapping[str, float]]


def train(model: nn.Module, train_features: Sequence[Mapping[str, Any]], config: TrainConfig,
          eval_fn: EvalFn | None = None, *, pad_token_id: int | None = None,
          collate: Callable[[list[Mapping[str, Any]]], Batch] | None = None,
          loss_fn: LossFn | None = None, on_eval: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
    """Train ``model`` on ``train_features`` (encoded examples, as `lorakit.train.data` makes them).

    Batches come from the seeded batcher (length-grouped unless ``config.group_by_length`` is False)
    and ``collate`` (default: `data.collate` padding with ``pad_token_id``, itself defaulting to the
    model config's pad token).  With ``config.packing`` the features are packed into rows first (`data.pack`) and
    collated by `data.collate_packed`, with the attention mask the model needs (`data.packing_mask`).
    ``loss_fn(model, inputs)`` defaults to `lorakit.core.loss.model_loss`,
    i.e. ``model(**inputs).loss``.  ``eval_fn(model)`` (in eval mode, no grad needed) returns a score or
    a dict of scores, every ``config.eval_every`` steps; ``on_eval(record)`` then receives each
    ``{"step": s, "score": x}`` record (rank 0), e.g. to report it to a tuner that may stop the run.
    Runs on the model's device; under torchrun (``WORLD_SIZE`` > 1) each rank trains its share of every batch;
    only rank 0 writes files.
    Raises `TrainingError` at the first non-finite loss or gradient, leaving the last checkpoint intact.
    """
    device = next(model.parameters()).device
    if config.bf16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("bf16=True but this GPU has no bfloat16 support; set bf16=False")
    if pad_token_id is None:
        pad_token_id = getattr(getattr(model, "config", None), "pad_token_id", None) or 0
    if config.packing:
        if collate is not None:
            raise ConfigError("packing=True collates the packed rows itself (data.collate_packed); pass no collate")
        lengths = [len(f["input_ids"]) for f in train_features]
        row = config.max_length or max(lengths, default=1)
        train_features = data.pack(train_features, row)
        logger.info("packed %d examples into %d rows of at most %d tokens (%.0f%% full)", len(lengths),
                    len(train_features), row, 100 * sum(lengths) / (row * len(train_features)))
        collate = functools.partial(data.collate_packed, pad_token_id=pad_token_id, mask=data.packing_mask(model))
    collate = collate or functools.partial(data.collate, pad_token_id=pad_token_id)
    ranks = Ranks(device)  # under torchrun: join the process group (and leave it below if we made it)
    try:
        with _output_lock(config.output_dir, ranks):
            run = _Run(model, train_features, config, eval_fn, collate, loss_fn, ranks, on_eval)
            run.setup()
            try:
                run.loop()
            finally:
                run.cleanup()
            return run.finish()
    finally:
        ranks.close()


def _output_lock(output_dir: str | None, ranks: Ranks) -> contextlib.AbstractContextManager[None]:
    """One run per output directory: rank 0 holds its lock (`lorakit.core.files.locked_dir`) for the whole run."""
    if not output_dir or ranks.rank != 0:
        return contextlib.nullcontext()
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"cannot create the output directory {output_dir} ({err.strerror or err})") from None
    return locked_dir(output_dir)


class _Run:
    """One call of `train`."""

    def __init__(self, model: nn.Module, features: Sequence[Mapping[str, Any]], config: TrainConfig,
                 eval_fn: EvalFn | None, collate: Callable[[list[Mapping[str, Any]]], Batch], loss_fn: LossFn | None,
                 ranks: Ranks, on_eval: Callable[[dict[str, float]], None] | None = None):
        self.model, self.features, self.config, self.on_eval = model, features, config, on_eval
        self.eval_fn, self.collate, self.loss_fn, self.ranks = eval_fn, collate, loss_fn, ranks
        self.device, self.is_main = ranks.device, ranks.rank == 0
        self.out = Path(config.output_dir) if config.output_dir else None
        self.checkpoints = Checkpoints(self.out, config, ranks)

    def setup(self) -> None:
        """Hooks, sharding, seed, optimizer, resume, reports; the model in training mode."""
        config, model, ranks = self.config, self.model, self.ranks
        if config.batch_size < ranks.world:
            raise ConfigError(f"batch_size={config.batch_size} is smaller than the {ranks.world} ranks: every rank "
                              "needs a share of each batch")
        self.adapter: AdapterState | None = getattr(model, STATE_ATTR, None)
        if self.adapter is None:  # full fine-tuning: hooks that do nothing
            logger.info("no lorakit adapter attached: training every parameter that requires grad")
            self.hooks = TrainingHooks(model, {}, None)  # type: ignore[arg-type]
        else:
            self.hooks = self.adapter.hooks
        backend = check_compile(self.adapter.method.name if self.adapter else None, config.compile, self.device)
        if config.fsdp:  # each rank keeps 1/world of the frozen base weights
            ranks.check_fsdp(model)
            shard_frozen_base(model, self.device)
        batches = data.batch_indices(self.features, config.batch_size, config.seed, config.group_by_length)
        torch.manual_seed(config.seed)  # the same dropout masks on every rerun (a resume restores the stream)
        self.hooks.on_train_begin(config.steps)  # methods with schedules (AdaLoRA's budget) need the length
        self.optimizer = build_optimizer(model, self.hooks, config.lr, config.weight_decay)
        self.progress, drawn = Progress(), 0
        if config.resume and (resumed := self.checkpoints.resume(model, self.hooks)) is not None:
            self.optimizer, self.progress, drawn = resumed
        self.batches: Iterator[tuple[int, list[int]]] = itertools.islice(batches, drawn, None)  # the unseen ones
        self.epoch = -1  # the epoch of the last batch drawn, for the log
        ranks.check_same_start(model)  # summed gradients only mean something if every rank starts equal
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.restore_checkpointing = enable_gradient_checkpointing(model) if config.gradient_checkpointing else None
        self.compiled = CompiledForward(model, backend) if backend else None
        self.log = RunLog(self.out, config, self.progress.step, self.is_main)
        self.was_training = model.training
        model.train()
        self.start = time.perf_counter()

    def loop(self) -> None:
        """Steps until ``config.steps``, or ``stop_after`` as if the run were killed there."""
        config, p = self.config, self.progress
        while p.step < config.steps:
            stats = self.step(p.step)
            p.add(stats)
            lr = self.optimizer.param_groups[0]["lr"]
            self.log.step(p.step, stats, lr, {"epoch": self.epoch, **self.hooks.metrics()})
            if self.eval_fn is not None and config.eval_every and p.step % config.eval_every == 0:
                self.evaluate()
            if config.save_every and (p.step % config.save_every == 0 or p.step == config.steps):
                self.checkpoints.save(self.model, self.hooks, self.optimizer, p)
            if config.stop_after is not None and config.stop_after <= p.step < config.steps:
                logger.info("stop_after=%d: stopping at step %d", config.stop_after, p.step)
                break

    def step(self, step: int) -> StepStats:
        """One optimizer step (0-based ``step``) over ``grad_accum`` micro-batches."""
        config, hooks, optimizer = self.config, self.hooks, self.optimizer
        start = time.perf_counter()
        hooks.before_forward(step)
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # task loss, regularizer, real, padded
        has_reg = False
        for _ in range(config.grad_accum):
            self.epoch, indices = next(self.batches)
            share = self.ranks.share(indices, self.features, config.fsdp)
            if share is None:  # this rank has no example in a short last batch of an epoch
                continue
            # Summed over ranks and micro-batches, the weighted losses are the mean loss of the step.
            weight = share.weight / config.grad_accum
            batch = self.collate([self.features[i] for i in share.indices]).to(self.device)
            with self.compiled.active() if self.compiled else contextlib.nullcontext():
                task, reg = step_loss(self.model, batch.inputs, hooks, self.loss_fn,
                                      torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.bf16))
            loss = task if reg is None else task + reg
            (loss * weight).backward()
            totals[0] += task.detach().double() * weight
            if reg is not None:
                has_reg = True
                totals[1] += reg.detach().double() * weight
            if share.counted:
                totals[2] += batch.real_tokens
                totals[3] += batch.padded_tokens if "input_ids" in batch.inputs else batch.real_tokens
        self.ranks.sum_(totals)  # every rank logs, checks and hands the hooks the same step loss
        task_loss, reg_value, real, padded = totals.tolist()
        if not math.isfinite(task_loss + reg_value):  # stop before a NaN reaches the adapter or a checkpoint
            raise TrainingError(f"the training loss is {task_loss + reg_value} at step {step + 1}; stopped before "
                                f"the optimizer step. {self.checkpoints.note()} Lower the lr, enable clipping "
                                "(max_grad_norm) or check the data.")
        hooks.after_loss(step, task_loss)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self.ranks.sum_grads(params)  # data parallel: every rank now holds the global batch's gradient
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf))  # as HF clips
        if not math.isfinite(grad_norm):
            raise TrainingError(f"the gradient norm is {grad_norm} at step {step + 1}; stopped before the optimizer "
                                f"step. {self.checkpoints.note()} Lower the lr or check the data.")
        hooks.after_backward(step)
        factor = lr_factor(step, config)  # the schedule scales each group's own lr (LoRA+ has several)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        optimizer.step()
        hooks.after_step(step)
        optimizer.zero_grad(set_to_none=True)
        if hooks.optimizer_reset_requested:  # a new XGBLoRA round or Chain-of-LoRA link starts fresh
            reset_optimizer(self.model, hooks, optimizer, config.lr, config.weight_decay)
        return StepStats(task_loss, reg_value if has_reg else None, grad_norm, int(real), int(padded),
                         time.perf_counter() - start)

    def evaluate(self) -> None:
        """Run ``eval_fn`` (rank 0; every rank under fsdp, whose forward needs them all) without disturbing the
        training RNG stream."""
        if not self.is_main and not self.config.fsdp:
            return
        assert self.eval_fn is not None
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
        if self.on_eval is not None:
            self.on_eval(record)

    def cleanup(self) -> None:
        """Put the model back as `setup` found it and close the reports (after an error too)."""
        self.model.train(self.was_training)
        if self.restore_checkpointing is not None:
            self.restore_checkpointing()
        self.log.close()

    def finish(self) -> TrainResult:
        """Write ``output_dir/adapter`` (rank 0) if the run reached ``config.steps``; what the run did."""
        config, p = self.config, self.progress
        adapter_dir = None
        if p.step >= config.steps and self.out is not None and self.adapter is not None and config.save_adapter \
                and self.is_main:
            try:
                adapter_dir = str(save(self.model, self.out / ADAPTER_DIR))
            except (LorakitError, OSError, SafetensorError) as err:
                raise TrainingError(f"could not write the adapter to {self.out / ADAPTER_DIR} ({err}); fix that and "
                                    f"resume. {self.checkpoints.note()}") from None
        return TrainResult(
            losses=list(p.losses), evals=list(p.evals), seconds=time.perf_counter() - self.start,
            peak_memory_mib=peak_memory_mib(self.device),
            tokens_per_second=p.real_tokens / max(p.train_seconds, 1e-9),
            padded_tokens_per_second=p.padded_tokens / max(p.train_seconds, 1e-9),
            trainable_params=self.trainable_params, steps=p.step, adapter_dir=adapter_dir)
