"""LoRA-SB (Ponkshe, Singhal et al. 2024, arXiv 2411.19557): LoRA-XS's architecture, initialised
so that the frozen subspaces align with the first full fine-tuning update.

Procedure (official code: ``utils/gradient_utils.py`` and ``utils/initialization_utils.py`` in
RaghavSinghal10/lora-sb):

1. G = the gradient of the pretrained weight summed over the init samples (train mode).
2. The first AdamW step of full fine-tuning is approximated by signSGD (Adam's bias-corrected first
   step is ``m̂/√v̂ = sign(g)``): ``ΔW ≈ −η · sign(G)``, η the learning rate of that first step.  The official
   code sets ``η = lr / (warmup_ratio · total_steps)``, i.e. ``lr / warmup_steps``: the first rung of the linear
   warm-up (`first_step_lr`).  In ``train_glue.py`` total_steps are the training steps, so η is exactly that;
   in ``train_arithmetic.py`` they are the batches of the
   gradient-estimation loader (batch 3, not the 32 examples of an optimizer step), which makes η about 10×
   smaller than the run's first lr (1e-4 / (0.02 · 50000/3) ≈ 3e-7).  lorakit follows the GLUE rule:
   ``init_lr=None`` (default) means "the run's first-step lr": ``lorakit train`` and `LorakitCallback` fill it
   from their lr and warm-up; the bare API (``lorakit.attach``) needs ``init_lr`` given (``first_step_lr(lr,
   warmup_steps)``).  An explicit ``init_lr`` overrides.  η only sets the norm of the initial R (the SVD is
   scale-equivariant), and the initial model applies that update.
   Init samples and weight decay (official code; the paper gives no other values): the gradient is summed
   over 2 examples for GLUE and 50 for arithmetic, and both scripts train with ``torch.optim.AdamW``'s default
   weight decay 0.01.  lorakit takes whatever batches ``data=`` holds (``lorakit train``: ``--init-samples``,
   default 16, between the two official counts) and the trainer's ``weight_decay`` (default 0, the same for every
   method so that runs compare; ``--weight-decay 0.01`` gives the official value, which shrinks R by a factor
   ``1 − lr·0.01`` per step: 0.6 % over the main job's 60 steps at lr 1e-2).
3. ``ΔW ≈ U_r Σ_r V_rᵀ``: ``B = U_r``, ``R = Σ_r`` (trainable), ``A = V_rᵀ``; B and A frozen.
4. The scale is fixed to 1 (α = r; "hyperparameter independent") and W0 is NOT modified: the initial
   model is ``W0 + B R A``, i.e. it applies the rank-r approximation of the first update.

sign(G) needs G element-wise, so the gradients are formed densely for a group of layers at a time,
bounded by ``grad_memory_mb``, re-running the init samples once per group.  The SVD is exact by
default (the official code uses ``svd_lowrank(q=r, niter=10)``; set ``svd_niter=10`` for that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.gradients import dense_gradients, materialize
from ..core.layer import AdapterLayer
from ..core.linalg import randomized_svd, seeded_generator, truncated_svd
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora_xs import CoreLayer, core_params

NO_INIT_LR = ("lora-sb needs init_lr, the η of the approximated first step, and got None: pass LoraSbConfig("
              "init_lr=first_step_lr(lr, warmup_steps)) (lorakit.methods.lora_sb), or train with `lorakit train` or "
              "LorakitCallback, which derive it from the run's lr and warm-up")


@dataclass(frozen=True)
class LoraSbConfig(AdapterConfig):
    """LoRA-SB.  ``init_lr``: η of the approximated first step (``None``: the run's first-step lr, filled by
    ``lorakit train`` and `LorakitCallback`; required with the bare API).  ``alpha`` must stay unset (scale 1)."""

    method: ClassVar[str] = "lora-sb"
    init_lr: float | None = None
    grad_memory_mb: int = 1024
    svd_niter: int | None = None

    def validate(self) -> None:
        if self.alpha is not None and self.alpha != self.r:
            raise ConfigError(f"lora-sb fixes the scale to 1 (alpha = r); got alpha={self.alpha} for r={self.r}")
        if (self.init_lr is not None and self.init_lr <= 0) or self.grad_memory_mb <= 0:
            raise ConfigError(f"init_lr and grad_memory_mb must be positive, got {self.init_lr} and "
                              f"{self.grad_memory_mb}")

    @property
    def scale(self) -> float:
        return 1.0


def first_step_lr(lr: float, warmup_steps: int) -> float:
    """η = the official ``lr / (warmup_ratio · total_steps)`` = ``lr / warmup_steps`` (``lr`` with no warm-up)."""
    if lr <= 0 or warmup_steps < 0:
        raise ConfigError(f"lora-sb's η needs lr > 0 and warmup_steps >= 0, got {lr} and {warmup_steps}")
    return lr / max(1, warmup_steps)


def sign_step_factors(grad: Tensor, config: LoraSbConfig, generator: torch.Generator,
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, R, A)`` with ``B R A`` the best rank-r approximation of ``−η·sign(G)``."""
    if config.init_lr is None:
        raise ConfigError(NO_INIT_LR)
    update = -config.init_lr * torch.sign(grad)
    if config.svd_niter is None:
        u, s, vh = truncated_svd(update, config.r)
    else:
        u, s, vh = randomized_svd(update, config.r, niter=config.svd_niter, oversample=0, generator=generator)
    return u, torch.diag(s), vh


def initialize(model: nn.Module, layers: dict[str, AdapterLayer], config: LoraSbConfig,
               data: Iterable[Any] | None, loss_fn: Callable[..., Tensor] | None) -> None:
    if config.init_lr is None:
        raise ConfigError(NO_INIT_LR)
    batches = materialize(data, "lora-sb")
    for group in dense_gradients(model, layers, batches, loss_fn, config.grad_memory_mb << 20, config.seed):
        for name, grad in group.items():
            layer = layers[name]
            assert isinstance(layer, CoreLayer)
            layer.set_factors(*sign_step_factors(grad, config, seeded_generator(config.seed, name)))


register(Method(
    name="lora-sb", paper="Ponkshe, Singhal et al. 2024, Initialization using Update Approximation is a Silver "
    "Bullet for Extreme Efficient Low-Rank Fine-Tuning, arXiv 2411.19557", config_class=LoraSbConfig,
    layer_class=CoreLayer, trainable="R (r×r); B, A frozen", params_per_matrix=core_params,
    initialize=initialize, needs_data=True, keeps_output=False))
