"""What the adaptive-rank methods (AdaLoRA, LoRA², ALoRA, DyLoRA, PRILoRA, SoRA) share: exporting only the
ranks that survive, and reporting the rank each adapted matrix currently has.

Every adaptive layer exposes ``rank`` (an int: the ranks that contribute to its update now) and returns exactly
those ranks from ``as_lora``, so `lorakit.export_peft` writes per-layer ranks (``rank_pattern=True``) or pads
them to the largest (vLLM ignores ``rank_pattern``).  PEFT has no rank-0 LoRA layer, so a matrix whose ranks
were all pruned exports one zero rank (its update is exactly zero either way).

Their hooks' ``metrics()`` report ``total_rank`` and ``rank/<layer name>`` (`rank_metrics`; AdaLoRA and LoRA²
report the ranks their last mask allocated), which the trainer logs to ``log.jsonl`` and
`lorakit.train.rank_plots` turns into the rank-allocation heatmaps.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor

from ..core.layer import AdapterLayer

RANK_PREFIX = "rank/"


def keep_ranks(B: Tensor, A: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Columns of ``B`` and rows of ``A`` where the boolean ``keep`` is true; one zero rank when none is."""
    if not bool(keep.any()):
        return B.new_zeros(B.shape[0], 1), A.new_zeros(1, A.shape[1])
    return B[:, keep], A[keep]


def block_index(name: str) -> int | None:
    """The first purely numeric component of a module name (its transformer block), or ``None``."""
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def split_name(name: str) -> tuple[int | None, str]:
    """``(block, module type)``: ``model.layers.3.self_attn.q_proj`` -> ``(3, "self_attn.q_proj")``."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return int(part), ".".join(parts[i + 1:]) or name
    return None, name


def layer_ranks(layers: Mapping[str, AdapterLayer]) -> dict[str, int]:
    """``name -> rank`` for every layer that reports one (the adaptive layers)."""
    return {name: int(layer.rank) for name, layer in layers.items() if hasattr(layer, "rank")}


def rank_metrics(layers: Mapping[str, AdapterLayer]) -> dict[str, float]:
    """``total_rank`` and ``rank/<layer>`` (floats, as ``TrainingHooks.metrics`` returns them)."""
    ranks = layer_ranks(layers)
    out = {"total_rank": float(sum(ranks.values()))}
    out.update({f"{RANK_PREFIX}{name}": float(k) for name, k in ranks.items()})
    return out
