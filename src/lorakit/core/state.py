"""The adapter state a model carries, and its tensors under `lorakit.save`'s names: what every layer above
core (methods, api, io, the trainers, fed) reads of an attached adapter.

`lorakit.api` attaches, switches and detaches adapters and keeps an `AdapterState` per adapter on the model
(``STATE_ATTR``: the active one; ``ADAPTERS_ATTR``: all of them); this module only reads that state, so that
methods and the core driver need not import the API above them.  The tensor layout: each adapter layer's
tensors under ``{layer}.{tensor}`` (frozen factors and base-offset factors included) and the trained copies
of ``modules_to_save`` under ``modules_to_save.{module}.{param}``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import AdapterConfig
from ..errors import AdapterFileError, LorakitError
from .hooks import TrainingHooks
from .inject import replace_module
from .layer import AdapterLayer
from .registry import Method

STATE_ATTR = "_lorakit"  # the active adapter's `AdapterState`
ADAPTERS_ATTR = "_lorakit_adapters"  # name -> `AdapterState`: every adapter attached to the model
DEFAULT_NAME = "default"
SAVED_PREFIX = "modules_to_save."


@dataclass
class AdapterState:
    """What `attach` did to a model, kept on the model so every other call can undo or use it."""

    method: Method
    config: AdapterConfig
    layers: dict[str, AdapterLayer]
    saved_modules: dict[str, tuple[nn.Module, nn.Module]]  # name -> (original, trainable copy)
    hooks: TrainingHooks
    requires_grad: dict[int, bool] = field(default_factory=dict)  # id(param) -> flag before attach
    base_model_name: str = ""
    fingerprints: dict[str, dict[str, Any]] = field(default_factory=dict)  # of W0 at attach; `save` writes them
    name: str = DEFAULT_NAME


def all_adapters(model: nn.Module) -> dict[str, AdapterState]:
    """Every adapter attached to ``model``, by name, in attach order (the active one included)."""
    return getattr(model, ADAPTERS_ATTR, None) or {}


def adapter_names(model: nn.Module) -> list[str]:
    """The names of every adapter attached to ``model``, in attach order."""
    return list(all_adapters(model))


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter, or ``None`` when the model runs as its base model."""
    state = getattr(model, STATE_ATTR, None)
    return None if state is None else state.name


def get_state(model: nn.Module, name: str | None = None) -> AdapterState:
    """The adapter named ``name`` (``None``: the active one)."""
    adapters = all_adapters(model)
    if name is not None:
        if name not in adapters:
            raise LorakitError(f"no adapter named {name!r:.80} on this model; attached: {list(adapters) or 'none'}")
        return adapters[name]
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        if adapters:
            raise LorakitError(f"no lorakit adapter is active on this model (attached: {list(adapters)}); "
                               "call lorakit.set_active(model, name)")
        raise LorakitError("no lorakit adapter is attached to this model; call lorakit.attach(model, config)")
    return state


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base output (adapters and saved-module copies off).

    For inits that moved W0 the base is the residual plus the initial adapter, i.e. the original model.
    With named adapters attached and none active, the model already is its base model.
    """
    if getattr(model, STATE_ATTR, None) is None and all_adapters(model):
        yield model
        return
    state = get_state(model)
    merged = [layer for layer in state.layers.values() if layer.merged]
    for layer in merged:
        layer.unmerge()
    originals = contextlib.ExitStack()
    for layer in state.layers.values():
        originals.enter_context(layer.original_base())
    for name, (original, _) in state.saved_modules.items():
        replace_module(model, name, original)
    for layer in state.layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in state.layers.values():
            layer.disabled = False
        for name, (_, trainable) in state.saved_modules.items():
            replace_module(model, name, trainable)
        originals.close()
        for layer in merged:
            layer.merge()


def adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, Tensor]:
    """The flat ``name -> tensor`` dict that `save` writes, of adapter ``name`` (``None``: the active one)."""
    state = get_state(model, name)
    tensors: dict[str, Tensor] = {}
    for layer_name, layer in state.layers.items():
        for key, tensor in layer.adapter_state().items():
            tensors[f"{layer_name}.{key}"] = tensor
    for module_name, (_, trainable) in state.saved_modules.items():
        for key, tensor in trainable.state_dict().items():
            tensors[f"{SAVED_PREFIX}{module_name}.{key}"] = tensor
    return tensors



def check_offsets(layers: dict[str, AdapterLayer], offsets: dict[str, int | None], found: dict[str, Tensor],
                   path: Path) -> None:
    """Exactly the declared layers carry base-offset factors ``d_out×k`` and ``k×d_in``, k as recorded."""
    present = {k.rsplit(".", 1)[0] for k in found if k.rsplit(".", 1)[-1] in ("base_offset_B", "base_offset_A")
               and not k.startswith(SAVED_PREFIX)}
    extra = sorted(present - set(offsets))
    if extra:
        raise AdapterFileError(f"{path}: unexpected tensors: base-offset factors for {extra[:5]}, which the "
                               "adapter does not declare (its method or 'base_offsets' record)")
    for name, rank in offsets.items():
        layer = layers[name]
        b, a = found.get(f"{name}.base_offset_B"), found.get(f"{name}.base_offset_A")
        if b is None or a is None:
            raise AdapterFileError(f"{path}: layer '{name}' lacks its base-offset factors "
                                   "(base_offset_B/base_offset_A); the file is incomplete")
        k = b.shape[1] if b.ndim == 2 else -1
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != layer.out_features or a.shape[1] != layer.in_features \
                or a.shape[0] != k or (rank is not None and k != rank):
            raise AdapterFileError(f"{path}: base-offset factors of '{name}' have shapes "
                                   f"{tuple(b.shape)} and {tuple(a.shape)}, which do not fit a "
                                   f"{layer.out_features}x{layer.in_features} layer"
                                   + (f" at the recorded rank {rank}" if rank is not None else ""))


@torch.no_grad()
def copy_adapter_tensors(model: nn.Module, tensors: Mapping[str, Tensor], move_bases: bool = True) -> None:
    """Copy ``tensors`` (``save``'s names, already checked) into the adapter attached to ``model``, rebuilding any
    base offset (moved W0, merged rounds) unless ``move_bases=False`` (`load` moves them after its checks).  Used
    by `load`, trainer checkpoints and rank-0 broadcasts."""
    state = get_state(model)
    for name, layer in state.layers.items():
        own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")
               and not k.startswith(SAVED_PREFIX) and (move_bases or not k.startswith(f"{name}.base_offset_"))}
        layer.load_adapter_state(own)
    for name, (_, module) in state.saved_modules.items():
        for key, tensor in module.state_dict().items():
            tensor.copy_(tensors[f"{SAVED_PREFIX}{name}.{key}"])


def check_adapter_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str | os.PathLike) -> None:
    """``tensors`` (``save``'s names) fit the adapter attached to ``model`` exactly: the same names and shapes,
    and base offsets only where its method owns them (every layer for W0-moving inits; any layer for merged
    boosting rounds, whose record is in the JSON that `load` reads).  For checkpoints and rank-0 broadcasts."""
    state = get_state(model)
    path = Path(source)
    if state.method.base_offsets == "every-layer":
        offsets: dict[str, int | None] = dict.fromkeys(state.layers)
    elif state.method.base_offsets == "merged-rounds":
        offsets = {k.rsplit(".", 1)[0]: None for k in tensors if k.endswith(".base_offset_B")
                   and k.rsplit(".", 1)[0] in state.layers}
    else:
        offsets = {}
    check_tensor_names(adapter_tensors(model), tensors, path)
    check_offsets(state.layers, offsets, tensors, path)


def check_tensor_names(expected: dict[str, Tensor], found: dict[str, Tensor], path: Path) -> None:
    """Exactly the tensors the attached adapter has (base offsets aside: `_check_offsets`), same shapes."""
    offsets = {k for k in found if k.rsplit(".", 1)[-1] in ("base_offset_B", "base_offset_A")
               and not k.startswith(SAVED_PREFIX)}
    missing = sorted(set(expected) - set(found) - offsets)
    extra = sorted(set(found) - set(expected) - offsets)
    if missing or extra:
        raise AdapterFileError(f"{path}: tensors missing from the file {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {extra[:5]}"
                               f"{' ...' if len(extra) > 5 else ''}")
    for key, tensor in expected.items():
        if key in offsets:
            continue
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise AdapterFileError(f"{path}: tensor '{key}' has shape {tuple(found[key].shape)}, "
                                   f"expected {tuple(tensor.shape)}")
