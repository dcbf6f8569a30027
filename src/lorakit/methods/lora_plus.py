"""LoRA+ (Hayou, Ghosh & Yu 2024, arXiv 2402.12354): LoRA with a larger learning rate for B.

The adapter is plain LoRA; the optimizer gets ``η_B = λ·η_A`` (λ = 2⁴ recommended).  Parameter groups
follow the official code (nikhil-ghosh-berkeley/loraplus, also PEFT's ``create_loraplus_optimizer``):

* group A (``η``, weight decay): every trainable matrix except B (the A factors, matrices of ``modules_to_save``);
* group B (``λ·η``, weight decay): the B factors;
* group B without decay (``λ·η``, no weight decay): every trainable 1-D tensor (biases, norms of saved modules).

The official code's fourth group, the trainable tensors of LoRA embedding layers at ``loraplus_lr_embedding``
(default 1e-6), has no counterpart: lorakit adapts only ``nn.Linear`` / ``Conv1D`` layers, never an embedding, so
that group would always be empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..core.hooks import TrainingHooks
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora import LoraConfig, LoraLayer, lora_params


@dataclass(frozen=True)
class LoraPlusConfig(LoraConfig):
    """LoRA+.  ``lr_ratio``: λ = η_B / η_A (the learning rate given to the trainer is η_A)."""

    method: ClassVar[str] = "lora-plus"
    lr_ratio: float = 16.0

    def validate(self) -> None:
        if self.lr_ratio <= 0:
            raise ConfigError(f"lr_ratio must be positive (the paper recommends 16), got {self.lr_ratio}")


class LoraPlusHooks(TrainingHooks):
    """Builds AdamW with LoRA+'s three parameter groups."""

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        b_ids = {id(layer.lora_B) for layer in self.layers.values() if isinstance(layer, LoraLayer)}
        group_a, group_b, group_b_no_decay = [], [], []
        for p in params:
            if id(p) in b_ids:
                group_b.append(p)
            elif p.ndim == 1:
                group_b_no_decay.append(p)
            else:
                group_a.append(p)
        ratio = self.config.lr_ratio
        groups = [{"params": group_a, "lr": lr, "weight_decay": weight_decay},
                  {"params": group_b, "lr": lr * ratio, "weight_decay": weight_decay},
                  {"params": group_b_no_decay, "lr": lr * ratio, "weight_decay": 0.0}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kwargs)


register(Method(
    name="lora-plus", paper="Hayou, Ghosh & Yu 2024, LoRA+: Efficient Low Rank Adaptation of Large Models, "
    "arXiv 2402.12354", config_class=LoraPlusConfig, layer_class=LoraLayer, trainable="A, B (η_B = λ·η_A)",
    params_per_matrix=lora_params, hooks_class=LoraPlusHooks))
