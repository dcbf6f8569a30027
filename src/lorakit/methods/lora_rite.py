"""LoRA-RITE (Yen et al. 2024, arXiv 2410.20625, "LoRA Done RITE"): a transformation-invariant adaptive optimizer.

The updates of (B, A) and of (B S, S⁻¹ A) give the same ΔW for any invertible r×r S.  Per LoRA pair, each step
(the paper's algorithm; details from the authors' PyTorch port, gkevinyen5418/LoRA-RITE ``lora_rite.py``):

1. Unmagnify: QR of both factors, ``Aᵀ = Q_A R_A`` and ``B = Q_B R_B``.  A's gradient is expressed in B's
   orthonormal basis, ``ḡ_A = g_Aᵀ R_B⁻¹`` (d_in×r), and B's in A's, ``ḡ_B = g_B R_A⁻¹`` (d_out×r): these depend
   on the other factor's column space only, not on its scale or parameterisation.
2. Safety (port defaults): a factor whose ``rms(ḡ) > update_skipping`` is not updated this step; all ḡ are clipped
   together to global norm ``clip_norm``.
3. Second moment, an r×r matrix in that basis, carried over a basis change by ``P = Q_newᵀ Q_old``:
   ``V = β̂₂ P V Pᵀ + (1 − β̂₂) ḡᵀḡ / rows``.  Optional escaped mass (``escape``): ``ρ = β̂₂ (ρ + ρ_new)``,
   ``ρ_new = max(0, min(max(λ(V_old) − λ(P V Pᵀ)), tr V_old − tr P V Pᵀ))``.
4. Precondition, then momentum in the same basis: ``u = ḡ (V + ρI)^{-1/2}`` (eigen-decomposition, ``1/(√λ + ε)``),
   ``M = β̂₁ M Pᵀ + (1 − β̂₁) u``.
5. Back to the factor: ``Δ_A = (M_A R_B⁻ᵀ)ᵀ``, ``Δ_B = M_B R_A⁻ᵀ``; ``p <- p − η (Δ + λ_wd p)`` (decoupled decay).

``β̂_t = β (1 − β^{t−1}) / (1 − β^t)`` is the bias-corrected decay of the port (no separate bias correction).
Tensors that are not LoRA pairs (saved heads) get AdamW with the same betas.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.hooks import TrainingHooks
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora import LoraConfig, LoraLayer, lora_params


@dataclass(frozen=True)
class LoraRiteConfig(LoraConfig):
    """LoRA-RITE.  ``betas``/``eps``: the moments' decays and ε; ``clip_norm``: global norm of the unmagnified
    gradients (0 = off); ``update_skipping``: skip a factor whose unmagnified gradient rms exceeds it (0 = off);
    ``escape``: the escaped-mass correction."""

    method: ClassVar[str] = "lora-rite"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    clip_norm: float = 1.0
    update_skipping: float = 1.0
    escape: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        super().__post_init__()

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps < 0 or self.clip_norm < 0 or self.update_skipping < 0:
            raise ConfigError("eps, clip_norm and update_skipping must be >= 0")


def corrected_decay(beta: float, t: int) -> float:
    """``β (1 − β^{t−1}) / (1 − β^t)`` for the t-th update (t >= 1)."""
    return beta * (1 - beta ** (t - 1)) / (1 - beta ** t)


def _symmetric(m: Tensor) -> Tensor:
    return (m + m.T) / 2


class LoraRite(torch.optim.Optimizer):
    """LoRA-RITE over groups holding one ``[A, B]`` pair each (``lora_pair=True``); other groups get AdamW."""

    def __init__(self, params: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, clip_norm: float = 1.0, update_skipping: float = 1.0,
                 escape: bool = False) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "lora_pair": False}
        super().__init__(params, defaults)
        self.clip_norm, self.update_skipping, self.escape = clip_norm, update_skipping, escape

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = closure() if closure is not None else None
        pairs = []
        for group in self.param_groups:
            if not group["lora_pair"]:
                self._adamw(group)
                continue
            A, B = group["params"]
            if A.grad is None or B.grad is None:
                continue
            pairs.append((group, *self._unmagnify(A, B)))
        total = math.sqrt(sum(float(ga.square().sum() + gb.square().sum()) for _, _, _, ga, gb in pairs))
        shrink = self.clip_norm / total if self.clip_norm > 0 and total > self.clip_norm else 1.0
        for group, rot_a, rot_b, g_a, g_b in pairs:
            A, B = group["params"]
            state = self.state[A]
            state["step"] += 1
            bases = state["basis_a"], state["basis_b"]
            # A's moments live in B's basis and vice versa
            u_a = self._side(state, "a", g_a * shrink, bases[1], state["new_basis_b"], group)
            u_b = self._side(state, "b", g_b * shrink, bases[0], state["new_basis_a"], group)
            state["basis_a"], state["basis_b"] = state.pop("new_basis_a"), state.pop("new_basis_b")
            delta_a = (u_a @ torch.linalg.pinv(rot_b).T).T
            delta_b = u_b @ torch.linalg.pinv(rot_a).T
            for p, d in ((A, delta_a), (B, delta_b)):
                update = d + group["weight_decay"] * p.float()
                p.add_((-group["lr"] * update).to(p.dtype))
        return loss

    def _unmagnify(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """QR of both factors; the gradients in the other factor's basis (skipped when too large)."""
        state = self.state[A]
        q_a, rot_a = torch.linalg.qr(A.float().T)
        q_b, rot_b = torch.linalg.qr(B.float())
        if not state:
            r = A.shape[0]
            state.update(step=0, basis_a=torch.zeros_like(q_a), basis_b=torch.zeros_like(q_b),
                         m_a=torch.zeros_like(q_a), m_b=torch.zeros_like(q_b),
                         v_a=q_a.new_zeros(r, r), v_b=q_a.new_zeros(r, r), rho_a=0.0, rho_b=0.0)
        state["new_basis_a"], state["new_basis_b"] = q_a, q_b
        g_a = A.grad.float().T @ torch.linalg.pinv(rot_b)
        g_b = B.grad.float() @ torch.linalg.pinv(rot_a)
        if self.update_skipping > 0:
            g_a = g_a if float(g_a.square().mean().sqrt()) <= self.update_skipping else torch.zeros_like(g_a)
            g_b = g_b if float(g_b.square().mean().sqrt()) <= self.update_skipping else torch.zeros_like(g_b)
        return rot_a, rot_b, g_a, g_b

    def _side(self, state: dict[str, Any], side: str, g: Tensor, old_basis: Tensor, new_basis: Tensor,
              group: dict[str, Any]) -> Tensor:
        """Moments of one factor in the other factor's basis; returns the momentum M (rows × r)."""
        beta1, beta2 = group["betas"]
        t = state["step"]
        proj = new_basis.T @ old_basis
        v_old = state[f"v_{side}"]
        v_moved = torch.nan_to_num(_symmetric(proj @ v_old @ proj.T))
        b2 = corrected_decay(beta2, t)
        v = _symmetric(b2 * v_moved + (1 - b2) * _symmetric(g.T @ g) / g.shape[0])
        rho = 0.0
        if self.escape:
            eig_gap = float((torch.linalg.eigvalsh(v_old) - torch.linalg.eigvalsh(v_moved)).max().clamp_min(0))
            trace_gap = max(float(v_old.trace() - v_moved.trace()), 0.0)
            rho = b2 * (state[f"rho_{side}"] + min(eig_gap, trace_gap))
        w, q = torch.linalg.eigh(v)
        inv_root = _symmetric((q * (1 / ((w + rho).clamp_min(0).sqrt() + group["eps"]))) @ q.T)
        u = torch.nan_to_num(g @ inv_root)
        b1 = corrected_decay(beta1, t)
        m = b1 * state[f"m_{side}"] @ proj.T + (1 - b1) * u
        state[f"v_{side}"], state[f"m_{side}"], state[f"rho_{side}"] = v, m, rho
        return m

    def _adamw(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state.update(step=0, m=torch.zeros_like(p, dtype=torch.float32),
                             v=torch.zeros_like(p, dtype=torch.float32))
            state["step"] += 1
            t, grad = state["step"], p.grad.float()
            state["m"].lerp_(grad, 1 - beta1)
            state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            direction = (state["m"] / (1 - beta1 ** t)) / ((state["v"] / (1 - beta2 ** t)).sqrt() + group["eps"])
            p.add_((-group["lr"] * (direction + group["weight_decay"] * p.float())).to(p.dtype))


class LoraRiteHooks(TrainingHooks):
    """Builds `LoraRite`: one group per LoRA pair, the rest in an AdamW group."""

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        wanted = {id(p) for p in params}
        groups: list[dict[str, Any]] = []
        paired: set[int] = set()
        for layer in self.layers.values():
            if isinstance(layer, LoraLayer) and id(layer.lora_A) in wanted and id(layer.lora_B) in wanted:
                groups.append({"params": [layer.lora_A, layer.lora_B], "lora_pair": True})
                paired.update((id(layer.lora_A), id(layer.lora_B)))
        others = [p for p in params if id(p) not in paired]
        if others:
            groups.append({"params": others, "lora_pair": False})
        c = self.config
        options: dict[str, Any] = {"betas": c.betas, "eps": c.eps, "clip_norm": c.clip_norm,
                                   "update_skipping": c.update_skipping, "escape": c.escape}
        options.update(kwargs)
        return LoraRite(groups, lr=lr, weight_decay=weight_decay, **options)


register(Method(
    name="lora-rite", paper="Yen et al. 2024, LoRA Done RITE: Robust Invariant Transformation Equilibration for "
    "LoRA Optimization, arXiv 2410.20625", config_class=LoraRiteConfig,
    layer_class=LoraLayer, trainable="A, B (transformation-invariant optimizer)", params_per_matrix=lora_params,
    hooks_class=LoraRiteHooks))
