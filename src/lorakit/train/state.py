"""The trainer's checkpoint ``output_dir/checkpoint`` (safetensors + JSON, never pickle): what it holds, writing it
(`Checkpoints.save`) and continuing from it (`Checkpoints.resume`).

It holds the adapter (with none attached: every trainable parameter), the optimizer state, the step, every rank's
RNG states, how many batches were drawn, the hooks' counters and the run's `Progress`.  The whole directory is
written beside the old one, flushed to disk (fsync) and swapped in (`lorakit.core.checkpoint`), so ``resume=True``
always finds a complete checkpoint and continues bit for bit (on CPU) as if the run had never stopped; a write that
fails (disk full) is a `TrainingError` that leaves the last checkpoint in place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..api import STATE_ATTR
from ..core.checkpoint import find_latest, write_atomically
from ..core.driver import build_optimizer, load_adapter_tensors
from ..core.hooks import TrainingHooks
from ..errors import AdapterFileError, TrainingError
from ..io.persistence import read_adapter_tensors, save
from .config import TrainConfig
from .distributed import Ranks
from .progress import Progress

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_VERSION = 1
# A resumed run must draw the same batches: these fields may not change between the two runs; changing the
# others (but the free ones, which do not touch the trajectory) makes it differ from an uninterrupted run.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed", "group_by_length")
_RESUME_FREE = ("resume", "stop_after", "progress", "output_dir", "log_every", "eval_every", "save_every",
                "save_adapter", "gradient_checkpointing", "fsdp")
# What every trainer_state.json holds.
_STATE_KEYS = ("step", "batches_drawn", "world_size", "config", "optimizer", "hooks", "trainable", "progress")


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint in ``out``: ``checkpoint/``, or the previous one if a swap was interrupted."""
    return find_latest(out, CHECKPOINT_DIR, STATE_JSON)


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, checked (format, version, keys) so that a corrupt one is one clear
    error, before any model is built."""
    path = directory / STATE_JSON
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise AdapterFileError(f"the checkpoint file {path} is corrupt ({type(err).__name__}: {err}); delete "
                               f"{directory} to start over, or pass another output directory") from None
    if not isinstance(meta, dict) or meta.get("format") != "lorakit-trainer" \
            or not isinstance(meta.get("version"), int) or meta["version"] > STATE_VERSION:
        found = meta if not isinstance(meta, dict) else (meta.get("format"), meta.get("version"))
        raise AdapterFileError(f"{path} is not a lorakit trainer state this version reads (expected format "
                               f"'lorakit-trainer', version <= {STATE_VERSION}; found {found!r}); delete it or "
                               "upgrade lorakit")
    missing = [k for k in _STATE_KEYS if k not in meta]
    if missing or not isinstance(meta["config"], dict) or not isinstance(meta["progress"], dict):
        raise AdapterFileError(f"{path} is incomplete or damaged (missing {missing or 'valid config/progress'}); "
                               f"delete {directory} to start over")
    return meta


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` as tensors ``optimizer.{param}.{key}`` plus JSON for everything else.

    The strides of non-contiguous state (e.g. QR factors) are kept too: a matmul on another memory layout
    can round differently, and a resumed run must repeat the uninterrupted one bit for bit.
    """
    tensors: dict[str, Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    strides: dict[str, list[int]] = {}
    for index, entry in state_dict["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                name = f"optimizer.{index}.{key}"
                tensors[name] = value.detach().cpu().contiguous()
                if not value.is_contiguous():
                    strides[name] = list(value.stride())
            else:
                plain.setdefault(str(index), {})[key] = value
    return tensors, {"state": plain, "param_groups": state_dict["param_groups"], "strides": strides}


def _unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in meta["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            if name in meta["strides"]:
                tensor = torch.empty_strided(tensor.shape, meta["strides"][name], dtype=tensor.dtype).copy_(tensor)
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = tensor
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}


class Resumed(NamedTuple):
    """What `Checkpoints.resume` hands back to the loop; the model, hooks and RNG are restored in place."""

    optimizer: torch.optim.Optimizer
    progress: Progress
    batches_drawn: int


class Checkpoints:
    """The checkpoint of one run in ``out`` (None: no output directory, nothing is ever written)."""

    def __init__(self, out: Path | None, config: TrainConfig, ranks: Ranks):
        self.out, self.config, self.ranks = out, config, ranks
        self.warned_hook_state = False

    def note(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        directory = None if self.out is None else find_checkpoint(self.out)
        if directory is None:
            return "No checkpoint was written."
        try:
            step = json.loads((directory / STATE_JSON).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"The last checkpoint is in {directory}."
        return f"The last good checkpoint (step {step}) in {directory} is intact."

    def save(self, model: nn.Module, hooks: TrainingHooks, optimizer: torch.optim.Optimizer,
             progress: Progress) -> None:
        """Write the checkpoint into a fresh directory, then swap it in (rank 0; all ranks send RNG states)."""
        device = self.ranks.device
        rng = {"cpu": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        all_rng = self.ranks.gather(rng)
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
            raise TrainingError(f"a trainable parameter is NaN or inf at step {progress.step}; the checkpoint "
                                f"was not written. {self.note()}")
        if self.ranks.rank != 0:
            return
        assert self.out is not None
        adapter = getattr(model, STATE_ATTR, None)
        tensors, optimizer_meta = _flatten_optimizer(optimizer.state_dict())
        for rank, states in enumerate(all_rng):
            tensors.update({f"rng.{kind}.{rank}": state for kind, state in states.items()})
        if adapter is None:
            tensors.update({f"params.{n}": p.detach().cpu().contiguous()
                            for n, p in model.named_parameters() if p.requires_grad})
        hook_state, hook_tensors, not_saved = hooks.state_dict()
        tensors.update({f"hooks.{k}": v for k, v in hook_tensors.items()})
        if not_saved and not self.warned_hook_state:
            self.warned_hook_state = True
            logger.warning("the %s hooks hold state that the checkpoint cannot carry (%s): a resumed run will not "
                           "match an uninterrupted one exactly", type(hooks).__name__, ", ".join(not_saved))
        meta = {"format": "lorakit-trainer", "version": STATE_VERSION, "step": progress.step,
                "batches_drawn": progress.step * self.config.grad_accum,  # every step draws grad_accum batches
                "world_size": self.ranks.world,
                "config": dataclasses.asdict(self.config), "optimizer": optimizer_meta,
                "hooks": hook_state,
                "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
                "progress": dataclasses.asdict(progress)}

        def write(tmp: Path) -> None:
            if adapter is not None:
                save(model, tmp)
            save_file(tensors, str(tmp / STATE_TENSORS), metadata={"format": "lorakit-trainer"})
            (tmp / STATE_JSON).write_text(json.dumps(meta, indent=1) + "\n")

        try:
            final = write_atomically(self.out, CHECKPOINT_DIR, write)
        except (OSError, SafetensorError) as err:
            raise TrainingError(f"could not write the checkpoint of step {progress.step} in "
                                f"{self.out / f'.{CHECKPOINT_DIR}-tmp'} ({err}); free disk space and resume. "
                                f"{self.note()}") from None
        logger.info("checkpoint at step %d in %s", progress.step, final)

    def resume(self, model: nn.Module, hooks: TrainingHooks) -> Resumed | None:
        """Restore what `save` wrote: the model's trainable tensors, the hooks' state and this rank's RNG states in
        place, a fresh optimizer with the saved state, the progress and the batches drawn.  None (with a log line)
        if there is no checkpoint: the run starts from step 0."""
        assert self.out is not None
        directory = find_checkpoint(self.out)
        if directory is None:
            logger.info("resume=True but %s holds no checkpoint: starting from step 0", self.out)
            return None
        meta = read_checkpoint_meta(directory)
        try:
            tensors = load_file(str(directory / STATE_TENSORS))
        except (OSError, SafetensorError) as err:
            raise AdapterFileError(f"the checkpoint in {directory} is corrupt ({type(err).__name__}: {err}); "
                                   "delete it to start over, or pass another output directory") from None
        self._check_config(directory, meta["config"])

        trainable = set(meta["trainable"])
        for name, p in model.named_parameters():
            p.requires_grad_(name in trainable)
        _load_model_tensors(model, directory, tensors)
        hooks.load_state_dict(meta["hooks"], {k[len("hooks."):]: v for k, v in tensors.items()
                                              if k.startswith("hooks.")})
        optimizer = build_optimizer(model, hooks, self.config.lr, self.config.weight_decay)
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (ValueError, KeyError) as err:
            raise TrainingError(f"the optimizer state in {directory} does not fit this model/method: {err}") from err
        ranks = self.ranks
        rank = ranks.rank if meta["world_size"] == ranks.world else 0
        if meta["world_size"] != ranks.world:
            logger.warning("checkpoint written by %d ranks, resumed on %d", meta["world_size"], ranks.world)
        torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
        if ranks.device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.cuda.{rank}"], ranks.device)
        progress = Progress(**meta["progress"])
        logger.info("resumed from %s at step %d", directory, progress.step)
        return Resumed(optimizer, progress, meta["batches_drawn"])

    def _check_config(self, directory: Path, saved: Mapping[str, Any]) -> None:
        """Refuse a change that would draw other batches; warn about one that changes the trajectory."""
        changed = {k: (saved[k], getattr(self.config, k)) for k in _RESUME_FIXED
                   if saved.get(k) != getattr(self.config, k)}
        if changed:
            raise TrainingError(f"cannot resume from {directory}: {changed} (saved, now) changed; a resumed run "
                                "must draw the same batches. Use the saved values or a new output_dir")
        others = [k for k, v in saved.items()
                  if k not in (*_RESUME_FIXED, *_RESUME_FREE) and getattr(self.config, k) != v]
        if others:
            logger.warning("resuming with changed settings %s: the run will differ from an uninterrupted one", others)


@torch.no_grad()
def _load_model_tensors(model: nn.Module, directory: Path, tensors: Mapping[str, Tensor]) -> None:
    """Copy the checkpoint's adapter (or, with no adapter, its trainable parameters) into the model."""
    if getattr(model, STATE_ATTR, None) is None:
        for name, p in model.named_parameters():
            if f"params.{name}" in tensors:
                p.copy_(tensors[f"params.{name}"])
        return
    load_adapter_tensors(model, read_adapter_tensors(directory), str(directory))
