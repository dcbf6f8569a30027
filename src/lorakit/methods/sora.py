"""SoRA (Ding et al. 2023, arXiv 2311.09578, EMNLP 2023): sparse low-rank adaptation with a proximally trained gate.

``ΔW x = (α/r) · W_up (g ⊙ (W_down x))`` with ``W_down = lora_A`` (r×d_in, Kaiming-uniform), ``W_up = lora_B``
(d_out×r, zero) and a gate ``g = lora_gate`` ∈ R^r.  As in the official code (TsinghuaC3I/SoRA ``src/lora.py``) the
gate starts ~ N(0, 1); B = 0 keeps the initial output unchanged.

Training (official ``src/sparse_optimizer.py`` + ``src/trainer.py``, the variant ``run_glue.py`` uses):

* the loss gets ``λ1 · mean|g|`` over all gates (``l1_weight``, official ``sparse_lambda``);
* the gates take their AdamW step without weight decay (``gate_lr``, default the trainer's lr; the trainer's lr
  schedule applies to them too, as the official linear schedule of the sparse optimizer), then the proximal step
  of the L1 norm, a soft threshold::

      g ← sign(g) · max(|g| − ξ, 0)                        (``threshold`` ξ, official ``sparse_lambda_2``)

  The threshold is applied after every optimizer step in ``after_step`` (so it works with any optimizer).  Like
  the official default optimizer, ξ is not multiplied by the learning rate (the textbook proximal step of
  ``η·λ‖g‖₁`` would use η·ξ; the official ``sparse_optimizer_multiply_lr.py`` does that, but is not used);
* sparsifying schedule (``threshold_schedule="linear"``): ξ rises from ``threshold`` to ``max_threshold`` in
  ``schedule_stages`` equal stages over the training (official ``np.linspace(sparse_lambda_2, max_lambda,
  lambda_num)``; the official code retrains for a fixed number of epochs per stage, lorakit spreads the stages over
  the planned steps).

A gate entry that reaches exactly 0 switches its rank off; `as_lora` (hence the export) keeps only the ranks with
g ≠ 0, folding g into B.  ``alpha=None`` means α = r (the official default α = 16).  ``l1_weight`` and
``threshold`` default to ``run_glue.py``'s argument defaults (1e-3, 1e-3), not the released script's values
(``scripts/run_glue_sora_no_schedule.sh``: ``sparse_lambda`` 10, ``sparse_lambda_2`` 3e-4), which belong to its one
run (STS-B, DeBERTaV3-base, 20 epochs, batch 8, lr 8e-4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .adaptive import keep_ranks, rank_metrics
from .lora import LoraLayer

SCHEDULES = ("constant", "linear")


@dataclass(frozen=True)
class SoraConfig(AdapterConfig):
    """SoRA.  ``l1_weight``: λ1 of the L1 loss term; ``threshold``: ξ of the proximal step (the start of the schedule);
    ``threshold_schedule``: ``"constant"`` or ``"linear"`` up to ``max_threshold`` in ``schedule_stages`` stages;
    ``gate_lr``: learning rate of the gates (``None``: the trainer's)."""

    method: ClassVar[str] = "sora"
    l1_weight: float = 1e-3
    threshold: float = 1e-3
    threshold_schedule: str = "constant"
    max_threshold: float | None = None
    schedule_stages: int = 10
    gate_lr: float | None = None

    def validate(self) -> None:
        if self.l1_weight < 0 or self.threshold < 0:
            raise ConfigError(f"l1_weight and threshold must be >= 0, got {self.l1_weight} and {self.threshold}")
        if self.threshold_schedule not in SCHEDULES:
            raise ConfigError(f"threshold_schedule must be one of {SCHEDULES}, got {self.threshold_schedule!r}")
        if self.threshold_schedule == "linear":
            if self.max_threshold is None or self.max_threshold < self.threshold:
                raise ConfigError(f"the linear schedule needs max_threshold >= threshold={self.threshold}, got "
                                  f"{self.max_threshold}")
            if self.schedule_stages < 2:
                raise ConfigError(f"schedule_stages must be >= 2, got {self.schedule_stages}")
        if self.gate_lr is not None and self.gate_lr <= 0:
            raise ConfigError(f"gate_lr must be positive (or None for the trainer's lr), got {self.gate_lr}")


class SoraLayer(LoraLayer):
    """LoRA factors plus ``lora_gate`` (r) between them."""

    def __init__(self, base: nn.Module, config: SoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        gen = seeded_generator(config.seed, f"{name}#gate")
        gate = torch.zeros(config.r) if init_skipped() else torch.randn(config.r, generator=gen)
        self.lora_gate = nn.Parameter(gate.to(self.lora_A.device, self.lora_A.dtype))

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h * (self.lora_gate * self.scale), self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * (self.lora_gate * self.scale)) @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """Only the ranks whose gate is nonzero."""
        return keep_ranks(self.lora_B * (self.lora_gate * self.scale), self.lora_A, self.lora_gate != 0)

    @property
    def rank(self) -> int:
        return int((self.lora_gate != 0).sum())


def soft_threshold(g: Tensor, xi: float) -> Tensor:
    """The proximal operator of ``ξ‖g‖₁``: ``sign(g) · max(|g| − ξ, 0)``."""
    return torch.sign(g) * torch.clamp(g.abs() - xi, min=0.0)


class SoraHooks(TrainingHooks):
    """L1 term, gate parameter group, proximal step and the sparsifying schedule."""

    state_attrs = ("current_threshold",)

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: SoraConfig) -> None:
        super().__init__(model, layers, config)
        self.current_threshold = config.threshold

    def gates(self) -> list[nn.Parameter]:
        return [layer.lora_gate for layer in self.layers.values() if isinstance(layer, SoraLayer)]

    def on_train_begin(self, total_steps: int) -> None:
        if self.config.threshold_schedule == "linear" and self.config.schedule_stages > total_steps:
            raise TrainingError(f"the sparsifying schedule has {self.config.schedule_stages} stages but training has "
                                f"only {total_steps} steps; lower schedule_stages or train longer")
        super().on_train_begin(total_steps)

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        gate_ids = {id(g) for g in self.gates()}
        groups = [{"params": [p for p in params if id(p) not in gate_ids], "weight_decay": weight_decay},
                  {"params": [p for p in params if id(p) in gate_ids], "weight_decay": 0.0,
                   "lr": self.config.gate_lr or lr}]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, **kwargs)

    def threshold(self, step: int) -> float:
        """ξ at 0-based step ``step``."""
        cfg = self.config
        if cfg.threshold_schedule == "constant":
            return cfg.threshold
        stages = torch.linspace(cfg.threshold, cfg.max_threshold, cfg.schedule_stages, dtype=torch.float64)
        stage = min(cfg.schedule_stages - 1, step * cfg.schedule_stages // (self.total_steps or 1))
        return float(stages[stage])

    def regularizer(self) -> Tensor | None:
        gates = self.gates()
        if self.config.l1_weight == 0 or not gates:
            return None
        flat = torch.cat([g.float() for g in gates])
        return self.config.l1_weight * flat.abs().mean()

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self.config.threshold_schedule == "linear" and self.total_steps is None:
            raise TrainingError("SoRA's sparsifying schedule needs the number of training steps: call "
                                "hooks.on_train_begin(total_steps) before training")
        xi = self.current_threshold = self.threshold(step)
        if xi > 0:
            for g in self.gates():
                g.copy_(soft_threshold(g, xi))

    def metrics(self) -> dict[str, float]:
        return {"threshold": self.current_threshold, **rank_metrics(self.layers)}


def sora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * (d_in + d_out + 1)


register(Method(
    name="sora", paper="Ding et al. 2023, Sparse Low-rank Adaptation of Pre-trained Language Models, "
    "arXiv 2311.09578", config_class=SoraConfig, layer_class=SoraLayer, trainable="A, B, gate g (proximal L1)",
    params_per_matrix=sora_params, hooks_class=SoraHooks))
