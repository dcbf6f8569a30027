"""DyLoRA (Valipour et al. 2023, arXiv 2210.07558, EACL 2023): one LoRA of rank r_max trained so that every prefix rank
b ∈ [r_min, r_max] works, by nested-dropout-style rank sampling; after one training it serves at any rank.

Each training step (paper §3, Alg. 1):

1. sample ``b ~ Uniform{r_min, …, r_max}`` (one b for every layer, drawn from ``seed`` and the step, so runs and
   resumes reproduce);
2. truncate ``A↓b = A[:b, :]``, ``B↓b = B[:, :b]`` and compute ``y = W0 x + (α/b) · B↓b A↓b x`` (the scale uses the
   sampled b);
3. ``mode="frozen"`` (the paper's default): only the b-th row of A and the b-th column of B receive gradients, rows
   and columns 1..b−1 are detached for that step; ``mode="updating"``: all of ``A↓b, B↓b`` are updated.

Init as LoRA (A Kaiming-uniform, B = 0).  Outside training (eval mode, or no sampled rank) the layer runs at its
serving rank, r_max unless `set_rank` chose another: the rank-b forward is exactly the truncated adapter
``(α/b) B[:, :b] A[:b]``, and `as_lora` / `lorakit.export_peft` export that truncation (`lorakit eval --rank b`,
`lorakit export --rank b`).  ``alpha=None`` means α = r_max (scale 1 at full rank).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..core.state import get_state
from ..errors import ConfigError, LorakitError
from .lora import LoraLayer, lora_params

logger = logging.getLogger(__name__)

MODES = ("frozen", "updating")


@dataclass(frozen=True)
class DyLoraConfig(AdapterConfig):
    """DyLoRA.  ``r``: r_max; ``r_min``: the smallest sampled rank; ``mode``: ``"frozen"`` or ``"updating"``."""

    method: ClassVar[str] = "dylora"
    r_min: int = 1
    mode: str = "frozen"

    def validate(self) -> None:
        if not 1 <= self.r_min <= self.r:
            raise ConfigError(f"r_min must be in [1, r={self.r}], got {self.r_min}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")


class DyLoraLayer(LoraLayer):
    """LoRA factors of rank r_max; ``sampled_rank`` (set by the hooks while training) or ``serve_rank`` picks b."""

    def __init__(self, base: nn.Module, config: DyLoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.alpha = config.alpha if config.alpha is not None else config.r
        self.frozen = config.mode == "frozen"
        self.serve_rank = config.r
        self.sampled_rank: int | None = None

    @property
    def rank(self) -> int:
        return self.serve_rank

    def truncated(self, b: int, frozen: bool) -> tuple[Tensor, Tensor]:
        """``(B↓b, A↓b)``; with ``frozen`` only the b-th column/row carries gradients."""
        if not frozen or b == 1:
            return self.lora_B[:, :b], self.lora_A[:b]
        return (torch.cat([self.lora_B[:, :b - 1].detach(), self.lora_B[:, b - 1:b]], dim=1),
                torch.cat([self.lora_A[:b - 1].detach(), self.lora_A[b - 1:b]], dim=0))

    def delta(self, x: Tensor) -> Tensor:
        if self.training and self.sampled_rank is not None:
            b = self.sampled_rank
            B, A = self.truncated(b, self.frozen)
        else:
            b = self.serve_rank
            B, A = self.lora_B[:, :b], self.lora_A[:b]
        h = F.linear(self.dropout(x.to(A.dtype)), A)
        return F.linear(h * (self.alpha / b), B)

    def as_lora(self) -> tuple[Tensor, Tensor]:
        b = self.serve_rank
        return self.lora_B[:, :b] * (self.alpha / b), self.lora_A[:b]

    def delta_weight(self) -> Tensor:
        B, A = self.as_lora()
        return B @ A


class DyLoraHooks(TrainingHooks):
    """Samples this step's rank b before the forward and sets it on every layer."""

    state_attrs = ("sampled_rank",)

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: DyLoraConfig) -> None:
        super().__init__(model, layers, config)
        self.sampled_rank = config.r

    def sample_rank(self, step: int) -> int:
        gen = seeded_generator(self.config.seed, f"dylora-step-{step}")
        return int(torch.randint(self.config.r_min, self.config.r + 1, (1,), generator=gen))

    def before_forward(self, step: int) -> None:
        self.sampled_rank = self.sample_rank(step)
        for layer in self.layers.values():
            if isinstance(layer, DyLoraLayer):
                layer.sampled_rank = self.sampled_rank

    def metrics(self) -> dict[str, float]:
        return {"sampled_rank": float(self.sampled_rank)}


def set_rank(model: nn.Module, rank: int) -> None:
    """Serve (forward outside training, merge, export) every DyLoRA layer of ``model`` at rank ``rank``."""
    state = get_state(model)
    if state.method.name != "dylora":
        raise LorakitError(f"set_rank applies to DyLoRA adapters; this model has {state.method.name!r}")
    config: DyLoraConfig = state.config  # type: ignore[assignment]
    if not isinstance(rank, int) or not 1 <= rank <= config.r:
        raise ConfigError(f"rank must be an integer in [1, r_max={config.r}], got {rank!r}")
    if any(layer.merged for layer in state.layers.values()):
        raise LorakitError("the adapter is merged at its current rank; unmerge(model) before changing the rank")
    if rank < config.r_min:
        logger.warning("rank %d is below r_min=%d: DyLoRA did not train that rank", rank, config.r_min)
    for layer in state.layers.values():
        if isinstance(layer, DyLoraLayer):
            layer.serve_rank = rank


register(Method(
    name="dylora", paper="Valipour et al. 2023, DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using "
    "Dynamic Search-Free Low-Rank Adaptation, arXiv 2210.07558", config_class=DyLoraConfig, layer_class=DyLoraLayer,
    trainable="A, B (rank b sampled each step)", params_per_matrix=lora_params, hooks_class=DyLoraHooks,
    set_rank=set_rank))
