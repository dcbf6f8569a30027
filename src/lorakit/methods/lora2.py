"""LoRA² (Zhang, Xiong et al. 2024, arXiv 2408.06854; Neurocomputing 2025): multi-scale LoRA.  Two small LoRAs
span the two "planes" of an AdaLoRA-style SVD form, and only their small factors are scored for pruning.

Per adapted matrix (official code ``loralib/loralib/LoRA2.py`` in Godz-z/LoRA-2; its names in brackets)::

    Q = B1 A1   (r×d_in),   A1 = lora_A1 [lora_A] (k×d_in),  B1 = lora_B1 [lora_B] (r×k)
    P = B2 A2   (d_out×r),  A2 = lora_A2 [lora_aa] (k×r),    B2 = lora_B2 [lora_bb] (d_out×k)
    ΔW = (α/r) · P diag(E) Q,   E = lora_E (r singular values, pruned)

k (``inner_r``) is hard-coded to 8 in the official code (``LoRA2.py`` line 45).  E = 0 at init (the output is
unchanged).  The forward runs ``B2 (A2 ((α/r) E ⊙ (B1 (A1 x))))``: only k- and r-wide intermediates.

Init of the four factors: ``plane_init="normal"`` (default) is the official N(0, 0.02²) (``LoRA2.py`` lines
91-94, ``nn.init.normal_(..., std=0.02)``); ``"orthogonal"`` (choice) draws each as a random semi-orthogonal matrix
(orthonormal rows or columns, whichever its shape allows), the point the orthogonality regularizer holds them at.
0.02 comes from AdaLoRA, where it gives the 768-dimensional singular vectors a norm near 1; on LoRA²'s k×r and r×k
factors it gives norms near 0.06, so the update starts small and E's gradient grows as the regularizer grows the
factors (`benchmarks/results/claims.md` measures the default).

* Orthogonality (official ``compute_orth_regu``, γ = 0.1): each plane's factors orthonormal,
  ``‖A1A1ᵀ − I‖ + ‖B1ᵀB1 − I‖ + ‖A2A2ᵀ − I‖ + ‖B2ᵀB2 − I‖`` (Frobenius, all k×k), plus the two planes mutually
  orthogonal: ``‖Q P‖_F`` = the inner products between the rows of Q (the input-side plane) and the columns of P (the
  output-side plane).  The released cross term is broken: ``compute_orth_regu`` (``LoRA2.py`` lines 590-622) forms
  ``product`` from detached copies of the four factors (lines 594-601, 614-617) and never uses it; line 619 adds
  ``‖para_cov − I‖`` once more for every parameter visited after the four copies exist, ``para_cov`` being the
  latest factor's Gram matrix built from the live parameter (lines 603, 609): repeated orthogonality terms, no
  cross term.  This is the intended term.  Q's rows live in R^{d_in} and P's columns in R^{d_out}, so the term exists
  only for square matrices (d_in = d_out); for the others there is no shared space and it is left out (choice,
  [unconfirmed] in the paper).  ``Q P = B1 (A1 B2) A2`` costs one k×k product.  Terms are averaged, as the code.
* Importance: AdaLoRA's sensitivity × uncertainty EMAs (β1 = β2 = 0.85), but computed only for the small factors
  B1 (r×k), A2 (k×r) and E; per singular value ``S_i = s(E_i) + mean_j s(B1_ij) + mean_j s(A2_ji)`` (official
  ``mask_to_target_rank``).  AdaLoRA scores r·(d_in + d_out + 1) entries per matrix, LoRA² r·(2k + 1)
  (`SvdBudgetHooks.scored_elements`; the paper's "≈98.5 % fewer sensitivity computations").
* Budget: AdaLoRA's cubic schedule and global kth-value masking of E (`lorakit.methods.adalora`), unchanged, with
  its defaults: the schedule scaled with the run length.
* Defaults from the official SST-2 script (``scripts/run_debertav3_sst2.sh``, Godz-z/LoRA-2@8b8cfbb): r = 8
  singular values, final budget ``target_r = 2``, α = 16 (scale 2), k = 8, γ = 0.1; the schedule's t_i / t_f / ΔT
  are AdaLoRA's fractions of the run (that script's 6000 / 22000 / 100 of 50 520 steps).  The scripts differ by
  task (``--lora_r`` / ``--target_rank`` / ``--lora_alpha`` / ``--reg_orth_coef``; steps at batch 32)::

      task   r  target  α   γ    t_i / t_f / ΔT        steps
      CoLA   4  3       32  0.1  800 / 3500 / 10       6 700
      MNLI   8  3       16  0.1  8000 / 50000 / 100    85 904
      MRPC   8  1       32  0.1  600 / 1800 / 1        3 450
      QNLI   8  2       32  0.1  2000 / 8000 / 100     16 370
      QQP    8  3       16  0.1  8000 / 25000 / 100    227 420
      RTE    4  3       32  0.3  600 / 1800 / 1        3 900
      SST-2  8  2       16  0.1  6000 / 22000 / 100    50 520
      STS-B  4  1       32  0.3  800 / 2000 / 10       4 500

  rank(ΔW) <= min(r, k): with k < r the budget only binds once it falls below k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..errors import ConfigError
from .adalora import AdaLoraConfig, SvdBudgetHooks, SvdLayer, gram_distance, normal
from .adaptive import keep_ranks

PLANE_INITS = ("orthogonal", "normal")


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """A random ``rows×cols`` matrix with orthonormal columns (rows >= cols) or orthonormal rows."""
    q, r = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    return q if rows >= cols else q.T


@dataclass(frozen=True)
class Lora2Config(AdaLoraConfig):
    """LoRA².  AdaLoRA's fields (``r`` = singular values per matrix, α, ``target_r``, the budget schedule, γ) with
    the official SST-2 script's values (8 -> 2, α = 16), plus ``inner_r`` = k, the rank of each plane's LoRA
    (official: 8), and ``plane_init``: ``"normal"`` (official N(0, 0.02²)) or ``"orthogonal"``."""

    method: ClassVar[str] = "lora2"
    r: int = 8
    alpha: float | None = 16
    target_r: int | None = 2
    inner_r: int = 8
    plane_init: str = "normal"

    def validate(self) -> None:
        super().validate()
        if self.inner_r < 1:
            raise ConfigError(f"inner_r (the rank k of each plane) must be >= 1, got {self.inner_r}")
        if self.plane_init not in PLANE_INITS:
            raise ConfigError(f"plane_init must be one of {PLANE_INITS}, got {self.plane_init!r}")


class Lora2Layer(SvdLayer):
    """``lora_A1``, ``lora_B1`` (plane Q), ``lora_A2``, ``lora_B2`` (plane P), ``lora_E``; see the module docstring."""

    def __init__(self, base: nn.Module, config: Lora2Config, name: str = "") -> None:
        AdapterLayer.__init__(self, base, config, name)  # SvdLayer's P, λ, Q are replaced by the two planes
        r, k = config.r, config.inner_r
        smallest = min(self.in_features, self.out_features)
        if k > smallest:
            raise ConfigError(f"inner_r={k} is larger than min(d_in, d_out) = {smallest} of layer '{name}'; lower "
                              "inner_r or exclude that layer")
        self.scale = config.scale
        self.square = self.in_features == self.out_features
        device, dtype = self.adapter_device_dtype()
        shapes = {"lora_A1": (k, self.in_features), "lora_B1": (r, k), "lora_A2": (k, r),
                  "lora_B2": (self.out_features, k)}
        gen = seeded_generator(config.seed, name)
        for key, shape in shapes.items():
            if init_skipped():
                value = torch.zeros(shape)
            elif config.plane_init == "orthogonal":
                value = semi_orthogonal(*shape, gen)
            else:
                value = normal(shape, gen)
            setattr(self, key, nn.Parameter(value.to(device, dtype)))
        E = torch.zeros(r) if init_skipped() or config.init_weights else torch.randn(r, generator=gen)
        self.lora_E = nn.Parameter(E.to(device, dtype))

    def plane_q(self) -> Tensor:
        return self.lora_B1 @ self.lora_A1

    def plane_p(self) -> Tensor:
        return self.lora_B2 @ self.lora_A2

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(F.linear(self.dropout(x.to(self.lora_A1.dtype)), self.lora_A1), self.lora_B1)
        return F.linear(F.linear(h * (self.lora_E * self.scale), self.lora_A2), self.lora_B2)

    def delta_weight(self) -> Tensor:
        return (self.plane_p() * (self.lora_E * self.scale)) @ self.plane_q()

    def as_lora(self) -> tuple[Tensor, Tensor]:
        return keep_ranks(self.plane_p() * (self.lora_E * self.scale), self.plane_q(), self.lora_E != 0)

    def importance_tensors(self) -> dict[str, nn.Parameter]:
        """Only the small matrices: B1 (r×k), A2 (k×r) and E (r)."""
        return {"lora_B1": self.lora_B1, "lora_A2": self.lora_A2, "lora_E": self.lora_E}

    @staticmethod
    def triplet_scores(s: dict[str, Tensor]) -> Tensor:
        return s["lora_E"] + s["lora_B1"].mean(dim=1) + s["lora_A2"].mean(dim=0)

    def orth_terms(self) -> list[Tensor]:
        terms = [gram_distance(self.lora_A1, rows=True), gram_distance(self.lora_B1, rows=False),
                 gram_distance(self.lora_A2, rows=True), gram_distance(self.lora_B2, rows=False)]
        if self.square:
            terms.append(torch.linalg.matrix_norm(self.lora_B1 @ (self.lora_A1 @ self.lora_B2) @ self.lora_A2))
        return terms


def lora2_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    k, r = config.inner_r, config.r
    return k * (d_in + d_out) + 2 * r * k + r


register(Method(
    name="lora2", paper="Zhang, Xiong et al. 2024, LoRA²: Multi-Scale Low-Rank Approximations for Fine-Tuning Large "
    "Language Models, arXiv 2408.06854", config_class=Lora2Config, layer_class=Lora2Layer,
    trainable="A1, B1, A2, B2, E", params_per_matrix=lora2_params, hooks_class=SvdBudgetHooks))
