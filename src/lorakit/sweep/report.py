"""The sweep's results from its trial records: `leaderboard` (one row per method at its best rate, with the
seed spread and the verdict against the reference), ``leaderboard.md`` and the PNG plots."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..core.files import atomic_write, write_text
from ..stats import diff_interval, mean_std

logger = logging.getLogger(__name__)

COLUMNS = ("method", "lr", "rank", "n", "mean", "std", "trainable", "wall_s", "peak_mem", "tokens_per_s",
           "forgetting_nll_before", "forgetting_nll_after", "verdict")


def higher_is_better(metric: str) -> bool:
    return metric != "nll"


def best_rate(records: list[dict[str, Any]], metric: str, first_seed: int | None) -> float | None:
    """The rate with the best mean over its finished trials (``first_seed``: only that seed's trials count, as
    under ASHA, where the other seeds go to the chosen rate only); ``records`` in the order the rates were tried."""
    by_rate: dict[float, list[float]] = {}
    for r in records:
        if r["status"] == "done" and (first_seed is None or r["seed"] == first_seed):
            by_rate.setdefault(r["lr"], []).append(r["score"])
    if not by_rate:
        return None
    sign = 1 if higher_is_better(metric) else -1
    return max(by_rate, key=lambda lr: sign * mean_std(by_rate[lr])[0])  # ties: the first tried (nearest the default)


def verdict(scores: list[float], reference: list[float], metric: str) -> str:
    """better / worse / not distinguishable than the reference by the difference of means ± 2 standard errors
    (`lorakit.stats.diff_interval`, the rule of ``benchmarks/results/claims.md``); fewer than 2 seeds on a side:
    incomplete."""
    if min(len(scores), len(reference)) < 2:
        return f"incomplete (n={len(scores)} vs {len(reference)})"
    _, lo, hi = diff_interval(scores, reference)
    if not higher_is_better(metric):
        lo, hi = -hi, -lo
    return "better" if lo > 0 else "worse" if hi < 0 else "not distinguishable"


def _mean(values: list[Any]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def leaderboard(records: list[dict[str, Any]], methods: list[str], metric: str, reference: str,
                first_seed: int | None) -> list[dict[str, Any]]:
    """One row per method (in ``methods`` order) at its best rate; a method with no finished trial has n = 0."""
    rows, chosen = [], {}
    for method in methods:
        mine = [r for r in records if r["method"] == method]
        lr = best_rate(mine, metric, first_seed)
        at = [r for r in mine if r["status"] == "done" and r["lr"] == lr]
        chosen[method] = [r["score"] for r in sorted(at, key=lambda r: r["seed"])]
        scores = chosen[method]
        m, s = mean_std(scores) if scores else (None, None)
        rows.append({"method": method, "lr": lr, "rank": at[0]["options"].get("r") if at else None,
                     "n": len(scores), "mean": m, "std": s, "scores": scores,
                     "seeds": [r["seed"] for r in sorted(at, key=lambda r: r["seed"])], "metric": metric,
                     "trainable": at[0]["trainable"] if at else None,
                     "wall_s": _mean([r["wall_s"] for r in at]), "peak_mem": max((r["peak_mem"] for r in at),
                                                                                 default=None),
                     "tokens_per_s": _mean([r["tokens_per_s"] for r in at]),
                     "forgetting_nll_before": _mean([r.get("forgetting_nll_before") for r in at]),
                     "forgetting_nll_after": _mean([r.get("forgetting_nll_after") for r in at]),
                     "failed": sum(r["status"] == "failed" for r in mine),
                     "stopped": sum(r["status"] == "stopped" for r in mine)})
    for row in rows:
        if row["method"] == reference:
            row["verdict"] = "reference"
        elif reference not in chosen or not row["scores"]:
            row["verdict"] = None if reference not in chosen else f"incomplete (n={row['n']})"
        else:
            row["verdict"] = verdict(row["scores"], chosen[reference], metric)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def markdown(rows: list[dict[str, Any]], records: list[dict[str, Any]], command: str, plots: list[str]) -> str:
    metric = rows[0]["metric"] if rows else "score"
    lines = ["# lorakit sweep", "", f"    {command}", "",
             f"Each method at its best rate; mean ± std of {metric} over seeds; verdict against the reference by the "
             "difference of means ± 2 standard errors.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in COLUMNS) + " |")
    failed = [r for r in records if r["status"] == "failed"]
    lines += ["", f"{len(records)} trials: {sum(r['status'] == 'done' for r in records)} done, "
                  f"{sum(r['status'] == 'stopped' for r in records)} stopped early by ASHA, {len(failed)} failed."]
    lines += [f"- failed {r['id']}: {r.get('reason', '')}" for r in failed]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def draw(rows: list[dict[str, Any]], records: list[dict[str, Any]], curves: Callable[[dict[str, Any]], list[float]],
         out: Path) -> list[str]:
    """``pareto.png`` (metric against trainable parameters, the front joined), ``lr.png`` (metric against learning
    rate, one line per method) and ``curves.png`` (training loss of each method's best rate, first seed)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'lorakit[plots]'): leaderboard without plots")
        return []
    scored = [r for r in rows if r["n"] and r["trainable"]]
    metric = rows[0]["metric"] if rows else "score"
    better = higher_is_better(metric)
    files = []

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in scored:
        ax.errorbar(r["trainable"], r["mean"], yerr=r["std"], fmt="o", capsize=3)
        ax.annotate(r["method"], (r["trainable"], r["mean"]), fontsize=8)
    front, best = [], -math.inf
    for r in sorted(scored, key=lambda r: r["trainable"]):
        value = r["mean"] if better else -r["mean"]
        if value > best:
            front.append(r)
            best = value
    if front:
        ax.plot([r["trainable"] for r in front], [r["mean"] for r in front], "k--", lw=1, label="Pareto front")
        ax.legend()
    ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel=metric, title=f"{metric} against trainable parameters")
    fig.tight_layout()
    _save(fig, out / "pareto.png")
    files.append("pareto.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in records):
        by_rate: dict[float, list[float]] = {}
        for r in records:
            if r["method"] == method and r["status"] == "done":
                by_rate.setdefault(r["lr"], []).append(r["score"])
        if by_rate:
            lrs = sorted(by_rate)
            ax.plot(lrs, [mean_std(by_rate[lr])[0] for lr in lrs], marker="o", label=method)
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel=metric, title=f"{metric} against learning rate (finished trials)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "lr.png")
    files.append("lr.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in scored:
        losses = curves(r)
        if losses:
            smooth = [sum(losses[max(0, i - 9): i + 1]) / len(losses[max(0, i - 9): i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, label=f"{r['method']} lr {r['lr']:g}")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="Training curves (best rate, first seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, out / "curves.png")
    files.append("curves.png")
    plt.close("all")
    return files


def _save(fig: Any, path: Path) -> None:
    """A figure as PNG, written atomically (never through a symlink planted at ``path``)."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write_json(path: Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
