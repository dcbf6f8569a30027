"""LoRA-XS (Bałazy et al. 2024, arXiv 2405.17604): a trainable r×r core between frozen SVD factors.

``W = W0 + s · B R A`` with ``B = U_r`` and ``A = Σ_r V_rᵀ`` from the truncated SVD of W0 (frozen),
and ``R ~ N(0, σ²)``, σ = 1e-5, the only trainable tensor (r² parameters per matrix).  W0 is not
modified; the initial output moves by O(σ).  The forward is ``W0 x + s · B (R (A dropout(x)))``.
`CoreLayer` is shared with LoRA-SB, which has the same architecture with a different init.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import randomized_svd, seeded_generator, truncated_svd
from ..core.registry import Method, register
from ..errors import ConfigError


@dataclass(frozen=True)
class LoraXsConfig(AdapterConfig):
    """``svd_niter=None``: exact SVD; an integer: seeded randomized SVD.  ``init_std``: σ of R."""

    method: ClassVar[str] = "lora-xs"
    init_std: float = 1e-5
    svd_niter: int | None = None

    def validate(self) -> None:
        if self.init_std < 0:
            raise ConfigError(f"init_std must be >= 0, got {self.init_std}")


class CoreLayer(AdapterLayer):
    """Frozen ``lora_B`` (d_out×r) and ``lora_A`` (r×d_in) buffers around a trainable ``lora_R`` (r×r)."""

    def __init__(self, base: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.scale = config.scale
        device, dtype = self.adapter_device_dtype()
        r = config.r
        self.register_buffer("lora_B", torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.register_buffer("lora_A", torch.zeros(r, self.in_features, device=device, dtype=dtype))
        self.lora_R = nn.Parameter(torch.zeros(r, r, device=device, dtype=dtype))

    @torch.no_grad()
    def set_factors(self, B: Tensor, R: Tensor, A: Tensor) -> None:
        self.lora_B.copy_(B)
        self.lora_R.copy_(R)
        self.lora_A.copy_(A)

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(F.linear(h, self.lora_R) * self.scale, self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.scale) @ self.lora_R @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        return (self.lora_B * self.scale) @ self.lora_R, self.lora_A


class LoraXsLayer(CoreLayer):
    def __init__(self, base: nn.Module, config: LoraXsConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        if init_skipped():
            return
        gen = seeded_generator(config.seed, name)
        w = self.weight.detach()
        if config.svd_niter is None:
            u, s, vh = truncated_svd(w, config.r)
        else:
            u, s, vh = randomized_svd(w, config.r, niter=config.svd_niter, generator=gen)
        std = config.init_std if config.init_weights else 0.1
        R = torch.randn(config.r, config.r, generator=gen) * std
        self.set_factors(u, R.to(u.device), s[:, None] * vh)


def core_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * config.r


register(Method(
    name="lora-xs", paper="Bałazy et al. 2024, LoRA-XS: Low-Rank Adaptation with Extremely Small Number of "
    "Parameters, arXiv 2405.17604", config_class=LoraXsConfig, layer_class=LoraXsLayer,
    trainable="R (r×r); B, A frozen", params_per_matrix=core_params, keeps_output=False))
