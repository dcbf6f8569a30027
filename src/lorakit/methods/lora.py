"""LoRA (Hu et al. 2021, arXiv 2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv 2312.03732).

``W = W0 + s · B A`` with ``B ∈ R^{d_out×r}`` zero-initialised and ``A ∈ R^{r×d_in}`` Kaiming-uniform
(eq. 3 of the LoRA paper; PEFT's init), ``s = α/r`` (LoRA) or ``α/√r`` (rsLoRA, eq. 5).
The forward is ``W0 x + B (s · A dropout(x))``: the scale multiplies the r-wide intermediate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA.  ``use_rslora`` switches the scale to ``α/√r``; ``alpha=None`` means ``α = r``."""

    method: ClassVar[str] = "lora"
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else self.r
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r


@dataclass(frozen=True)
class RsLoraConfig(LoraConfig):
    """rsLoRA: LoRA with the rank-stabilised scale ``α/√r``."""

    method: ClassVar[str] = "rslora"
    use_rslora: bool = True


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` as ``nn.Linear`` (and PEFT's ``lora_A``) use it: U(±1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class LoraLayer(AdapterLayer):
    """Trainable ``lora_A`` (r×d_in) and ``lora_B`` (d_out×r).  Subclasses change `init_factors`."""

    def __init__(self, base: nn.Module, config: LoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.scale = config.scale
        device, dtype = self.adapter_device_dtype()
        if init_skipped():
            B, A = torch.zeros(self.out_features, config.r), torch.zeros(config.r, self.in_features)
        else:
            B, A = self.init_factors(seeded_generator(config.seed, name))
        self.lora_A = nn.Parameter(A.to(device, dtype).contiguous())
        self.lora_B = nn.Parameter(B.to(device, dtype).contiguous())

    def init_factors(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(B, A)``: A Kaiming-uniform, B zero (random when ``init_weights=False``)."""
        r = self.config.r
        A = kaiming_uniform(r, self.in_features, generator)
        if self.config.init_weights:
            B = torch.zeros(self.out_features, r)
        else:
            B = kaiming_uniform(self.out_features, r, generator)
        return B, A

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h * self.scale, self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if type(self).delta is not LoraLayer.delta:  # a subclass changed the update: the generic path
            return super().forward(x)
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if out.dtype != h.dtype or not out.is_contiguous():
            return out + F.linear(h * self.scale, self.lora_B).to(out.dtype)
        # out += s · h Bᵀ in one BLAS call, in place: the base output is not needed by its own backward
        flat = out.view(-1, self.out_features)
        flat.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.T.to(h.dtype), alpha=self.scale)  # autocast: h bf16
        return out

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.scale) @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        return self.lora_B * self.scale, self.lora_A


def lora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * (d_in + d_out)


LORA = register(Method(
    name="lora", paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685",
    config_class=LoraConfig, layer_class=LoraLayer, trainable="A, B", params_per_matrix=lora_params))
RSLORA = register(Method(
    name="rslora", paper="Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA, "
    "arXiv 2312.03732", config_class=RsLoraConfig, layer_class=LoraLayer, trainable="A, B",
    params_per_matrix=lora_params))
