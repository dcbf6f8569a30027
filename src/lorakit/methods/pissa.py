"""PiSSA (Meng et al. 2024, arXiv 2404.02948): adapt the principal singular components of W0.

``W0 = U S Vᵀ``; ``B = U_r (S_r/s)^{1/2}``, ``A = (S_r/s)^{1/2} V_rᵀ`` and the frozen residual
``W_res = W0 − s·B A`` (paper eq. 2-4; s = α/r, 1 by default).  ``svd="full"`` takes the exact SVD
(PEFT's ``"pissa"``); ``svd="gram"`` the eigendecomposition of the smaller Gram matrix, exact for the
top-r triplets and several times faster (`lorakit.core.linalg.gram_svd`); ``svd_niter=k`` the seeded
randomized SVD with k power iterations (the paper's fast variant, PEFT's ``"pissa_niter_k"``), which
on the flat spectra of pretrained weights does not converge to the principal subspace (see
``benchmarks/results/speed.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..core.layer import init_skipped
from ..core.linalg import gram_svd, randomized_svd, truncated_svd
from ..core.registry import Method, register
from ..errors import ConfigError
from .lora import LoraConfig, LoraLayer, lora_params


@dataclass(frozen=True)
class PissaConfig(LoraConfig):
    method: ClassVar[str] = "pissa"
    svd: str = "full"
    svd_niter: int | None = None
    svd_oversample: int | None = None

    def validate(self) -> None:
        if self.svd not in ("full", "gram"):
            raise ConfigError(f"svd must be 'full' or 'gram' (or set svd_niter for the randomized SVD), "
                              f"got {self.svd!r}")
        if self.svd_niter is not None and self.svd_niter < 0:
            raise ConfigError(f"svd_niter must be >= 0 or None (exact SVD), got {self.svd_niter}")


def principal_factors(weight: Tensor, config: PissaConfig, scale: float,
                      generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``s·B A`` the best rank-r approximation of ``weight``."""
    if config.svd_niter is None:
        u, s, vh = (gram_svd if config.svd == "gram" else truncated_svd)(weight, config.r)
    else:
        u, s, vh = randomized_svd(weight, config.r, niter=config.svd_niter,
                                  oversample=config.svd_oversample, generator=generator)
    root = (s / scale).sqrt()
    return u * root, root[:, None] * vh


class PissaLayer(LoraLayer):
    def __init__(self, base: nn.Module, config: PissaConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        if not init_skipped():
            self.move_base(self.lora_B.detach() * self.scale, self.lora_A.detach())

    def init_factors(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return principal_factors(self.weight.detach(), self.config, self.scale, generator)


register(Method(
    name="pissa", paper="Meng, Wang & Zhang 2024, PiSSA: Principal Singular Values and Singular Vectors "
    "Adaptation of Large Language Models, arXiv 2404.02948", config_class=PissaConfig, layer_class=PissaLayer,
    trainable="A, B (W0 residual frozen)", params_per_matrix=lora_params, base_offsets="every-layer"))
