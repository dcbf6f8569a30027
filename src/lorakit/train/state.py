"""The trainer's checkpoint ``output_dir/checkpoint`` (safetensors + JSON, never pickle): what it holds, writing it
(`Checkpoints.save`) and continuing from it (`Checkpoints.resume`).

It holds the adapter (with none attached: every trainable parameter), the optimizer state, the step, every rank's
RNG states, how many batches were drawn, the hooks' counters and the run's `Progress`.  The whole directory is
written beside the old one, flushed to disk (fsync) and swapped in (`lorakit.core.checkpoint`), so ``resume=True``
always finds a complete checkpoint and continues bit for bit (on CPU) as if the run had never stopped; a write that
fails (disk full) is a `TrainingError` that leaves the last checkpoint in place.  Its last file, ``checksums.json``,
holds every other file's SHA-256; ``resume`` verifies it, then checks the whole state against the run (`_check_meta`:
types, ranges, counters; `Checkpoints.resume`: tensors, optimizer, hooks, RNG) before it restores anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from ..api import STATE_ATTR
from ..config import check_value
from ..core.checkpoint import MANIFEST, find_latest, read_verified, refuse_links, write_atomically, write_manifest
from ..core.driver import build_optimizer, load_adapter_tensors
from ..core.files import read_regular, write_error
from ..core.hooks import TrainingHooks
from ..errors import AdapterFileError, ConfigError, LorakitError, TrainingError
from ..io.persistence import read_adapter_tensors, save
from .config import TrainConfig
from .distributed import Ranks
from .progress import Progress

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
STATE_VERSION = 2  # 2: a checksum manifest, and a checked schema
# A resumed run must draw the same batches: these fields may not change between the two runs; changing the
# others (but the free ones, which do not touch the trajectory) makes it differ from an uninterrupted run.
_RESUME_FIXED = ("batch_size", "grad_accum", "seed", "group_by_length")
_RESUME_FREE = ("resume", "stop_after", "progress", "output_dir", "log_every", "eval_every", "save_every",
                "save_adapter", "gradient_checkpointing", "fsdp")
# What every trainer_state.json holds.
_STATE_KEYS = ("step", "batches_drawn", "world_size", "config", "optimizer", "hooks", "trainable", "progress")
_PROGRESS_KEYS = {f.name for f in dataclasses.fields(Progress)}


def find_checkpoint(out: Path) -> Path | None:
    """The last complete checkpoint in ``out``: ``checkpoint/``, or the previous one if a swap was interrupted (its
    manifest, written last, marks it complete).  A ``checkpoint/`` without one (a torn copy, or one written before
    manifests) is an error, not a silent start from step 0."""
    found = find_latest(out, CHECKPOINT_DIR, MANIFEST)
    if found is None and (out / CHECKPOINT_DIR).exists():
        raise AdapterFileError(f"{out / CHECKPOINT_DIR} has no {MANIFEST}: it is a torn copy or was written by an "
                               "older lorakit, and cannot be checked; delete it to start over")
    return found


def _bad(path: Path, key: str, expected: str, found: Any) -> AdapterFileError:
    return AdapterFileError(f"{path}: {key} must be {expected}, got {found!r:.100}; the checkpoint is damaged or "
                            f"from another run: delete {path.parent} to start over, or pass another output directory")


def _is_int(value: Any, low: int = 0, high: int | None = None) -> bool:
    return type(value) is int and value >= low and (high is None or value <= high)


def _is_number(value: Any, low: float = 0.0) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value >= low


def _check_progress(path: Path, progress: Any, step: int) -> None:
    """``progress`` is a `Progress` of ``step`` steps: one finite loss per step, evals within them, counts >= 0."""
    if not isinstance(progress, dict) or set(progress) != _PROGRESS_KEYS:
        found = sorted(progress) if isinstance(progress, dict) else progress
        raise _bad(path, "progress", f"an object with keys {sorted(_PROGRESS_KEYS)}", found)
    if progress["step"] != step or type(progress["step"]) is not int:
        raise _bad(path, "progress.step", f"the checkpoint's step {step}", progress["step"])
    losses = progress["losses"]
    if not isinstance(losses, list) or len(losses) != step or not all(_is_number(v, -math.inf) for v in losses):
        raise _bad(path, "progress.losses", f"a list of {step} finite numbers (one per step)",
                   len(losses) if isinstance(losses, list) else losses)
    evals = progress["evals"]
    if not isinstance(evals, list) or not all(
            isinstance(e, dict) and _is_int(e.get("step"), 0, step)
            and all(isinstance(k, str) and _is_number(v, -math.inf) for k, v in e.items()) for e in evals):
        raise _bad(path, "progress.evals", f"a list of {{'step': 0..{step}, name: number}} objects", evals)
    for key in ("real_tokens", "padded_tokens"):
        if not _is_int(progress[key]):
            raise _bad(path, f"progress.{key}", "an integer >= 0", progress[key])
    if progress["real_tokens"] > progress["padded_tokens"]:
        raise _bad(path, "progress.real_tokens", f"<= padded_tokens ({progress['padded_tokens']})",
                   progress["real_tokens"])
    if not _is_number(progress["train_seconds"]):
        raise _bad(path, "progress.train_seconds", "a finite number >= 0", progress["train_seconds"])


def _check_train_config(path: Path, saved: Any) -> None:
    """``config`` is a `TrainConfig` as ``dataclasses.asdict`` wrote it: known keys, their types, its own checks."""
    if not isinstance(saved, dict):
        raise _bad(path, "config", "an object", saved)
    hints = typing.get_type_hints(TrainConfig)
    for key, value in saved.items():
        if key not in hints:
            raise _bad(path, f"config.{key}", f"one of TrainConfig's fields ({', '.join(hints)})", key)
        if typing.get_origin(hints[key]) is typing.Literal:
            if value not in typing.get_args(hints[key]):
                raise _bad(path, f"config.{key}", f"one of {typing.get_args(hints[key])}", value)
            continue
        try:
            check_value(f"config.{key}", value, hints[key])
        except ConfigError as err:
            raise _bad(path, f"config.{key}", "of its field's type", f"{value!r} ({err})") from None
    try:
        TrainConfig(**saved)
    except ConfigError as err:
        raise _bad(path, "config", "a valid TrainConfig", str(err)) from None


def _check_meta(path: Path, meta: Any) -> dict[str, Any]:
    """The schema of ``trainer_state.json``: types, ranges and the counters' consistency."""
    if not isinstance(meta, dict) or meta.get("format") != "lorakit-trainer" or meta.get("version") != STATE_VERSION:
        found = meta if not isinstance(meta, dict) else (meta.get("format"), meta.get("version"))
        raise AdapterFileError(f"{path} is not a lorakit trainer state this version reads (expected format "
                               f"'lorakit-trainer', version {STATE_VERSION}; found {found!r:.100}); delete "
                               f"{path.parent} to start over, or use the lorakit that wrote it")
    unknown = sorted(set(meta) - {"format", "version", *_STATE_KEYS})
    missing = [k for k in _STATE_KEYS if k not in meta]
    if missing or unknown:
        raise _bad(path, (missing or unknown)[0], f"present once with keys {', '.join(_STATE_KEYS)}",
                   "missing" if missing else "an unknown key")
    _check_train_config(path, meta["config"])
    step, grad_accum = meta["step"], meta["config"].get("grad_accum", 1)
    if not _is_int(step, 0, meta["config"].get("steps", TrainConfig.steps)):
        raise _bad(path, "step", "an integer in [0, config.steps]", step)
    if type(meta["batches_drawn"]) is not int or meta["batches_drawn"] != step * grad_accum:
        raise _bad(path, "batches_drawn", f"step x grad_accum = {step * grad_accum}", meta["batches_drawn"])
    if not _is_int(meta["world_size"], 1, 1 << 20):
        raise _bad(path, "world_size", "a positive integer", meta["world_size"])
    _check_progress(path, meta["progress"], step)
    trainable = meta["trainable"]
    if not isinstance(trainable, list) or not trainable or not all(isinstance(n, str) for n in trainable) \
            or len(set(trainable)) != len(trainable):
        raise _bad(path, "trainable", "a non-empty list of distinct parameter names", trainable)
    optimizer = meta["optimizer"]
    if not isinstance(optimizer, dict) or set(optimizer) != {"state", "param_groups", "strides"} \
            or not isinstance(optimizer["state"], dict) or not isinstance(optimizer["param_groups"], list) \
            or not isinstance(optimizer["strides"], dict):
        raise _bad(path, "optimizer", "an object with state, param_groups and strides", optimizer)
    for index, entry in optimizer["state"].items():
        if not index.isdigit() or not isinstance(entry, dict):
            raise _bad(path, f"optimizer.state.{index}", "an object under a parameter index", entry)
    for name, strides in optimizer["strides"].items():
        if not isinstance(strides, list) or not all(_is_int(v) for v in strides):
            raise _bad(path, f"optimizer.strides.{name}", "a list of integers >= 0", strides)
    if not isinstance(meta["hooks"], dict):
        raise _bad(path, "hooks", "an object", meta["hooks"])
    return meta


def read_checkpoint(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """A checkpoint's ``trainer_state.json`` and tensors, verified against its manifest (`read_verified`) and
    checked against the schema (`_check_meta`), before any model is built or touched."""
    files = read_verified(directory)
    path = directory / STATE_JSON
    if STATE_JSON not in files:
        raise AdapterFileError(f"{directory} lacks {STATE_JSON}; delete it to start over")
    try:
        meta = json.loads(files[STATE_JSON])
    except (ValueError, RecursionError) as err:
        raise AdapterFileError(f"the checkpoint file {path} is corrupt ({type(err).__name__}: {err}); delete "
                               f"{directory} to start over, or pass another output directory") from None
    meta = _check_meta(path, meta)
    if STATE_TENSORS not in files:
        raise AdapterFileError(f"{directory} lacks {STATE_TENSORS}; delete it to start over")
    try:
        tensors = safetensors.torch.load(files[STATE_TENSORS])
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as err:
        raise AdapterFileError(f"the checkpoint file {directory / STATE_TENSORS} is corrupt ({type(err).__name__}: "
                               f"{err}); delete {directory} to start over") from None
    return meta, tensors


def read_checkpoint_meta(directory: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json``, verified and checked (`read_checkpoint`), so that a corrupt one is one
    clear error before any model is built."""
    return read_checkpoint(directory)[0]


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


def _dense_layout(shape: torch.Size, strides: list[int]) -> bool:
    """Whether ``strides`` lay ``shape`` out densely in some dimension order (a transposed tensor's strides)."""
    if len(strides) != len(shape):
        return False
    expected = 1
    for stride, size in sorted(zip(strides, shape)):
        if size > 1 and stride != expected:
            return False
        expected *= size
    return True


def _unflatten_optimizer(tensors: Mapping[str, Tensor], meta: Mapping[str, Any], path: Path) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(i): dict(entry) for i, entry in meta["state"].items()}
    for name, tensor in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = (*name.split(".", 2), "")[:3]
            if not index.isdigit() or not key:
                raise _bad(path, name, "named optimizer.<index>.<key>", name)
            if name in meta["strides"]:
                strides = meta["strides"][name]
                if not _dense_layout(tensor.shape, strides):
                    raise _bad(path, f"optimizer.strides.{name}", f"a dense layout of shape {list(tensor.shape)}",
                               strides)
                tensor = torch.empty_strided(tensor.shape, strides, dtype=tensor.dtype).copy_(tensor)
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
        if out is not None and config.save_every:  # refused now, not at the first save after some training
            refuse_links(out, CHECKPOINT_DIR)

    def note(self) -> str:
        """Where the last good checkpoint is, for error messages."""
        try:
            directory = None if self.out is None else find_checkpoint(self.out)
        except LorakitError:
            directory = None
        if directory is None:
            return "No checkpoint was written."
        try:
            step = json.loads(read_regular(directory / STATE_JSON, follow_symlinks=False))["step"]
        except (LorakitError, ValueError, KeyError, TypeError):
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
            write_manifest(tmp)  # last: its presence marks the checkpoint complete

        try:
            final = write_atomically(self.out, CHECKPOINT_DIR, write)
        except LorakitError as err:  # a symlink in the checkpoint's place, a full disk (`write_error` says which)
            raise TrainingError(f"could not write the checkpoint of step {progress.step}: {err}. {self.note()}") \
                from None
        except (OSError, SafetensorError) as err:
            raise TrainingError(f"could not write the checkpoint of step {progress.step} in {self.out} "
                                f"({write_error(self.out / CHECKPOINT_DIR, err) if isinstance(err, OSError) else err})"
                                f". {self.note()}") from None
        logger.info("checkpoint at step %d in %s", progress.step, final)

    def resume(self, model: nn.Module, hooks: TrainingHooks) -> Resumed | None:
        """Restore what `save` wrote: the model's trainable tensors, the hooks' state and this rank's RNG states in
        place, a fresh optimizer with the saved state, the progress and the batches drawn.  None (with a log line)
        if there is no checkpoint: the run starts from step 0.

        The whole checkpoint is checked against this run first (manifest, schema, counters, tensor names, shapes,
        dtypes and finiteness, optimizer hyperparameters, hook state, RNG states); a failure is an `AdapterFileError`
        (or `TrainingError`) naming the file and the key, with the model as it was."""
        assert self.out is not None
        directory = find_checkpoint(self.out)
        if directory is None:
            logger.info("resume=True but %s holds no checkpoint: starting from step 0", self.out)
            return None
        meta, tensors = read_checkpoint(directory)
        json_path, tensor_path = directory / STATE_JSON, directory / STATE_TENSORS
        self._check_config(directory, meta["config"])
        if meta["step"] > self.config.steps:
            raise TrainingError(f"cannot resume from {directory}: it is at step {meta['step']}, past this run's "
                                f"steps={self.config.steps}; raise steps or pass another output directory")
        world = meta["world_size"]
        rank = self.ranks.rank if world == self.ranks.world else 0
        if world != self.ranks.world:
            logger.warning("checkpoint written by %d ranks, resumed on %d", world, self.ranks.world)
        params = dict(model.named_parameters())
        unknown = [n for n in meta["trainable"] if n not in params]
        if unknown:
            raise _bad(json_path, "trainable", "names of this model's parameters", unknown[:3])
        _check_tensor_names(tensor_path, tensors, world, meta["trainable"], getattr(model, STATE_ATTR, None) is None)
        rng = _checked_rng(tensor_path, tensors, rank, self.ranks.device)
        try:
            hook_values = hooks.checked_state(meta["hooks"], {k[len("hooks."):]: v for k, v in tensors.items()
                                                              if k.startswith("hooks.")}, str(json_path))
        except AdapterFileError as err:
            raise AdapterFileError(f"{err}; the checkpoint is damaged or from another run: delete {directory} to "
                                   "start over, or pass another output directory") from None
        before = {name: p.requires_grad for name, p in params.items()}
        trainable = set(meta["trainable"])
        try:
            for name, p in params.items():
                p.requires_grad_(name in trainable)
            # the saved config's lr and weight decay: the groups' hyperparameters must be what they give
            optimizer = build_optimizer(model, hooks, meta["config"].get("lr", TrainConfig.lr),
                                        meta["config"].get("weight_decay", TrainConfig.weight_decay))
            optimizer.load_state_dict(_checked_optimizer(json_path, tensor_path, meta, tensors, optimizer))
            _load_model_tensors(model, directory, tensors)  # checks every tensor, then copies: the last step
        except BaseException:
            for name, p in params.items():
                p.requires_grad_(before[name])
            raise
        hooks.load_state_dict(hook_values, {})
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.ranks.device)
        progress = Progress(**meta["progress"])
        logger.info("resumed from %s at step %d", directory, progress.step)
        return Resumed(optimizer, progress, meta["batches_drawn"])

    def _check_config(self, directory: Path, saved: Mapping[str, Any]) -> None:
        """Refuse a change that would draw other batches; warn about one that changes the trajectory."""
        changed = {k: (saved.get(k), getattr(self.config, k)) for k in _RESUME_FIXED
                   if saved.get(k) != getattr(self.config, k)}
        if changed:
            raise TrainingError(f"cannot resume from {directory}: {changed} (saved, now) changed; a resumed run "
                                "must draw the same batches. Use the saved values or a new output_dir")
        others = [k for k, v in saved.items()
                  if k not in (*_RESUME_FIXED, *_RESUME_FREE) and getattr(self.config, k) != v]
        if others:
            logger.warning("resuming with changed settings %s: the run will differ from an uninterrupted one", others)


def _check_tensor_names(path: Path, tensors: Mapping[str, Tensor], world: int, trainable: list[str],
                        full: bool) -> None:
    """Every tensor of ``trainer_state.safetensors`` is one `save` writes: optimizer state, an RNG state of one of
    the ``world`` ranks, a hook's state, and (``full``: no adapter) each trainable parameter."""
    rng = {f"rng.{kind}.{r}" for kind in ("cpu", "cuda") for r in range(world)}
    for name in tensors:
        if not (name.startswith(("optimizer.", "hooks.")) or name in rng or (full and name[7:] in trainable
                                                                             and name.startswith("params."))):
            raise _bad(path, name, "a tensor the trainer writes (optimizer.*, hooks.*, rng.*, params.*)", name)
    missing = [f"params.{n}" for n in trainable if full and f"params.{n}" not in tensors]
    missing += [f"rng.cpu.{r}" for r in range(world) if f"rng.cpu.{r}" not in tensors]
    if missing:
        raise _bad(path, missing[0], "present", "missing")


def _checked_rng(path: Path, tensors: Mapping[str, Tensor], rank: int, device: torch.device) -> dict[str, Tensor]:
    """This rank's RNG states, tried on a forked generator first: a short or garbage state is refused here."""
    rng = {"cpu": tensors[f"rng.cpu.{rank}"]}
    if device.type == "cuda" and f"rng.cuda.{rank}" in tensors:
        rng["cuda"] = tensors[f"rng.cuda.{rank}"]
    for kind, state in rng.items():
        like = torch.get_rng_state() if kind == "cpu" else torch.cuda.get_rng_state(device)
        if state.dtype != torch.uint8 or state.shape != like.shape:
            raise _bad(path, f"rng.{kind}.{rank}", f"a uint8 tensor of shape {list(like.shape)}",
                       f"{state.dtype} of shape {list(state.shape)}")
        with torch.random.fork_rng(devices=[device] if kind == "cuda" else []):
            try:
                torch.set_rng_state(state) if kind == "cpu" else torch.cuda.set_rng_state(state, device)
            except RuntimeError as err:
                raise _bad(path, f"rng.{kind}.{rank}", "a generator state", str(err)) from None
    return rng


_ADAM_STATE = {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}


def _checked_optimizer(json_path: Path, tensor_path: Path, meta: Mapping[str, Any], tensors: Mapping[str, Tensor],
                       optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The saved optimizer state, checked against the fresh ``optimizer`` built for this run: the same groups over
    the same parameters with the same hyperparameters (the lr within [0, base_lr], where the schedule puts it);
    per parameter, a step count in [1, steps done] and (Adam) moments of the parameter's shape and dtype; every
    number finite."""
    saved, fresh = meta["optimizer"], optimizer.state_dict()
    if len(saved["param_groups"]) != len(fresh["param_groups"]):
        raise _bad(json_path, "optimizer.param_groups", f"{len(fresh['param_groups'])} groups (this method's)",
                   len(saved["param_groups"]))
    for i, (group, want) in enumerate(zip(saved["param_groups"], fresh["param_groups"])):
        if not isinstance(group, dict) or set(group) != set(want):
            raise _bad(json_path, f"optimizer.param_groups[{i}]", f"an object with keys {sorted(want)}",
                       sorted(group) if isinstance(group, dict) else group)
        for key, value in want.items():
            if key == "lr":
                if not _is_number(group["lr"]) or group["lr"] > want["base_lr"] * (1 + 1e-6):
                    raise _bad(json_path, f"optimizer.param_groups[{i}].lr", f"in [0, base_lr={want['base_lr']}]",
                               group["lr"])
            elif group[key] != json.loads(json.dumps(value)):
                raise _bad(json_path, f"optimizer.param_groups[{i}].{key}", f"{value!r} (what the run's config "
                           "gives)", group[key])
    params = [p for group in optimizer.param_groups for p in group["params"]]
    adam = isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))
    state = _unflatten_optimizer(tensors, saved, tensor_path)
    for index, entry in state["state"].items():
        where = f"optimizer.{index}"
        if index >= len(params):
            raise _bad(tensor_path, where, f"state of one of the {len(params)} parameters", index)
        p = params[index]
        if adam and not {"step", "exp_avg", "exp_avg_sq"} <= set(entry) <= {"step", *_ADAM_STATE}:
            raise _bad(tensor_path, where, "AdamW's state (step, exp_avg, exp_avg_sq)", sorted(entry))
        for key, value in entry.items():
            if key == "step":
                count = float(value) if isinstance(value, Tensor) and value.numel() == 1 else value
                if not _is_number(count, 1) or count != int(count) or count > meta["step"]:
                    raise _bad(tensor_path, f"{where}.step", f"a whole number in [1, {meta['step']}] (steps done)",
                               count if not isinstance(count, Tensor) else list(count.shape))
            elif isinstance(value, Tensor):
                if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                    raise _bad(tensor_path, f"{where}.{key}", "a finite floating tensor", value.dtype)
                if key in _ADAM_STATE and (value.shape != p.shape or value.dtype != p.dtype):
                    raise _bad(tensor_path, f"{where}.{key}", f"{p.dtype} of shape {list(p.shape)} (its parameter's)",
                               f"{value.dtype} of shape {list(value.shape)}")
            elif not (isinstance(value, bool) or _is_number(value, -math.inf)):
                raise _bad(json_path, f"{where}.{key}", "a finite number", value)
    return state


@torch.no_grad()
def _load_model_tensors(model: nn.Module, directory: Path, tensors: Mapping[str, Tensor]) -> None:
    """Copy the checkpoint's adapter (or, with no adapter, its trainable parameters) into the model."""
    if getattr(model, STATE_ATTR, None) is None:
        saved = {name: (p, tensors[f"params.{name}"]) for name, p in model.named_parameters()
                 if f"params.{name}" in tensors}
        for name, (p, t) in saved.items():
            if t.shape != p.shape or t.dtype != p.dtype or (t.is_floating_point() and not bool(t.isfinite().all())):
                raise _bad(directory / STATE_TENSORS, f"params.{name}", f"a finite {p.dtype} tensor of shape "
                           f"{list(p.shape)}", f"{t.dtype} of shape {list(t.shape)}")
        for p, t in saved.values():
            p.copy_(t)
        return
    load_adapter_tensors(model, read_adapter_tensors(directory), str(directory))
