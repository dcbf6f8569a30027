"""Rank-allocation plots for the adaptive-rank methods (AdaLoRA, LoRA², ALoRA, PRILoRA, SoRA).

The methods' hooks report ``rank/<module name>`` in ``metrics()`` (`lorakit.methods.adaptive.rank_metrics`); the
trainer writes them into every ``log.jsonl`` training record.  From those records this module draws

* ``<prefix>rank_heatmap.png``: the final rank of every adapted matrix, transformer block × module type;
* ``<prefix>rank_evolution.png``: the rank of every adapted matrix (rows) over the logged steps (columns).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..core.files import atomic_write
from ..methods.adaptive import RANK_PREFIX, split_name

logger = logging.getLogger(__name__)

HF_PREFIX = "lorakit/"


def rank_history(records: Iterable[Mapping[str, Any]]) -> list[tuple[int, dict[str, int]]]:
    """``(step, {module: rank})`` for every record that carries ranks, in step order (keys ``rank/<module>``, or
    ``lorakit/rank/<module>`` as the Hugging Face callback logs them)."""
    history = []
    for record in records:
        ranks = {k.removeprefix(HF_PREFIX)[len(RANK_PREFIX):]: int(v) for k, v in record.items()
                 if k.removeprefix(HF_PREFIX).startswith(RANK_PREFIX)}
        if ranks:
            history.append((int(record.get("step", len(history))), ranks))
    return sorted(history, key=lambda item: item[0])


def rank_grid(ranks: Mapping[str, int]) -> tuple[list[str], list[str], list[list[float]]]:
    """``(block labels, module types, matrix)`` with ``matrix[block][type]`` the rank (NaN where none is adapted);
    modules outside numbered blocks form the row ``"-"``."""
    cells = {split_name(name): k for name, k in ranks.items()}
    blocks = sorted({b for b, _ in cells}, key=lambda b: (b is None, b if b is not None else 0))
    types = list(dict.fromkeys(t for _, t in cells))
    matrix = [[float(cells.get((b, t), math.nan)) for t in types] for b in blocks]
    return ["-" if b is None else str(b) for b in blocks], types, matrix


def draw_rank_allocation(records: Iterable[Mapping[str, Any]], out: str | Path, prefix: str = "",
                         title: str = "") -> list[str]:
    """Write the two PNGs into ``out``; returns their file names ([] without rank records or matplotlib)."""
    history = rank_history(records)
    if not history:
        return []
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'lorakit[plots]'): no rank-allocation plots")
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    step, final = history[-1]
    blocks, types, matrix = rank_grid(final)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(types), 1.2 + 0.4 * len(blocks)))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(types)), types, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(blocks)), blocks, fontsize=8)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    ax.set(xlabel="module type", ylabel="block", title=f"{title} ranks at step {step}".strip())
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    files = [f"{prefix}rank_heatmap.png"]
    atomic_write(out / files[0], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))

    names = sorted(final, key=lambda n: (split_name(n)[0] is None, split_name(n)[0] or 0, n))
    evolution = [[float(ranks.get(n, math.nan)) for _, ranks in history] for n in names]
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.12 * len(names)))
    image = ax.imshow(evolution, cmap="viridis", aspect="auto", interpolation="nearest")
    steps = [s for s, _ in history]
    ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(1, len(steps) // 8))})
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks], fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=5)
    ax.set(xlabel="step", title=f"{title} rank of each adapted matrix over training".strip())
    fig.colorbar(image, ax=ax, label="rank")
    fig.tight_layout()
    files.append(f"{prefix}rank_evolution.png")
    atomic_write(out / files[1], lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close("all")
    return files
