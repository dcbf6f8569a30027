"""LoRA-GA (Wang, Yu & Li 2024, arXiv 2407.05000): LoRA initialised by gradient approximation.

Procedure (official code, ``peft/src/peft/tuners/lora/layer.py::lora_ga_init`` in Outsider565/LoRA-GA):

1. G = the mean gradient of the pretrained weight over the init batches (train mode).
2. ``U S Vᵀ = SVD(G)`` (top 2r components).  Direction ``ArB2r`` (default): ``A = V[:, :r]ᵀ``,
   ``B = U[:, r:2r]``, so the first step's update ``-η s²(B Bᵀ G + G Aᵀ A)`` is the best rank-2r
   approximation of the full gradient step (paper Thm. 3.1).
3. Stable scale (default, γ = 16): ``A, B <- A, B · d_out^{1/4} / √γ`` (paper eq. 11, Thm. 3.3).
4. ``W0 <- W0 − s·B A`` so the initial output is unchanged.

lorakit never materialises G by default: `sketched_svd` recovers the top-2r singular vectors from
products with thin matrices (see `lorakit.core.gradients`); ``exact=True`` forms G per layer group
(bounded by ``grad_memory_mb``) and takes its exact SVD.  The official code forms the dense G and takes
``torch.svd_lowrank(G, q=4r, niter=4)``; lorakit's sketch saves the memory of dense gradients, and
``exact=True`` gives the exact top-2r subspaces that the randomized SVD estimates.  The sketch costs 2 + 2·niter
passes over the init batches against the exact path's one: on models whose targeted weights fit the memory bound
in one group it is the slower choice (SmolLM2-135M, one batch of 8: 4.05 vs 2.18 training steps at the same peak
memory, ``benchmarks/results/speed.md``); it pays off where dense gradients of all targeted layers do not fit.

``peft_compat=True`` reproduces Hugging Face PEFT 0.21's variant instead of the official code: PEFT
multiplies B by ``S[r:2r]`` and applies the stable factor to B only.  Default False (faithful).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core import progress
from ..core.gradients import dense_gradients, materialize, sketched_svd
from ..core.layer import AdapterLayer
from ..core.linalg import randomized_svd, seeded_generator, truncated_svd
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora import LoraConfig, LoraLayer, lora_params

DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
SCALES = ("stable", "gd", "unit", "weightS")


@dataclass(frozen=True)
class LoraGaConfig(LoraConfig):
    """LoRA-GA.  ``niter``/``sketch_width``: subspace iteration (2 + 2·niter passes; width default 8r, chosen
    on SmolLM2-135M: niter=1 with width 8r matched the exact SVD's subspaces with cosines >= 0.997);
    ``exact``: dense gradient + exact SVD; ``grad_memory_mb``: bound on dense gradients held at once."""

    method: ClassVar[str] = "lora-ga"
    direction: str = "ArB2r"
    scale_mode: str = "stable"
    stable_gamma: float = 16.0
    exact: bool = False
    niter: int = 1
    sketch_width: int | None = None
    grad_memory_mb: int = 1024
    peft_compat: bool = False

    def validate(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.scale_mode not in SCALES:
            raise ConfigError(f"scale_mode must be one of {SCALES}, got {self.scale_mode!r}")
        if self.stable_gamma <= 0 or self.niter < 0 or self.grad_memory_mb <= 0:
            raise ConfigError("stable_gamma and grad_memory_mb must be positive and niter >= 0")
        if self.sketch_width is not None and self.sketch_width < 2 * self.r:
            raise ConfigError(f"sketch_width must be >= 2r = {2 * self.r}, got {self.sketch_width}")


def split_directions(u: Tensor, s: Tensor, vh: Tensor, config: LoraGaConfig,
                     generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """``(B, A, S_B)`` from the top-2r singular triplets, per ``config.direction``."""
    r = config.r
    if config.direction == "ArB2r":
        a_idx, b_idx = torch.arange(r), torch.arange(r, 2 * r)
    elif config.direction == "A2rBr":
        a_idx, b_idx = torch.arange(r, 2 * r), torch.arange(r)
    elif config.direction == "ArBr":
        a_idx, b_idx = torch.arange(1, 2 * r, 2), torch.arange(0, 2 * r, 2)
    else:
        perm = torch.randperm(2 * r, generator=generator)
        a_idx, b_idx = perm[:r], perm[r:]
    return u[:, b_idx], vh[a_idx], s[b_idx]


def init_layer(layer: LoraLayer, u: Tensor, s: Tensor, vh: Tensor, config: LoraGaConfig) -> None:
    """Set A, B from the gradient's singular triplets, scale them, and compensate W0."""
    gen = seeded_generator(config.seed, layer.name)
    B, A, s_b = split_directions(u, s, vh, config, gen)
    zeta = layer.out_features ** 0.25 / config.stable_gamma ** 0.5
    if config.peft_compat:
        B = B * s_b
        if config.scale_mode == "stable":
            B = B * zeta
    elif config.scale_mode == "stable":
        A, B = A * zeta, B * zeta
    elif config.scale_mode == "gd":
        A, B = A / layer.scale, B / layer.scale
    elif config.scale_mode == "weightS":
        _, w_s, _ = randomized_svd(layer.weight.detach(), config.r, niter=4, generator=gen)
        avg = (w_s / layer.scale).sqrt().mean()
        A, B = A * avg, B * avg
    with torch.no_grad():
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
    layer.move_base(layer.lora_B.detach() * layer.scale, layer.lora_A.detach())


def initialize(model: nn.Module, layers: dict[str, AdapterLayer], config: LoraGaConfig,
               data: Iterable[Any] | None, loss_fn: Callable[..., Tensor] | None) -> None:
    batches = materialize(data, "lora-ga")
    for name, layer in layers.items():
        if 2 * config.r > min(layer.in_features, layer.out_features):
            raise ConfigError(f"lora-ga needs 2r = {2 * config.r} <= min(d_in, d_out) = "
                              f"{min(layer.in_features, layer.out_features)} at layer '{name}'; lower r")
    if config.exact:
        for group in dense_gradients(model, layers, batches, loss_fn, config.grad_memory_mb << 20, config.seed):
            for name, grad in group.items():
                init_layer(layers[name], *truncated_svd(grad, 2 * config.r), config)
        return
    width = config.sketch_width or 8 * config.r
    factors = sketched_svd(model, layers, batches, loss_fn, 2 * config.r, width, config.niter, config.seed)
    for name, (u, s, vh) in progress.track(factors.items(), len(factors), "lora-ga: layers"):
        init_layer(layers[name], u, s, vh, config)


register(Method(
    name="lora-ga", paper="Wang, Yu & Li 2024, LoRA-GA: Low-Rank Adaptation with Gradient Approximation, "
    "arXiv 2407.05000", config_class=LoraGaConfig, layer_class=LoraLayer, trainable="A, B (W0 compensated)",
    params_per_matrix=lora_params, initialize=initialize, needs_data=True, base_offsets="every-layer"))
