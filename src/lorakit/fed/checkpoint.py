"""Server checkpoints after every completed round: safetensors + JSON only (never pickle).

``output_dir/server/`` holds ``state.safetensors`` (global trainable tensors, Fed-SB's frozen factors and
FedEx-LoRA's folded base offsets, under ``global/``, ``frozen/`` and ``offsets/``) and ``state.json``
(round, offsets version, communication ledger, history, and the settings a resumed run must share).
The directory is written beside the old one and swapped in with renames (`lorakit.core.checkpoint`, shared
with the trainer), so a crash mid-write leaves the previous complete checkpoint in place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from ..core.checkpoint import find_latest, write_atomically
from ..core.files import read_regular
from ..errors import LorakitError
from .comm import CommLedger
from .config import FedConfig
from .errors import CheckpointError

logger = logging.getLogger(__name__)

DIRNAME = "server"
TENSORS = "state.safetensors"
META = "state.json"
FORMAT = "lorakit-fed-server"
VERSION = 1
# A resumed run must be the same federation: these settings may not change between the two runs.
FIXED = ("strategy", "model", "quantize", "task", "r", "lora_alpha", "clients", "partition", "alpha", "seed",
         "train_limit", "init_lr", "weighting")
_GROUPS = ("global", "frozen", "offsets")


@dataclass
class ServerState:
    """Everything the server needs to continue after ``round`` (the last completed round; 0 = none)."""

    round: int = 0
    tensors: dict[str, Tensor] = field(default_factory=dict)
    frozen: dict[str, Tensor] = field(default_factory=dict)
    offsets: dict[str, Tensor] = field(default_factory=dict)
    offsets_version: int = 0
    ledger: CommLedger = field(default_factory=CommLedger)
    history: list[dict[str, Any]] = field(default_factory=list)


def save(directory: str | os.PathLike, state: ServerState, config: FedConfig) -> Path:
    """Write ``state`` to ``directory/server`` atomically (write a sibling, then swap it in)."""
    tensors = {f"{group}/{k}": v.detach().cpu().contiguous()
               for group, d in zip(_GROUPS, (state.tensors, state.frozen, state.offsets)) for k, v in d.items()}
    meta = {"format": FORMAT, "version": VERSION, "round": state.round, "offsets_version": state.offsets_version,
            "config": config.to_record(), "ledger": state.ledger.to_json(), "history": state.history}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / TENSORS), metadata={"format": FORMAT})
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")

    return write_atomically(Path(directory), DIRNAME, write)


def load(directory: str | os.PathLike, config: FedConfig) -> ServerState | None:
    """The state saved in ``directory/server``, or None when there is no checkpoint yet.

    Raises `CheckpointError` if the files are corrupt or were written by a different federation.
    """
    where = find_latest(Path(directory), DIRNAME, META)  # `.server-old` after a crash between the two renames
    if where is None:
        return None
    try:  # regular files only: a FIFO planted there is an error, not a hang
        meta = json.loads(read_regular(where / META))
        tensors = safetensors.torch.load(read_regular(where / TENSORS))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, LorakitError) as err:
        raise CheckpointError(f"the server checkpoint in {where} is corrupt: {err}") from err
    if meta.get("format") != FORMAT or meta.get("version", VERSION + 1) > VERSION:
        raise CheckpointError(f"{where / META} is not a lorakit server checkpoint this version reads")
    saved = meta["config"]
    changed = {k: (saved.get(k), getattr(config, k)) for k in FIXED if saved.get(k) != getattr(config, k)}
    if changed:
        raise CheckpointError(f"cannot resume from {where}: settings {changed} (saved, now) differ; use the saved "
                              "values or a new output_dir")
    groups: dict[str, dict[str, Tensor]] = {g: {} for g in _GROUPS}
    for key, value in tensors.items():
        group, _, name = key.partition("/")
        groups[group][name] = value
    return ServerState(int(meta["round"]), groups["global"], groups["frozen"], groups["offsets"],
                       int(meta["offsets_version"]), CommLedger.from_json(meta["ledger"]), list(meta["history"]))
