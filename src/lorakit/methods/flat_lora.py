"""Flat-LoRA (Li et al. 2025, arXiv 2409.14396): LoRA trained for a flat loss in the FULL weight space.

Each step the loss is taken at randomly perturbed merged weights (the paper's Bayesian expected loss)::

    W' = W0 + s·B A,   ε_{i,:} ~ N(0, σ_t² ‖W'_{i,:}‖² / d_in · I)     (filter-wise, i.e. per output row)
    σ_t = σ · (1 − cos(π t / T)) / 2                                    (cosine ramp from 0 to σ over T steps)

As in the official code (nblt/Flat-LoRA, ``FlatLoraTrainer.training_step``): the row norms are taken on the merged
weight, the noise is drawn anew every ``perturb_every`` steps from a seed (only the seed and the d_out row scales
are kept, never ε), and it is gone before the optimizer update.  Gradients reach A and B at the perturbed point.

Where the official code adds ε to W0 in place and subtracts it after backward, lorakit never writes W0: while a
perturbation is set, the layer computes ``(W0 + ε) x`` with a custom autograd function that regenerates ε from
the seed in backward instead of saving it.  Same loss and gradients, no stored noise, and W0 stays bit-exact
(in-place add/subtract would drift by a rounding error per step, badly in bf16).  The seed is derived from
``config.seed``, the layer name and the noise window, so runs reproduce.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer
from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .lora import LoraConfig, LoraLayer, lora_params


@dataclass(frozen=True)
class FlatLoraConfig(LoraConfig):
    """Flat-LoRA.  ``sigma``: the final noise level ρ (official default 0.05); ``perturb_every``: steps a noise
    draw is kept (the official ``T``, 1 = a new draw every step)."""

    method: ClassVar[str] = "flat-lora"
    sigma: float = 0.05
    perturb_every: int = 1

    def validate(self) -> None:
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")
        if self.perturb_every < 1:
            raise ConfigError(f"perturb_every must be >= 1, got {self.perturb_every}")


def noise_seed(seed: int, name: str, window: int) -> int:
    """The seed of layer ``name``'s noise in window ``window`` (stable across runs and machines)."""
    return (seed * 1_000_003 + zlib.crc32(f"{name}@{window}".encode())) % (2**63)


def flat_noise(weight: Tensor, seed: int, row_std: Tensor) -> Tensor:
    """``ε = row_std[:, None] · N(0, 1)`` drawn from ``seed`` on the weight's device (float32)."""
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    return torch.randn(weight.shape, generator=gen, device=weight.device) * row_std[:, None]


class _PerturbedLinear(torch.autograd.Function):
    """``F.linear(x, W + ε, b)``; backward regenerates ε from the seed (W and b are frozen)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, seed: int, row_std: Tensor) -> Tensor:
        ctx.save_for_backward(weight, row_std)
        ctx.seed = seed
        perturbed = (weight.float() + flat_noise(weight, seed, row_std)).to(weight.dtype)
        return F.linear(x, perturbed, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight, row_std = ctx.saved_tensors
        perturbed = (weight.float() + flat_noise(weight, ctx.seed, row_std)).to(grad_out.dtype)
        return grad_out @ perturbed, None, None, None, None


class FlatLoraLayer(LoraLayer):
    """A LoRA layer whose base is evaluated at ``W0 + ε`` while `perturbation` is set (seed, row scales)."""

    def __init__(self, base: nn.Module, config: FlatLoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.perturbation: tuple[int, Tensor] | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.perturbation is None or self.merged or self.disabled:
            return super().forward(x)
        out = _PerturbedLinear.apply(x, self.weight, self.base.bias, *self.perturbation)
        return out + self.delta(x).to(out.dtype)

    @torch.no_grad()
    def row_scales(self, sigma: float) -> Tensor:
        """``σ ‖W'_{i,:}‖ / √d_in`` with ``W' = W0 + s·B A`` (float32, d_out).  A W0 sharded by FSDP2 is gathered
        for this layer only (every rank calls this in the same order)."""
        weight = self.weight.full_tensor() if isinstance(self.weight, DTensor) else self.weight
        merged = weight.float() + self.delta_weight().float()
        return sigma * torch.linalg.vector_norm(merged, dim=1) / math.sqrt(self.in_features)


class FlatLoraHooks(TrainingHooks):
    """Sets each layer's perturbation before the forward and clears it after backward (before the update)."""

    state_attrs = ("sigma_now",)

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: FlatLoraConfig) -> None:
        super().__init__(model, layers, config)
        self.sigma_now = 0.0

    def current_sigma(self, step: int) -> float:
        """``σ_t = σ (1 − cos(π t / T)) / 2``."""
        if self.total_steps is None:
            raise TrainingError("flat-lora ramps its noise over the planned steps: call "
                                "hooks.on_train_begin(total_steps) before training")
        return self.config.sigma * 0.5 * (1 - math.cos(math.pi * min(step / self.total_steps, 1.0)))

    def layers_of(self) -> dict[str, FlatLoraLayer]:
        return {n: layer for n, layer in self.layers.items() if isinstance(layer, FlatLoraLayer)}

    def before_forward(self, step: int) -> None:
        window = step // self.config.perturb_every
        layers = self.layers_of()
        if step % self.config.perturb_every or any(layer.perturbation is not None for layer in layers.values()):
            return  # the current draw is kept (a window, or several micro-batches of one step)
        self.sigma_now = self.current_sigma(step)
        for name, layer in layers.items():
            layer.perturbation = (noise_seed(self.config.seed, name, window), layer.row_scales(self.sigma_now))

    def after_backward(self, step: int) -> None:
        if (step + 1) % self.config.perturb_every == 0:
            for layer in self.layers_of().values():
                layer.perturbation = None

    def metrics(self) -> dict[str, float]:
        return {"flat_sigma": self.sigma_now}


register(Method(
    name="flat-lora", paper="Li, He, Li, Wang, Shang & Huang 2025, Flat-LoRA: Low-Rank Adaptation over a Flat Loss "
    "Landscape, arXiv 2409.14396", config_class=FlatLoraConfig, layer_class=FlatLoraLayer,
    trainable="A, B (loss at random full-weight perturbations)", params_per_matrix=lora_params,
    hooks_class=FlatLoraHooks))
