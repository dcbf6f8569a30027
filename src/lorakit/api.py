"""The public API: attach a method to any model, and merge, unmerge, disable, detach it."""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import AdapterConfig
from .core import quant
from .core.hooks import TrainingHooks
from .core.inject import find_modules_to_save, find_targets, replace_module
from .core.layer import AdapterLayer, base_shape, originals_kept
from .core.registry import Method, get_method
from .errors import ConfigError, LorakitError

logger = logging.getLogger(__name__)

STATE_ATTR = "_lorakit"


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


def get_state(model: nn.Module) -> AdapterState:
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise LorakitError("no lorakit adapter is attached to this model; call lorakit.attach(model, config)")
    return state


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return get_state(model).layers


def _check_rank(name: str, base: nn.Module, config: AdapterConfig) -> None:
    d_out, d_in = base_shape(base)
    if config.r > min(d_in, d_out):
        raise ConfigError(f"rank r={config.r} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
                          f"of layer '{name}' ({d_out}x{d_in}); lower r or exclude that layer")


def attach(model: nn.Module, config: AdapterConfig, data: Iterable[Any] | None = None,
           loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
           initialize: bool = True) -> nn.Module:
    """Wrap every targeted layer of ``model`` (in place) with ``config``'s method and freeze the rest.

    ``data`` (an iterable of batches) and ``loss_fn(model, batch) -> loss`` feed data-driven inits
    (LoRA-GA, LoRA-SB); the default loss is the model's own ``model(**batch).loss``.
    ``initialize=False`` skips data-driven inits (used by `load`, which restores saved tensors).
    """
    if getattr(model, STATE_ATTR, None) is not None:
        raise LorakitError("this model already has a lorakit adapter; detach(model) it first")
    if not isinstance(config, AdapterConfig):
        raise ConfigError(f"config must be a lorakit method config, got {type(config).__name__}")
    method = get_method(config.method)
    if not isinstance(config, method.config_class):
        raise ConfigError(f"method {method.name!r} takes {method.config_class.__name__}, "
                          f"got {type(config).__name__}")
    if method.needs_data and initialize and data is None:
        raise LorakitError(f"{method.name} initialises from gradients: pass data= (an iterable of "
                           "batches, e.g. a DataLoader) and optionally loss_fn=")
    targets = find_targets(model, config.target_modules, exclude=config.modules_to_save)
    for name, base in targets:
        _check_rank(name, base, config)
        if isinstance(base.weight, DTensor):
            raise LorakitError(f"layer '{name}' is sharded (FSDP): attach the adapter to the unsharded model; "
                               "lorakit's trainer then shards it (TrainConfig(fsdp=True), lorakit train --fsdp)")
    find_modules_to_save(model, config.modules_to_save)  # raises on a bad name before the model is touched

    flags = {id(p): p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    try:
        for name, base in targets:
            layers[name] = method.layer_class(base, config, name)
    except BaseException:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        raise
    for name, layer in layers.items():
        replace_module(model, name, layer)

    saved: dict[str, tuple[nn.Module, nn.Module]] = {}
    for name, original in find_modules_to_save(model, config.modules_to_save):
        trainable = copy.deepcopy(original)
        trainable.requires_grad_(True)
        replace_module(model, name, trainable)
        saved[name] = (original, trainable)

    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    from .io.persistence import layer_fingerprints  # persistence imports this module
    state = AdapterState(method, config, layers, saved, method.hooks_class(model, layers, config),
                         flags, str(name_or_path), layer_fingerprints(layers))
    setattr(model, STATE_ATTR, state)
    if initialize and method.initialize is not None:
        with originals_kept(layers.values()):  # while the init runs, so a failed attach restores W0 bit for bit
            try:
                method.initialize(model, layers, config, data, loss_fn)
            except BaseException:
                detach(model)
                raise
    return model


def detach(model: nn.Module) -> nn.Module:
    """Undo `attach`: put back the original module objects with their original weights and flags."""
    state = get_state(model)
    for name, layer in state.layers.items():
        layer.restore_base()
        replace_module(model, name, layer.base)
    for name, (original, _) in state.saved_modules.items():
        replace_module(model, name, original)
    for p in model.parameters():
        if id(p) in state.requires_grad:
            p.requires_grad_(state.requires_grad[id(p)])
    delattr(model, STATE_ATTR)
    return model


def _check_finite(layers: dict[str, AdapterLayer]) -> None:
    for layer in layers.values():
        if not layer.merged and not torch.isfinite(layer.delta_weight()).all():
            raise LorakitError(f"refusing to merge: layer '{layer.name}' has NaN or inf in its update; "
                               "no layer was merged")


def merge(model: nn.Module, safe: bool = True) -> None:
    """Fold every adapter update into its base weight (``W <- W + ΔW``); ``safe`` refuses NaN/inf.

    A quantized base is dequantized, updated and re-quantized in place (lossy, as in PEFT)."""
    layers = get_state(model).layers
    if safe:
        _check_finite(layers)
    for layer in layers.values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    for layer in get_state(model).layers.values():
        layer.unmerge()


def merge_and_unload(model: nn.Module, safe: bool = True, requantize: bool = False) -> nn.Module:
    """Merge, then replace each adapter layer by its (now updated) base layer; keeps trained heads.

    A quantized base (`lorakit.core.quant`) is merged in float32 from its dequantized weight: by default
    it is replaced by a plain ``nn.Linear`` in its compute dtype (exact merge, float memory);
    ``requantize=True`` quantizes the merged weight back into the original layer (its format, block size
    and double quantization), and logs each layer's relative weight error ``‖q(W) − W‖/‖W‖``.
    """
    state = get_state(model)
    if safe:
        _check_finite(state.layers)
    errors: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for name, layer in state.layers.items():
        kind, quantized = layer.quant, layer.base
        if kind is not None:
            kinds[name] = kind
            layer.base, layer.quant, layer.original_weight = quant.dequantized_linear(quantized), None, None
        layer.merge()
        merged = layer.base
        if kind is not None and requantize:
            quant.requantize(quantized, merged.weight)
            quantized.bias = merged.bias
            errors[name] = quant.relative_error(quantized, merged.weight)
            merged = quantized
        layer.original_weight = None
        replace_module(model, name, merged)
    if errors:
        logger.warning("merge_and_unload: %d %s layers re-quantized after the merge; relative weight error "
                       "mean %.4g, max %.4g", len(errors), "/".join(sorted(set(kinds.values()))),
                       sum(errors.values()) / len(errors), max(errors.values()))
    elif kinds:
        logger.warning("merge_and_unload: %d %s layers were merged into dequantized float nn.Linear layers "
                       "(pass requantize=True to quantize them back)", len(kinds),
                       "/".join(sorted(set(kinds.values()))))
    delattr(model, STATE_ATTR)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes its base output (adapters and saved-module copies off).

    For inits that moved W0 the base is the residual plus the initial adapter, i.e. the original model.
    """
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


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameter counts per module (adapter layers and saved modules) plus ``"total"``."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            owner = name.rpartition(".")[0]
            counts[owner] = counts.get(owner, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


def hooks(model: nn.Module) -> TrainingHooks:
    """The attached method's training hooks (see `lorakit.core.hooks`)."""
    return get_state(model).hooks
