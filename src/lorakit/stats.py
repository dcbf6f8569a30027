"""Mean ± std over seeds and the verdict on a claim from that spread: the rule of `benchmarks/results/claims.md`,
used by `lorakit sweep` and the benchmarks."""

from __future__ import annotations

import math


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 with one value)."""
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def fmt(xs: list[float], scale: float = 100, digits: int = 1, count: bool = True) -> str:
    """``mean ± std (n=…)`` of ``scale × xs`` (accuracies in points by default); ``not run`` when empty."""
    if not xs:
        return "not run"
    m, s = mean_std([scale * x for x in xs])
    return f"{m:.{digits}f} ± {s:.{digits}f}" + (f" (n={len(xs)})" if count else "")


def diff_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """mean(a) − mean(b) and its ± 2 standard errors (seed spread of both sides)."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    half = 2 * math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    d = ma - mb
    return d, d - half, d + half


def verdict(a: list[float], b: list[float], low: float | None, high: float | None = None, seeds: int = 3) -> str:
    """The claim ``low <= mean(a) − mean(b) <= high``: held when the whole ±2 SE interval is inside, not held
    when it is wholly outside, else not distinguishable; fewer than ``seeds`` runs on a side: incomplete."""
    if min(len(a), len(b)) < seeds:
        return f"incomplete (n={len(a)} vs {len(b)})"
    _, lo, hi = diff_interval(a, b)
    inside = (low is None or lo >= low) and (high is None or hi <= high)
    outside = (low is not None and hi < low) or (high is not None and lo > high)
    return "held" if inside else "not held" if outside else "not distinguishable"
