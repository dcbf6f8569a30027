"""OLoRA (Büyükakyüz 2024, arXiv 2406.01775): orthonormal init from the QR of W0.

``W0 = Q R`` (reduced QR, float32); ``B = Q[:, :r]``, ``A = R[:r, :]``; the base is compensated,
``W0 <- W0 − s·B A``, so the initial output is unchanged (PEFT's ``init_lora_weights="olora"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.layer import init_skipped
from ..core.registry import Method, register
from .lora import LoraConfig, LoraLayer, lora_params


@dataclass(frozen=True)
class OloraConfig(LoraConfig):
    method: ClassVar[str] = "olora"


class OloraLayer(LoraLayer):
    def __init__(self, base: nn.Module, config: OloraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        if not init_skipped():
            self.move_base(self.lora_B.detach() * self.scale, self.lora_A.detach())

    def init_factors(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        q, r_mat = torch.linalg.qr(self.weight.detach().float())
        r = self.config.r
        return q[:, :r], r_mat[:r]


register(Method(
    name="olora", paper="Büyükakyüz 2024, OLoRA: Orthonormal Low-Rank Adaptation of Large Language Models, "
    "arXiv 2406.01775", config_class=OloraConfig, layer_class=OloraLayer, trainable="A, B (W0 residual frozen)",
    params_per_matrix=lora_params, base_offsets="every-layer"))
