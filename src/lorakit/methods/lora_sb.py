"""LoRA-SB (Ponkshe, Singhal et al. 2024, arXiv 2411.19557): LoRA-XS's architecture, initialised
so that the frozen subspaces align with the first full fine-tuning update.

Procedure (official code: ``utils/gradient_utils.py`` and ``utils/initialization_utils.py`` in
RaghavSinghal10/lora-sb):

1. G = the gradient of the pretrained weight summed over the init samples (train mode).
2. The first AdamW step of full fine-tuning is approximated by signSGD (Adam's bias-corrected first
   step is ``m̂/√v̂ = sign(g)``): ``ΔW ≈ −η · sign(G)``.  η only sets the norm of the initial R (the SVD is
   scale-equivariant), and the initial model applies that update.  The official scripts
   (RaghavSinghal10/lora-sb@37b33d4: ``train_arithmetic.py`` l. 95-104, ``train_cr.py`` l. 99-108,
   ``train_glue.py`` l. 101-108) all compute ``eff_lr = lr / (warmup_ratio · total_training_steps)`` with
   ``total_training_steps = len(gradient loader) · epochs``, and the gradient loader differs by task type:

   * causal-LM (``train_arithmetic.py``: MetaMathQA ``train[:50000]``, ``eg_bs`` 3, 1 epoch, lr 1e-4, warm-up
     ratio 0.02; ``train_cr.py``: commonsense_170k, ``eg_bs`` 10, 2 epochs, lr 2e-3, ratio 0.02): the loader is
     the gradient-estimation one (batches of 3 or 10, not the 32 or 192 examples of an optimizer step), so η is
     the first-step lr over 32/3 ≈ 11 or 192/10 ≈ 19:
     ``1e-4 / (0.02 · ⌈50000/3⌉ · 1) = 3.0e-7`` and ``2e-3 / (0.02 · ⌈170k/10⌉ · 2) ≈ 2.9e-6``.
   * classification (``train_glue.py``, ``run_glue.sh``: CoLA / MRPC / RTE, batch 128, 30 epochs, ratio 0.06,
     lr ∈ {1e-4, 5e-4, 1e-3, 5e-3}): the loader is the training one, so η is the run's first-step lr,
     ``lr / warm-up steps`` with 120.6 (CoLA), 52.2 (MRPC) or 36 (RTE) warm-up steps: 8.3e-7 ... 1.4e-4 over
     that grid; at the default lr 1e-3, ``1e-3 / (0.06 · ⌈8551/128⌉ · 30) = 8.3e-6`` (CoLA, the default task)
     to 2.8e-5 (RTE).

   lorakit's own rates are not the official ones (LoRA-SB's default lr is 1e-2, warm-up 5 steps, on runs of
   30-400 steps), and the formula applied to them lands far outside those ranges: lr / warm-up = 2e-3 on
   classification (measured on SST-2-like sentiment data: 75.2 % against 79.5 % at η = 1e-6) and, counting the
   gradient loader, about 4e-4 on the built-in arithmetic task (2e-3 there collapsed the main job from 5 % to 1 %
   exact match, measured).  So ``init_lr=None`` (default) takes the official formula at the official script's
   own values for the task's type, `default_eta`: causal-LM (``lorakit train`` on arith, gsm8k or a generation
   ``.jsonl``) 3.0e-7, the arithmetic script's (its GSM8K family); classification 8.3e-6, ``train_glue.py``'s
   defaults.  Both lie in the official ranges above whatever lorakit's lr and warm-up.  `first_step_lr` is the
   classification rule for a run at official-like rates (`LorakitCallback` uses it with the Trainer's lr and
   warm-up); the bare API (``lorakit.attach``) needs ``init_lr`` given; an explicit ``init_lr`` overrides.
   Init samples (official ``num_samples``): 50 for arithmetic, 170 for commonsense, 2 for GLUE; ``lorakit
   train`` defaults ``--init-samples`` by task type to 50 (causal-LM) and 2 (classification), `INIT_SAMPLES`.
   Weight decay: both scripts build ``torch.optim.AdamW`` (default 0.01); lorakit uses the trainer's
   ``weight_decay`` (default 0, the same for every method so that runs compare; ``--weight-decay 0.01`` gives
   the official value).
3. ``ΔW ≈ U_r Σ_r V_rᵀ``: ``B = U_r``, ``R = Σ_r`` (trainable), ``A = V_rᵀ``; B and A frozen.
4. The scale is fixed to 1 (α = r; "hyperparameter independent") and W0 is NOT modified: the initial
   model is ``W0 + B R A``, i.e. it applies the rank-r approximation of the first update.

sign(G) needs G element-wise, so the gradients are formed densely for a group of layers at a time,
bounded by ``grad_memory_mb``, re-running the init samples once per group.  The SVD is exact by
default, the best rank-r approximation that the official ``svd_lowrank(q=r, niter=10)`` (``utils/svd_utils.py``)
estimates; set ``svd_niter=10`` for the official one.
"""

from __future__ import annotations

import math
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
              "init_lr=default_eta('causal-lm' or 'classification')) for the official value, or init_lr="
              "first_step_lr(lr, warmup_steps) at official-like rates (lorakit.methods.lora_sb), or train with "
              "`lorakit train` or LorakitCallback, which fill it in")


@dataclass(frozen=True)
class LoraSbConfig(AdapterConfig):
    """LoRA-SB.  ``init_lr``: η of the approximated first step (``None``: filled by ``lorakit train`` by task type,
    `default_eta`, and by `LorakitCallback` from the Trainer's first-step lr; required with the bare API).
    ``alpha`` must stay unset (scale 1)."""

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


def official_eta(lr: float, warmup_ratio: float, loader_batches: int, epochs: int) -> float:
    """The official ``eff_lr = lr / (warmup_ratio · len(gradient loader) · epochs)``."""
    return lr / (warmup_ratio * loader_batches * epochs)


# η at the official scripts' own settings, per task type (module docstring): the arithmetic script's for causal-LM,
# train_glue.py's defaults (CoLA, 8551 sentences, batch 128, 30 epochs) for classification
DEFAULT_ETA = {"causal-lm": official_eta(1e-4, 0.02, math.ceil(50_000 / 3), 1),
               "classification": official_eta(1e-3, 0.06, math.ceil(8_551 / 128), 30)}
INIT_SAMPLES = {"causal-lm": 50, "classification": 2}  # the official num_samples (arithmetic, GLUE)


def default_eta(task_type: str) -> float:
    """η for ``init_lr=None`` in ``lorakit train``: the official formula at the official settings of the type."""
    if task_type not in DEFAULT_ETA:
        raise ConfigError(f"lora-sb has no default η for task type {task_type!r}; pass init_lr")
    return DEFAULT_ETA[task_type]


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
