"""How `lorakit.train.trainer.train` trains: `TrainConfig` (checked when built) and its lr schedule `lr_factor`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ..errors import ConfigError
from .compiled import check_compile

SCHEDULES = ("linear", "cosine", "constant")


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
    ``fsdp``: under torchrun, shard the frozen base weights across ranks with FSDP2
    (`lorakit.train.distributed.shard_frozen_base`).  ``packing``: causal-LM features packed into rows of
    ``max_length`` tokens (default: the longest example) with no attention across examples
    (`lorakit.train.data.pack`); ``batch_size`` then counts rows.  ``compile``: run the training forward under
    `torch.compile` (``True``: inductor; or a backend name, e.g. ``"aot_eager"``; `lorakit.train.compiled`).
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
    packing: bool = False
    max_length: int | None = None
    compile: bool | str = False

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
        if self.max_length is not None and (not self.packing or self.max_length < 1):
            raise ConfigError(f"max_length is the length of packed rows: give it with packing=True, as a positive "
                              f"number of tokens (got {self.max_length!r}, packing={self.packing})")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"stop_after must be a positive step count or None, got {self.stop_after}")
        check_compile(None, self.compile)

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
