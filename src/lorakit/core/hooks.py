"""The training-hook protocol: the fixed points of a training step where a method may act.

The lorakit trainer and the Hugging Face Trainer callback call these in this order each step::

    hooks.before_forward(step)                    # Flat-LoRA perturbation, DyLoRA rank sampling, ...
    loss = task_loss + hooks.regularizer()        # AdaLoRA/LoRA² orthogonality, BA-LoRA, ...
    loss.backward()
    hooks.after_backward(step)                    # importance scores, gradient adjustment (LoRA-Pro)
    optimizer.step()
    hooks.after_step(step)                        # rank masks, proximal steps, boosting merges
    optimizer.zero_grad()

`build_optimizer` lets a method choose its optimizer or parameter groups (LoRA+, LoRA-RITE); the
trainer asks for it once, and again whenever `optimizer_reset_requested` is set (Chain of LoRA,
XGBLoRA start each link/round with a fresh optimizer state).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from .layer import AdapterLayer


class TrainingHooks:
    """Default hooks: plain AdamW on the trainable parameters, nothing else."""

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: AdapterConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.total_steps: int | None = None
        self.optimizer_reset_requested = False

    def on_train_begin(self, total_steps: int) -> None:
        """Called once with the planned number of optimizer steps (schedules depend on it)."""
        self.total_steps = total_steps

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def regularizer(self) -> Tensor | None:
        return None

    def before_forward(self, step: int) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging (current budget, sparsity, ...)."""
        return {}
