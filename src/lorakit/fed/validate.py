"""Screening of client updates before aggregation: keys, shape, dtype, finiteness and a plausible size,
and every metric the server reads from a client: the sample count (finite, positive, at most the largest
partition or a cap), the training loss (finite, non-negative) and, under DP, the ε spent (finite, between 0 and
the run's budget).

A rejected update is excluded from its round with the reason logged; the others are aggregated.
The size test measures how far an update moved from the tensors the server broadcast (the L2 norm of
the difference over all its tensors): beyond ``max_norm`` it is implausible outright, and with three or
more updates, beyond ``factor`` times the round's median distance it is an outlier.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping

import torch
from torch import Tensor

logger = logging.getLogger(__name__)


def check_update(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> str | None:
    """Why ``update`` cannot be aggregated against ``reference`` (the broadcast tensors), or None."""
    missing, extra = sorted(set(reference) - set(update)), sorted(set(update) - set(reference))
    if missing or extra:
        return f"wrong keys: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in reference.items():
        got = update[key]
        if tuple(got.shape) != tuple(ref.shape):
            return f"wrong shape for {key}: {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"wrong dtype for {key}: {got.dtype}, expected {ref.dtype}"
        if not torch.isfinite(got).all():
            return f"non-finite values (NaN or inf) in {key}"
    return None


def check_count(count: object, limit: int) -> str | None:
    """Why a reported ``num-examples`` cannot be trusted, or None: it must be a finite, positive number of at most
    ``limit`` examples (an ``inf`` would turn the weighted mean into NaN, ``1e12`` would take all the weight)."""
    if isinstance(count, bool) or not isinstance(count, (int, float)):
        return f"num-examples must be a number, got {type(count).__name__}"
    if not math.isfinite(count) or count <= 0:
        return f"num-examples must be finite and positive, got {count}"
    if count > limit:
        return f"num-examples {count:g} exceeds the most a client can hold ({limit}: max_client_examples, or the " \
               "largest partition)"
    return None


def _check_number(name: str, value: object, low: float, high: float = math.inf) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{name} must be a number, got {type(value).__name__}"
    if not math.isfinite(value) or not low <= value <= high:
        return f"{name} must be finite and in [{low:g}, {high:g}], got {value}"
    return None


def check_metrics(record: Mapping[str, object], limit: int, epsilon_budget: float | None) -> str | None:
    """Why a client's metrics cannot be used, or None.  Each metric the server reads is checked as the sample
    count is: ``num-examples`` (`check_count`), ``train-loss`` (a cross-entropy average: finite, >= 0) and, when
    the run is DP (``epsilon_budget`` set), ``epsilon``: finite, >= 0 and at most the budget (plus the 1 %
    slack of Opacus' calibration), since the round's reported ε is the largest client's.  A missing metric
    is a reason, not a KeyError; keys the server does not read are ignored."""
    for key in ("num-examples", "train-loss") + (("epsilon",) if epsilon_budget is not None else ()):
        if key not in record:
            return f"untrusted metrics: {key} missing (got {sorted(record)[:5]})"
    reason = check_count(record["num-examples"], limit)
    if reason is not None:
        return f"untrusted sample count: {reason}"
    reason = _check_number("train-loss", record["train-loss"], 0.0)
    if reason is None and epsilon_budget is not None:
        reason = _check_number("epsilon", record["epsilon"], 0.0, epsilon_budget * 1.01)
    return None if reason is None else f"untrusted metrics: {reason}"


def update_distance(update: Mapping[str, Tensor], reference: Mapping[str, Tensor]) -> float:
    """L2 norm of ``update − reference`` over all tensors (in float64)."""
    total = 0.0
    for key, ref in reference.items():
        total += float((update[key].double() - ref.double()).pow(2).sum())
    return math.sqrt(total)


def screen(updates: Mapping[str, Mapping[str, Tensor]], reference: Mapping[str, Tensor], max_norm: float,
           factor: float) -> dict[str, str]:
    """``client -> reason`` for every update to exclude; the rest pass (see the module docstring)."""
    rejected: dict[str, str] = {}
    distances: dict[str, float] = {}
    for client, update in updates.items():
        reason = check_update(update, reference)
        if reason is None:
            distance = update_distance(update, reference)
            if distance > max_norm:
                reason = f"implausible update norm {distance:.3g} > max_update_norm {max_norm:.3g}"
            else:
                distances[client] = distance
        if reason is not None:
            rejected[client] = reason
    if len(distances) >= 3:
        median = statistics.median(distances.values())
        for client, distance in distances.items():
            if median > 0 and distance > factor * median:
                rejected[client] = (f"implausible update norm {distance:.3g} > {factor:g} x the round's median "
                                    f"{median:.3g}")
    return rejected
