"""Server aggregation of low-rank adapters, as pure functions over ``name -> tensor`` dicts.

Keys are `lorakit.save`'s names: ``{layer}.lora_A`` (r×d_in), ``{layer}.lora_B`` (d_out×r),
``{layer}.lora_R`` (r×r) and ``modules_to_save.{module}.{param}`` (trained heads, averaged as they are).
Every average is weighted by the ``counts`` the server passes: all ones for the official Fed-SB code's
unweighted mean (its default, for every strategy), or the clients' sample counts (FedAvg, McMahan et al. 2017).

* Fed-SB (Singhal, Ponkshe et al. 2025, arXiv 2502.15436): B and A are one shared LoRA-SB init, frozen;
  clients train R and the server averages it.  Exact: ``B (Σ wᵢ Rᵢ) A = Σ wᵢ B Rᵢ A``.
* FedIT (Zhang et al. 2024, "Towards Building the Federated GPT", arXiv 2305.05644): average A and B
  separately; the product of means is not the mean of products.
* FFA-LoRA (Sun et al. 2024, "Improving LoRA in Privacy-preserving Federated Learning", arXiv 2403.12313):
  A stays at its shared random init; only B trains and is averaged, which makes the aggregate exact.
* FedEx-LoRA (Singhal et al. 2025, "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning
  of Foundation Models", arXiv 2410.09432): average A and B, and fold the residual
  ``s·(Σ wᵢ Bᵢ Aᵢ − B̄ Ā)`` into the base weight so the model equals the exact average of the updates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..core.linalg import seeded_generator
from ..io.persistence import SAVED_PREFIX
from ..methods.lora_sb import LoraSbConfig, sign_step_factors
from .errors import FedError

Tensors = Mapping[str, Tensor]


@dataclass(frozen=True)
class StrategySpec:
    """What a strategy trains on the clients and how the server combines it.

    method: the lorakit method attached on every client.  trainable: adapter tensors clients train and
    upload (plus every ``modules_to_save`` head).  frozen: adapter tensors identical on all clients and
    never trained (Fed-SB's B, A come from the server once; FFA-LoRA's A from the shared seed).
    """

    name: str
    paper: str
    method: str
    trainable: tuple[str, ...]
    frozen: tuple[str, ...] = ()
    server_init: bool = False
    folds_residual: bool = False

    def is_trainable(self, key: str) -> bool:
        return key.startswith(SAVED_PREFIX) or key.rsplit(".", 1)[-1] in self.trainable

    def is_frozen(self, key: str) -> bool:
        return not key.startswith(SAVED_PREFIX) and key.rsplit(".", 1)[-1] in self.frozen


STRATEGIES: dict[str, StrategySpec] = {
    "fed-sb": StrategySpec("fed-sb", "Singhal, Ponkshe et al. 2025, Fed-SB, arXiv 2502.15436", "lora-sb",
                           ("lora_R",), ("lora_B", "lora_A"), server_init=True),
    "fedit": StrategySpec("fedit", "Zhang et al. 2024, Towards Building the Federated GPT (FedIT), arXiv 2305.05644",
                          "lora", ("lora_A", "lora_B")),
    "ffa-lora": StrategySpec("ffa-lora", "Sun et al. 2024, FFA-LoRA, arXiv 2403.12313", "lora", ("lora_B",),
                             ("lora_A",)),
    "fedex-lora": StrategySpec("fedex-lora", "Singhal et al. 2025, FedEx-LoRA, arXiv 2410.09432", "lora",
                               ("lora_A", "lora_B"), folds_residual=True),
}


@dataclass
class Aggregate:
    """The new global trainable tensors and, for FedEx-LoRA, each layer's residual to add to its base weight
    (``d_out × d_in``, in the ``(d_out, d_in)`` layout of `AdapterLayer.weight`)."""

    tensors: dict[str, Tensor]
    residuals: dict[str, Tensor] = field(default_factory=dict)


def normalized_weights(counts: Sequence[float]) -> list[float]:
    """Sample counts as weights that sum to 1."""
    if not counts or any(c <= 0 for c in counts):
        raise FedError(f"aggregation needs at least one update and positive sample counts, got {list(counts)}")
    total = float(sum(counts))
    return [c / total for c in counts]


def weighted_mean(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``Σ wᵢ tᵢ`` accumulated in float64, returned in the inputs' dtype."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += w * t.detach().to("cpu", torch.float64)
    return acc.to(tensors[0].dtype)


def average(updates: Sequence[Tensors], counts: Sequence[float]) -> dict[str, Tensor]:
    """Key-wise sample-weighted mean of client tensors (every update must hold the same keys)."""
    weights = normalized_weights(counts)
    keys = set(updates[0])
    for i, u in enumerate(updates[1:], 1):
        if set(u) != keys:
            raise FedError(f"update {i} holds keys {sorted(set(u) ^ keys)[:5]} that update 0 does not (or the reverse)")
    return {k: weighted_mean([u[k] for u in updates], weights) for k in updates[0]}


def fed_sb(updates: Sequence[Tensors], counts: Sequence[float]) -> Aggregate:
    """Fed-SB: average each R (and the heads); B and A are shared and frozen, so this is exact."""
    return Aggregate(average(updates, counts))


def fedit(updates: Sequence[Tensors], counts: Sequence[float]) -> Aggregate:
    """FedIT: average A and B separately (FedAvg on the LoRA factors)."""
    return Aggregate(average(updates, counts))


def ffa_lora(updates: Sequence[Tensors], counts: Sequence[float]) -> Aggregate:
    """FFA-LoRA: only B (and the heads) arrive; A is the shared frozen init, so ``B̄ A`` is exact."""
    stray = [k for k in updates[0] if k.endswith(".lora_A")]
    if stray:
        raise FedError(f"FFA-LoRA freezes A, yet the update holds {stray[:3]}")
    return Aggregate(average(updates, counts))


def fedex_lora(updates: Sequence[Tensors], counts: Sequence[float], scale: float) -> Aggregate:
    """FedEx-LoRA: average A and B, and return ``s·(Σ wᵢ Bᵢ Aᵢ − B̄ Ā)`` per layer for the base weights."""
    weights = normalized_weights(counts)
    mean = average(updates, counts)
    residuals = {}
    for key in mean:
        if not key.endswith(".lora_A") or key.startswith(SAVED_PREFIX):
            continue
        layer = key[: -len(".lora_A")]
        b_key = f"{layer}.lora_B"
        exact = sum(w * (u[b_key].double() @ u[key].double()) for u, w in zip(updates, weights))
        residuals[layer] = (scale * (exact - mean[b_key].double() @ mean[key].double())).float()
    return Aggregate(mean, residuals)


def aggregate(spec: StrategySpec, updates: Sequence[Tensors], counts: Sequence[float], scale: float = 1.0,
              ) -> Aggregate:
    """Dispatch to the strategy's aggregation (``scale``: the adapter's α/r, used by FedEx-LoRA)."""
    if spec.name == "fed-sb":
        return fed_sb(updates, counts)
    if spec.name == "fedit":
        return fedit(updates, counts)
    if spec.name == "ffa-lora":
        return ffa_lora(updates, counts)
    return fedex_lora(updates, counts, scale)


def fedsb_shared_init(gradient_sums: Sequence[Tensors], config: LoraSbConfig) -> dict[str, Tensor]:
    """Fed-SB's shared init: LoRA-SB's factors (`sign_step_factors`) of the SUM of the clients' gradient sums.

    ``gradient_sums[i][layer]`` is client i's ``Σ ∇_W ℓ`` over its init samples; sign(Σᵢ Gᵢ) is the sign
    of the pooled gradient, so the init equals the centralised one on the pooled samples.
    Returns ``{layer}.lora_B``, ``{layer}.lora_R``, ``{layer}.lora_A`` for every layer.
    """
    if not gradient_sums:
        raise FedError("Fed-SB's shared init needs the gradient sum of at least one client")
    out: dict[str, Tensor] = {}
    for layer in gradient_sums[0]:
        total = torch.stack([g[layer].float() for g in gradient_sums]).sum(0)
        B, R, A = sign_step_factors(total, config, seeded_generator(config.seed, layer))
        out.update({f"{layer}.lora_B": B, f"{layer}.lora_R": R, f"{layer}.lora_A": A})
    return out
