"""Weighted combination of named adapters into a new plain LoRA adapter (PEFT's ``add_weighted_adapter``).

For every layer that any of the adapters adapts, ``M = Σ_i w_i ΔW_i``, with ``ΔW_i`` adapter i's full update
relative to the original W0 (zero where it does not adapt the layer; for inits that moved W0 the update
includes the moved part, ``s·B A − B0 A0``, as in the PEFT export).  The result is a LoRA adapter with scale 1
(``alpha = r``) on the union of the layers, exportable with `lorakit.export_peft`:

* ``"linear"``: the exact low-rank form of M, the factors concatenated: ``B = [w_1 B_1, ..., w_n B_n]``,
  ``A = [A_1; ...; A_n]`` (each ``(B_i, A_i)`` from `peft_export.export_factors`, scale folded in), rank the sum
  of the ranks; layers of lower rank are padded with zero columns to the largest.  This is PEFT's ``"cat"``;
  PEFT's ``"linear"`` instead sums ``√w_i·s_i·B_i`` and ``√w_i·A_i`` into one rank-r pair, whose product holds
  the cross terms ``B_i A_j`` and is not ``Σ w_i ΔW_i`` unless a single adapter is combined.  It needs exact
  low-rank factors: a method whose update is not low-rank is refused (DoRA's
  ``m ⊙ (W0 + s·B A)/‖W0 + s·B A‖_c − W0`` rescales W0's rows; GLoRA).
* ``"svd"``: the truncated SVD of M at rank r (Eckart-Young: the best rank-r approximation in Frobenius norm),
  per layer in float32, ``B = U_r √Σ_r``, ``A = √Σ_r V_rᵀ``; any method is accepted, DoRA included (its dense
  update is approximated like any other).  When every update of a layer is low-rank, M is never formed: the SVD
  of the concatenated factors goes through two thin QRs and a small core (the same singular values and vectors,
  at a cost linear in the layer's size).  Each layer's relative error ``‖M − B A‖_F / ‖M‖_F``, which is
  ``√(Σ_{k>r} σ_k²) / √(Σ_k σ_k²)`` (0 where M = 0), is logged and returned.

The combination is computed with every adapter set aside (W0 in the base), and the new adapter becomes the
active one, as `attach` does.  Adapters with ``modules_to_save`` are refused: a head trained in full has no
low-rank weighted form.  The name is PEFT's, so code that uses PEFT's call finds it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .api import AdapterState, adding_adapter, attach, check_new_name, get_state
from .core.layer import AdapterLayer, base_shape, skip_init
from .errors import ConfigError, LorakitError
from .io.peft_export import export_factors, pad_rank
from .methods.lora import LoraConfig

logger = logging.getLogger(__name__)

COMBINATIONS = ("linear", "svd")


@dataclass(frozen=True)
class WeightedAdapter:
    """What `add_weighted_adapter` built: the new adapter's name, how, its rank, and (``"svd"``) each layer's
    relative Frobenius error ``‖M − B A‖_F / ‖M‖_F``; ``"linear"`` is exact by construction (``errors`` empty)."""

    name: str
    combination: str
    r: int
    errors: dict[str, float]


def _check_arguments(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                     combination: str, r: int | None) -> list[AdapterState]:
    if isinstance(adapters, str) or not adapters:
        raise ConfigError(f"adapters must be a non-empty list of adapter names, got {adapters!r:.80}")
    if len(set(adapters)) != len(adapters):
        raise ConfigError(f"adapters lists a name twice: {list(adapters)}; give each adapter once with its weight")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(adapters)} adapters {list(adapters)} need {len(adapters)} weights, got "
                          f"{len(weights)}: {list(weights)!r:.80}")
    for adapter, w in zip(adapters, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"the weight of adapter {adapter!r} must be a finite number, got {w!r:.40}")
    if combination not in COMBINATIONS:
        hint = " (PEFT's exact 'cat' is lorakit's 'linear')" if combination == "cat" else ""
        raise ConfigError(f"combination must be one of {COMBINATIONS}, got {combination!r:.40}{hint}")
    if combination == "svd" and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
        raise ConfigError(f"combination='svd' needs the rank r= of the result (a positive integer), got {r!r:.40}")
    if combination == "linear" and r is not None:
        raise ConfigError(f"combination='linear' takes no r (got r={r!r:.40}): its rank is the sum of the "
                          "adapters' ranks; use combination='svd' to choose one")
    states = [get_state(model, adapter) for adapter in adapters]
    check_new_name(model, name)
    for state in states:
        if state.saved_modules:
            raise LorakitError(f"adapter {state.name!r} trains modules_to_save {sorted(state.saved_modules)}: a "
                               "weighted combination holds low-rank layer updates only; combine adapters without "
                               "modules_to_save")
        if combination == "linear" and not state.method.low_rank:
            raise LorakitError(f"adapter {state.name!r} is {state.method.name}, whose update is not low-rank (DoRA "
                               "rescales W0's rows): combination='linear' needs exact low-rank factors; use "
                               "combination='svd', which approximates the dense update at rank r and reports the "
                               "error")
    return states


@torch.no_grad()
def _dense_update(layer: AdapterLayer) -> Tensor:
    """The layer's dense update relative to the original W0, float32 (its adapter set aside: W0 in the base)."""
    dense = layer.delta_weight().float()
    if layer.base_offset_B is not None:
        dense = dense - layer.base_offset_B @ layer.base_offset_A
    return dense


@torch.no_grad()
def _combine(states: list[AdapterState], weights: Sequence[float], combination: str, r: int | None
             ) -> tuple[dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
    """Per layer ``(B, A)`` of the combination, and (svd) the relative errors."""
    names = list(dict.fromkeys(n for state in states for n in state.layers))
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    for layer_name in names:
        parts = [(w, state.layers[layer_name], state.method.low_rank) for state, w in zip(states, weights)
                 if layer_name in state.layers]
        low_rank = all(exact and layer.as_lora() is not None for _, layer, exact in parts)
        if combination == "linear" or low_rank:
            pairs = [(w * B, A) for w, layer, _ in parts for B, A in [export_factors(layer)]]
            cat = (torch.cat([B for B, _ in pairs], dim=1), torch.cat([A for _, A in pairs], dim=0))
            if combination == "linear":
                factors[layer_name] = cat
                continue
            U, S, Vh = _factored_svd(*cat)
        else:
            U, S, Vh = torch.linalg.svd(sum(w * _dense_update(layer) for w, layer, _ in parts), full_matrices=False)
        root = S[:r].sqrt()
        factors[layer_name] = (U[:, :r] * root, root[:, None] * Vh[:r])
        total = float(S.square().sum())
        errors[layer_name] = math.sqrt(float(S[r:].square().sum()) / total) if total > 0 else 0.0
    return factors, errors


def _factored_svd(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ``B @ A`` without forming it: ``B = Q_B R_B``, ``Aᵀ = Q_A R_A``, then the SVD of the small
    core ``R_B R_Aᵀ`` (k×k for a rank-k product), rotated back."""
    QB, RB = torch.linalg.qr(B)
    QA, RA = torch.linalg.qr(A.T)
    U, S, Vh = torch.linalg.svd(RB @ RA.T)
    return QB @ U, S, Vh @ QA.T


def add_weighted_adapter(model: nn.Module, adapters: Sequence[str], weights: Sequence[float], name: str,
                         combination: str = "linear", r: int | None = None) -> WeightedAdapter:
    """Add adapter ``name``, a plain LoRA adapter whose update on every layer is ``Σ_i weights[i] ΔW_i`` over
    the named ``adapters`` (``"linear"``, exact) or its best rank-``r`` approximation (``"svd"``); see the
    module docstring.  The new adapter becomes active; a failure leaves the model as it was."""
    states = _check_arguments(model, adapters, weights, name, combination, r)
    smallest = min(min(base_shape(layer.base)) for state in states for layer in state.layers.values())
    if combination == "svd" and r is not None and r > smallest:
        raise ConfigError(f"r={r} is larger than the smallest adapted layer (min(d_out, d_in) = {smallest}); "
                          f"at r={smallest} the SVD is already exact")
    with adding_adapter(model, name, f"combine adapters {list(adapters)} into {name!r}"):
        factors, errors = _combine(states, [float(w) for w in weights], combination, r)
        rank = max(B.shape[1] for B, _ in factors.values())
        if rank > smallest:
            raise ConfigError(f"the linear combination has rank {rank} (the sum of the ranks), larger than the "
                              f"smallest adapted layer (min(d_out, d_in) = {smallest}); use combination='svd' "
                              f"with r <= {smallest} (exact at r={smallest})")
        with skip_init():
            attach(model, LoraConfig(r=rank, alpha=rank, target_modules=tuple(factors)), initialize=False, name=name)
        _fill(get_state(model, name), factors, rank)
    if errors:
        logger.info("add_weighted_adapter %r: rank-%d SVD of %d layers, relative Frobenius error mean %.4g, "
                    "max %.4g", name, rank, len(errors), sum(errors.values()) / len(errors), max(errors.values()))
    return WeightedAdapter(name, combination, rank, errors)


@torch.no_grad()
def _fill(state: AdapterState, factors: dict[str, tuple[Tensor, Tensor]], rank: int) -> None:
    """Copy each layer's factors, zero-padded to ``rank``, into the new LoRA adapter."""
    if set(state.layers) != set(factors):
        extra = sorted(set(state.layers) - set(factors))
        raise LorakitError(f"the combined layers' names also select {extra[:5]} in this model; the new adapter "
                           "cannot target exactly the combined layers")
    for layer_name, (B, A) in factors.items():
        layer = state.layers[layer_name]
        B, A = pad_rank(B, A, rank)
        layer.lora_B.copy_(B)
        layer.lora_A.copy_(A)
