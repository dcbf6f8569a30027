"""Chain of LoRA, COLA (Xia, Qin & Hazan 2024, arXiv 2401.04151): residual learning with a chain of LoRAs.

The paper's algorithm, for links j = 1..M: tune a LoRA (B_j = 0, A_j random), "tie a knot" (merge
``W <- W + s·B_j A_j``), "extend the chain" (a fresh LoRA and a fresh optimizer state).  The knots reuse
XGBLoRA's machinery (`lorakit.methods.xgblora`): every targeted layer, no shrinkage, merged links kept as
low-rank base offsets, so `export_peft` writes one LoRA of rank ``M × r`` relative to the original W0 and
`save` writes no base weights.

Link length: ``link_steps`` optimizer steps per link (default 100, [unconfirmed]), or, with ``num_links = M``, the
planned steps split into M equal links (``ceil(total_steps / M)``; the trainer passes total_steps to
``on_train_begin``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .lora import LoraConfig, lora_params
from .xgblora import BoosterLayer, BoostingHooks


@dataclass(frozen=True)
class ColaConfig(LoraConfig):
    """COLA.  ``link_steps``: steps per link; ``num_links``: M equal links over the planned steps (overrides)."""

    method: ClassVar[str] = "cola"
    link_steps: int = 100
    num_links: int | None = None

    def validate(self) -> None:
        if self.link_steps < 1:
            raise ConfigError(f"link_steps must be >= 1, got {self.link_steps}")
        if self.num_links is not None and self.num_links < 1:
            raise ConfigError(f"num_links must be >= 1 or None (use link_steps), got {self.num_links}")


class ColaHooks(BoostingHooks):
    """Knots every link: merge all LoRAs, re-initialise them, reset the optimizer state."""

    def round_length(self) -> int:
        if self.config.num_links is None:
            return self.config.link_steps
        if self.total_steps is None:
            raise TrainingError("cola with num_links needs the planned number of steps: call "
                                "hooks.on_train_begin(total_steps) first, or set link_steps instead")
        return max(1, math.ceil(self.total_steps / self.config.num_links))


register(Method(
    name="cola", paper="Xia, Qin & Hazan 2024, Chain of LoRA: Efficient Fine-tuning of Language Models via Residual "
    "Learning, arXiv 2401.04151", config_class=ColaConfig, layer_class=BoosterLayer,
    trainable="A, B of the current link (merged links frozen)", params_per_matrix=lora_params,
    hooks_class=ColaHooks, base_offsets="merged-rounds"))
