"""Bone / MiSS (Kang & Yin 2024, arXiv 2409.15371; PEFT's ``MissConfig``): one shared block, tiled over W.

Variants (PEFT ``init_weights`` ``True`` / ``"bat"`` / ``"mini"``), all zero-initialised (output unchanged):

* ``miss`` (default): trainable ``D ∈ R^{r×d_out}``.  Split the input dimension into chunks of r (the last chunk
  zero-padded); every chunk gets the same block: ``ΔW[:, k·r:(k+1)·r] = Dᵀ`` (``ΔW_{:,i} = Dᵀ_{:, i mod r}``).
  Efficient forward: ``ΔW x = Dᵀ Σ_k x_k`` (sum the input chunks first, then one r → d_out product).
* ``mini``: ``D ∈ R^{r×mini_r}`` repeated ``d_out / mini_r`` times along the output dimension, then as ``miss``.
* ``bat`` (Block-Affine Transformation, the "weight guide"): ``Bk ∈ R^{(d_out/r)×r×r}``; with W0 cut into r×r
  blocks ``W_ij`` (i: output block, j: input block), ``ΔW_ij = W_ij Bk_i + Bk_i`` (Bk_i shared along j).  The update
  depends on W0, so the forward materialises ΔW; merge is exact and unmerge inverts it exactly,
  ``W_ij = (W'_ij − Bk_i)(I + Bk_i)^{-1}`` (PEFT's reverse).  Needs r | d_in and r | d_out.

Export: ``miss`` and ``mini`` are exactly low-rank, ``ΔW = Dᵀ S`` with the chunk-summing matrix
``S_{j,i} = [i mod r = j]`` (as PEFT's ``convert_to_lora`` notes), so `lorakit.export_peft` writes them exactly
at rank r.  ``bat`` is not low-rank: `export_peft_approx` writes the truncated SVD of each update (at a rank or
an energy threshold) and returns the relative error; `lorakit.merge` gives the exact model.
Dropout (``config.dropout``) acts on the adapter's input in every variant (PEFT applies none for ``bat``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..core.state import get_state
from ..errors import ConfigError, LorakitError
from .dora import write_peft_lora

logger = logging.getLogger(__name__)

VARIANTS = ("miss", "bat", "mini")


@dataclass(frozen=True)
class BoneConfig(AdapterConfig):
    """Bone / MiSS.  ``variant``: ``"miss"`` (tiled shared block), ``"bat"`` (weight guide) or ``"mini"``
    (a ``r×mini_r`` block repeated along d_out).  ``r`` is the block size; the scale is fixed to 1 (as PEFT)."""

    method: ClassVar[str] = "bone"
    variant: str = "miss"
    mini_r: int = 1

    def validate(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.mini_r < 1:
            raise ConfigError(f"mini_r must be a positive integer, got {self.mini_r}")


def chunk_sum_matrix(r: int, d_in: int) -> Tensor:
    """``S ∈ {0,1}^{r×d_in}``, ``S_{j,i} = [i mod r = j]``: ``S x`` sums the (zero-padded) input chunks."""
    s = torch.zeros(r, d_in)
    idx = torch.arange(d_in)
    s[idx % r, idx] = 1.0
    return s


class BoneLayer(AdapterLayer):
    """``miss_block``: D (r×d_out), the mini block (r×mini_r), or Bat's Bk (d_out/r × r × r)."""

    def __init__(self, base: nn.Module, config: BoneConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        r, d_out, d_in = config.r, self.out_features, self.in_features
        if config.variant == "bat":
            if d_in % r or d_out % r:
                raise ConfigError(f"bone variant 'bat' needs r={r} to divide d_in={d_in} and d_out={d_out} at "
                                  f"layer '{name}'; choose another r or exclude that layer")
            shape: tuple[int, ...] = (d_out // r, r, r)
        elif config.variant == "mini":
            if d_out % config.mini_r:
                raise ConfigError(f"bone variant 'mini' needs mini_r={config.mini_r} to divide d_out={d_out} at "
                                  f"layer '{name}'")
            shape = (r, config.mini_r)
        else:
            shape = (r, d_out)
        block = torch.zeros(shape)
        if not config.init_weights and not init_skipped():  # test switch: a random block (PEFT's kaiming init)
            gen = seeded_generator(config.seed, name)
            bound = 1.0 / math.sqrt(math.prod(shape[1:]))
            block = (torch.rand(shape, generator=gen) * 2 - 1) * bound
        device, dtype = self.adapter_device_dtype()
        self.miss_block = nn.Parameter(block.to(device, dtype))
        self.variant = config.variant
        self.pad = (-d_in) % r

    def block(self) -> Tensor:
        """D (r×d_out) for ``miss``/``mini``."""
        if self.variant == "mini":
            return self.miss_block.repeat(1, self.out_features // self.config.mini_r)
        return self.miss_block

    def delta(self, x: Tensor) -> Tensor:
        x = self.dropout(x.to(self.miss_block.dtype))
        if self.variant == "bat":
            return F.linear(x, self.delta_weight())
        r = self.config.r
        if self.pad:
            x = F.pad(x, (0, self.pad))
        return x.reshape(*x.shape[:-1], -1, r).sum(dim=-2) @ self.block()

    def bat_update(self, w0: Tensor) -> Tensor:
        """``ΔW_ij = W_ij Bk_i + Bk_i`` for W0 in (d_out, d_in) layout."""
        r, d_out, d_in = self.config.r, self.out_features, self.in_features
        blocks = w0.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)  # [j, i] = W_ij
        update = blocks @ self.miss_block + self.miss_block
        return update.permute(1, 2, 0, 3).reshape(d_out, d_in)

    def unmerged_weight(self) -> Tensor:
        """W0 (float32); when a ``bat`` update is merged, ``W_ij = (W'_ij − Bk_i)(I + Bk_i)^{-1}``."""
        w = self.weight.to(self.miss_block.dtype)
        if not (self.merged and self.variant == "bat"):
            return w
        r, d_out, d_in = self.config.r, self.out_features, self.in_features
        blocks = w.reshape(d_out // r, r, d_in // r, r).permute(2, 0, 1, 3)
        eye = torch.eye(r, device=w.device, dtype=w.dtype)
        w0 = torch.linalg.solve((eye + self.miss_block).mT, (blocks - self.miss_block).mT).mT
        return w0.permute(1, 2, 0, 3).reshape(d_out, d_in)

    def delta_weight(self) -> Tensor:
        if self.variant == "bat":
            return self.bat_update(self.unmerged_weight())
        idx = torch.arange(self.in_features, device=self.miss_block.device) % self.config.r
        return self.block().T[:, idx]

    def as_lora(self) -> tuple[Tensor, Tensor] | None:
        if self.variant == "bat":
            return None
        return self.block().T, chunk_sum_matrix(self.config.r, self.in_features).to(self.miss_block)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged and self.variant == "bat":
            self._add_to_base(self.unmerged_weight() - self.weight.to(self.miss_block.dtype))
            self.merged = False
            return
        super().unmerge()


def bone_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    if config.variant == "bat":
        return d_out * config.r
    if config.variant == "mini":
        return config.r * config.mini_r
    return config.r * d_out


def energy_rank(s: Tensor, energy: float) -> int:
    """The smallest k whose top-k singular values hold ``energy`` of Σσ² (PEFT's ``_find_cutoff_index``)."""
    cumulative = torch.cumsum(s.double() ** 2, dim=0)
    return min(int(torch.searchsorted(cumulative, energy * cumulative[-1]).item()) + 1, s.numel())


@torch.no_grad()
def export_peft_approx(model: nn.Module, directory: str | os.PathLike, rank: int | None = None,
                       energy: float | None = None, task_type: str | None = None) -> float:
    """Write a PEFT LoRA holding the truncated SVD of every layer's update; return the relative error
    ``‖ΔW − B A‖_F / ‖ΔW‖_F`` over all layers.  Give ``rank`` (the same for every layer) or ``energy`` in (0, 1]
    (per layer, the fewest singular values holding that share of Σσ²); ranks are zero-padded to the largest."""
    if (rank is None) == (energy is None):
        raise LorakitError("give exactly one of rank= (an int) or energy= (a share of Σσ² in (0, 1])")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise LorakitError(f"energy must be in (0, 1], got {energy}")
    state = get_state(model)
    if any(layer.merged for layer in state.layers.values()):
        raise LorakitError("the adapter is merged into the base weights; unmerge(model) before exporting")
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    err_sq = total_sq = 0.0
    for name, layer in state.layers.items():
        update = layer.delta_weight().float()
        u, s, vh = torch.linalg.svd(update, full_matrices=False)
        k = rank if rank is not None else energy_rank(s, energy)
        if not 1 <= k <= s.numel():
            raise LorakitError(f"rank {k} is outside [1, {s.numel()}] at layer '{name}'")
        factors[name] = (u[:, :k] * s[:k], vh[:k])
        err_sq += float((s[k:] ** 2).sum())
        total_sq += float((s ** 2).sum())
    write_peft_lora(model, directory, factors, task_type=task_type)
    relative = math.sqrt(err_sq / total_sq) if total_sq > 0 else 0.0
    logger.info("exported a rank-%d SVD approximation; relative error of the update %.3g",
                max(b.shape[1] for b, _ in factors.values()), relative)
    return relative


register(Method(
    name="bone", paper="Kang & Yin 2024, Bone / MiSS: Revisiting the Trade-off in LoRA with an Efficient "
    "Shard-Sharing Structure, arXiv 2409.15371", config_class=BoneConfig, layer_class=BoneLayer,
    trainable="shared block D (r×d_out; Bat: d_out/r blocks r×r; mini: r×mini_r)", params_per_matrix=bone_params))
