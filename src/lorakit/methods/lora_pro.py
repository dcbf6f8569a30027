"""LoRA-Pro (Wang, Liang, He & Tan 2024, arXiv 2407.18242): adjust the gradients of A and B so that LoRA's
equivalent gradient best approximates the full fine-tuning gradient.

A step on (A, B) with gradients (g^A, g^B) moves W like a full step with the equivalent gradient
``g̃ = s (B g^A + g^B A)``.  Given LoRA's own gradients ``g^A = s Bᵀ g``, ``g^B = s g Aᵀ`` of the
full gradient g, the (g^A, g^B) minimising ``‖g̃ − g‖_F`` are (the paper's closed form)::

    g^A* = (1/s²) (BᵀB)⁻¹ g^A + X A
    g^B* = (1/s²) [I − B (BᵀB)⁻¹ Bᵀ] g^B (AAᵀ)⁻¹ − B X

for any r×r X; then ``g̃ = P_B g + g P_A − P_B g P_A`` (P the projectors on col(B) and row(A)).  The X closest to
the vanilla gradients solves the Sylvester equation ``BᵀB X + X AAᵀ = −(1/s²)(BᵀB)⁻¹ g^A Aᵀ``
(solved with the eigendecompositions of the two symmetric matrices).

``optimizer="sgd"`` applies this adjustment to the raw gradients before an SGD step.  ``optimizer="adamw"``
(default) follows the official code (mrflogs/LoRA-Pro, ``lorapro_full_adjustment`` in DeepSpeed
``stage_1_and_2.py``): the equivalent gradient (X = 0) feeds full-size Adam moments per layer, the Adam direction
``ĝ = m̂ / (√v̂ + ε)`` is mapped back to LoRA gradients ``(s Bᵀ ĝ, s ĝ Aᵀ)``, adjusted as above, and applied by
plain SGD (the official code also runs its optimizer as "sgd"); weight decay is SGD's, which for plain SGD is the
decoupled AdamW decay.  Other trainable tensors (saved heads) get the Adam direction too.  Inverses are
``pinv(M + δI)`` as in the official code; with B = 0 this reproduces its first-step branch exactly.
The moments are 2·d_out·d_in floats per layer (the memory cost of the AdamW variant, as in the paper).

Two quirks of the official code, not followed (the paper's target is full fine-tuning with AdamW, and these depart
from it; tests in ``tests/test_optimizer_methods.py`` and ``tests/test_trainer.py`` pin both choices):

* Step count: the official code has already incremented its step when it adjusts, so Adam's bias correction uses
  t + 1 (its first direction is ``0.1/0.19 · g / √(0.001/0.001999) ≈ 0.74 · sign(g)``, a damping that fades over
  the first ~20 steps).  lorakit uses t, as ``torch.optim.AdamW``: the first direction is ``g / (|g| + ε)``.
* Clipping: DeepSpeed computes the clip factor ``min(1, max_norm / ‖g_raw‖)`` on the raw LoRA gradients and
  multiplies the adjusted direction by it, so every step with ‖g_raw‖ > max_norm is shortened (a hidden lr cut).
  lorakit clips the raw gradients before ``after_backward``, as ``transformers.Trainer`` does before AdamW, so the
  clip only rescales what enters the moments and the step keeps Adam's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora import LoraConfig, LoraLayer, lora_params

OPTIMIZERS = ("adamw", "sgd")


@dataclass(frozen=True)
class LoraProConfig(LoraConfig):
    """LoRA-Pro.  ``optimizer``: ``"adamw"`` (full-size Adam moments on the equivalent gradient) or ``"sgd"``.
    ``betas``/``eps``: Adam's.  ``delta``: the ridge in ``pinv(M + δI)``."""

    method: ClassVar[str] = "lora-pro"
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    delta: float = 1e-8

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        super().__post_init__()

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.delta < 0:
            raise ConfigError("eps must be positive and delta >= 0")


def solve_sylvester(p: Tensor, q: Tensor, c: Tensor) -> Tensor:
    """X with ``P X + X Q = C`` for symmetric positive semi-definite P, Q (r×r); 0 where both are singular."""
    lam, u = torch.linalg.eigh(p)
    mu, v = torch.linalg.eigh(q)
    denom = lam[:, None] + mu[None, :]
    solvable = denom.abs() > 1e-12 * denom.abs().max().clamp_min(1e-30)
    y = torch.where(solvable, (u.T @ c @ v) / torch.where(solvable, denom, torch.ones_like(denom)), 0.0)
    return u @ y @ v.T


def adjusted_gradients(A: Tensor, B: Tensor, g_A: Tensor, g_B: Tensor, scale: float, delta: float,
                       sylvester: bool = True) -> tuple[Tensor, Tensor]:
    """The closed-form ``(g^A*, g^B*)`` (float32); ``sylvester=False`` uses X = 0."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    AAt_inv = torch.linalg.pinv(A @ A.T + delta * eye)
    BtB = B.T @ B
    BtB_inv = torch.linalg.pinv(BtB + delta * eye)
    s2 = scale * scale
    new_A = BtB_inv @ g_A / s2
    new_B = (g_B - B @ (BtB_inv @ (B.T @ g_B))) @ AAt_inv / s2
    if sylvester:
        X = solve_sylvester(BtB, A @ A.T, -(BtB_inv @ g_A @ A.T) / s2)
        new_A = new_A + X @ A
        new_B = new_B - B @ X
    return new_A, new_B


class LoraProHooks(TrainingHooks):
    """Adjusts the LoRA gradients after backward; the optimizer is plain SGD."""

    state_attrs = ("adam_step", "moments")

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: LoraProConfig) -> None:
        super().__init__(model, layers, config)
        self.adam_step = 0
        self.moments: dict[str, tuple[Tensor, Tensor]] = {}  # layer or parameter name -> (m, v)

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def adam_direction(self, key: str, grad: Tensor) -> Tensor:
        """``m̂ / (√v̂ + ε)`` with this hook's moments for ``key`` (the step counter is shared)."""
        beta1, beta2 = self.config.betas
        if key not in self.moments:
            self.moments[key] = (torch.zeros_like(grad), torch.zeros_like(grad))
        m, v = self.moments[key]
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        t = self.adam_step
        return (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + self.config.eps)

    @torch.no_grad()
    def after_backward(self, step: int) -> None:
        adam = self.config.optimizer == "adamw"
        if adam:
            self.adam_step += 1
        lora_ids: set[int] = set()
        for name, layer in self.layers.items():
            if not isinstance(layer, LoraLayer):
                continue
            lora_ids.update((id(layer.lora_A), id(layer.lora_B)))
            if layer.lora_A.grad is None or layer.lora_B.grad is None:
                continue
            A, B, s, delta = layer.lora_A.float(), layer.lora_B.float(), layer.scale, self.config.delta
            g_A, g_B = layer.lora_A.grad.float(), layer.lora_B.grad.float()
            if adam:
                g_A, g_B = adjusted_gradients(A, B, g_A, g_B, s, delta, sylvester=False)
                direction = self.adam_direction(name, s * (B @ g_A + g_B @ A))
                g_A, g_B = s * B.T @ direction, s * direction @ A.T
            g_A, g_B = adjusted_gradients(A, B, g_A, g_B, s, delta)
            layer.lora_A.grad.copy_(g_A)
            layer.lora_B.grad.copy_(g_B)
        if adam:
            for name, p in self.model.named_parameters():
                if p.requires_grad and p.grad is not None and id(p) not in lora_ids:
                    p.grad.copy_(self.adam_direction(name, p.grad.float()))


register(Method(
    name="lora-pro", paper="Wang, Liang, He & Tan 2024, LoRA-Pro: Are Low-Rank Adapters Properly Optimized?, "
    "arXiv 2407.18242", config_class=LoraProConfig, layer_class=LoraLayer,
    trainable="A, B (gradients adjusted towards the full gradient)", params_per_matrix=lora_params,
    hooks_class=LoraProHooks))
