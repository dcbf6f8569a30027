"""The public API: attach a method to any model, and merge, unmerge, disable, detach it.

Named adapters.  A model holds any number of adapters, each under a name (``attach(..., name=...)``; without
one it is ``"default"``), and at most one of them is *active*: its layers are in the model, and every call
that takes no name (`get_state`, `save`, `merge`, `disabled`, `hooks`, the trainers, the HF callback, fed)
acts on it.  The others are set aside whole (their layers, trained tensors, hook state and trained
``modules_to_save`` copies), out of the module tree: ``model.parameters()``, ``state_dict()`` and an optimizer
see the active adapter only, so only it trains.  `set_active` switches (``None``: the base model),
`use_adapter` switches for a block, `detach` with a name deletes one adapter.  A new adapter (`attach`,
`lorakit.load`, `lorakit.add_weighted_adapter`) becomes the active one.

What switching guarantees: every adapter's own tensors and the weights it computes with come back bit for
bit.  An inactive adapter's layers leave W0 in the base: a W0-moving init (PiSSA, OLoRA, LoRA-GA, BA-LoRA)
or merged boosting rounds (XGBLoRA, CoLA) park their moved weight and put W0 back (`AdapterLayer.park_base`),
so no adapter ever sees another's moved or merged W0.  That W0 is bit for bit the original when it was kept
(quantized bases; layers built inside `keep_original`; every adapter attached next to another one keeps it);
only a W0-moving adapter attached alone, without `keep_original`, puts back ``residual + offset`` (W0 within
one float rounding, as `detach` documents) the first time it is set aside, and that same tensor afterwards.
Cost: an inactive W0-moving adapter holds its residual (one copy of each moved weight, on the model's device),
and every W0-moving adapter next to others keeps W0 in CPU memory.
Switching away from, or attaching next to, a merged adapter is refused (``unmerge(model)`` first).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .config import AdapterConfig
from .core import progress, quant
from .core.hooks import TrainingHooks
from .core.inject import find_modules_to_save, find_targets, replace_module
from .core.layer import AdapterLayer, base_shape, keep_original, undo_moves
from .core.registry import get_method
from .core.state import (  # noqa: F401  (re-exported: the API's names for the adapter state)
    ADAPTERS_ATTR,
    DEFAULT_NAME,
    STATE_ATTR,
    AdapterState,
    active_adapter,
    adapter_names,
    all_adapters,
    disabled,
    get_state,
)
from .errors import ConfigError, LorakitError

logger = logging.getLogger(__name__)

# an adapter name may become a directory name: one plain file-name component, no path syntax
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_new_name(model: nn.Module, name: str) -> None:
    """``name`` is a safe adapter name (a file-name component) that ``model`` does not use yet."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(f"adapter name {name!r:.80} is not allowed: use 1 to 64 letters, digits, _ - or ., "
                          "starting with a letter or digit, no '..' (names may be used as directory names)")
    if name in all_adapters(model):
        raise LorakitError(f"this model already has a lorakit adapter; detach(model) it first, or pass another "
                           f"name= to add one next to it (attached: {adapter_names(model)}, asked for {name!r})")


def _follow_base(state: AdapterState) -> None:
    """Move an inactive adapter's tensors to its bases' device (the model may have moved meanwhile)."""
    for layer in state.layers.values():
        device = layer.base.weight.device
        skip = {id(m) for m in layer.base.modules()}
        for module in layer.modules():
            if id(module) not in skip:
                module._apply(lambda t, d=device: t.to(d), recurse=False)  # as module.to(device) does
    for original, trainable in state.saved_modules.values():
        reference = next(original.parameters(), None)
        if reference is not None:
            trainable.to(reference.device)


def _deactivate(model: nn.Module, why: str) -> AdapterState | None:
    """Set the active adapter aside (its layers out of the model, W0 back in the base) and return it;
    ``why`` completes the refusal when it is merged."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return None
    merged = [n for n, layer in state.layers.items() if layer.merged]
    if merged:
        raise LorakitError(f"cannot {why}: the active adapter {state.name!r} is merged into the base weights "
                           f"(layer '{merged[0]}'); unmerge(model) first")
    if any(isinstance(layer.base.weight, DTensor) for layer in state.layers.values()):
        raise LorakitError(f"cannot {why}: the active adapter {state.name!r} is on an FSDP-sharded model; "
                           "named adapters switch on the unsharded model")
    for target, layer in state.layers.items():
        layer.park_base()
        replace_module(model, target, layer.base)
    for target, (original, trainable) in state.saved_modules.items():
        reference = next(trainable.parameters(), None)
        if reference is not None:
            original.to(reference.device)  # out of the model while this adapter was active
        replace_module(model, target, original)
    delattr(model, STATE_ATTR)
    return state


def _activate(model: nn.Module, state: AdapterState) -> None:
    """Put an inactive adapter's layers back into the model (none may be active)."""
    _follow_base(state)
    for target, layer in state.layers.items():
        layer.unpark_base()
        replace_module(model, target, layer)
    for target, (_, trainable) in state.saved_modules.items():
        replace_module(model, target, trainable)
    setattr(model, STATE_ATTR, state)


@contextlib.contextmanager
def adding_adapter(model: nn.Module, name: str, why: str) -> Iterator[None]:
    """The block builds adapter ``name`` next to those attached (`attach`, `lorakit.load`,
    `lorakit.add_weighted_adapter`): the active adapter is set aside first (``why`` completes the refusal when it
    is merged), and if the block fails, ``name`` is dropped if it got attached and the adapter active before is
    active again, so the model is as it was."""
    check_new_name(model, name)
    previous = _deactivate(model, why)
    try:
        yield
    except BaseException:
        if name in all_adapters(model):
            detach(model, name)
        if previous is not None:
            _activate(model, previous)
        raise


def set_active(model: nn.Module, name: str | None) -> None:
    """Make adapter ``name`` the active one; ``None`` runs the base model.  Refused while the active adapter is
    merged.  The adapter set aside keeps its tensors and hook state (see the module docstring for exactness)."""
    if not all_adapters(model):
        raise LorakitError("no lorakit adapter is attached to this model; call lorakit.attach(model, config)")
    target = None if name is None else get_state(model, name)
    current = getattr(model, STATE_ATTR, None)
    if target is current:
        return
    _deactivate(model, f"switch to {'the base model' if target is None else repr(name)}")
    if target is not None:
        _activate(model, target)


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """Inside the block adapter ``name`` is active (``None``: the base model, every adapter off); the adapter
    active before comes back afterwards (PEFT's ``set_adapter`` / ``disable_adapter`` for one block)."""
    previous = active_adapter(model)
    set_active(model, name)
    try:
        yield model
    finally:
        if all_adapters(model):
            set_active(model, previous if previous in all_adapters(model) else None)


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    return get_state(model).layers


def _check_rank(name: str, base: nn.Module, config: AdapterConfig) -> None:
    d_out, d_in = base_shape(base)
    if config.r > min(d_in, d_out):
        raise ConfigError(f"rank r={config.r} is larger than min(d_in, d_out) = {min(d_in, d_out)} "
                          f"of layer '{name}' ({d_out}x{d_in}); lower r or exclude that layer")


def attach(model: nn.Module, config: AdapterConfig, data: Iterable[Any] | None = None,
           loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
           initialize: bool = True, name: str = DEFAULT_NAME) -> nn.Module:
    """Wrap every targeted layer of ``model`` (in place) with ``config``'s method and freeze the rest.

    ``data`` (an iterable of batches) and ``loss_fn(model, batch) -> loss`` feed data-driven inits
    (LoRA-GA, LoRA-SB); the default loss is the model's own ``model(**batch).loss``.
    ``initialize=False`` skips data-driven inits (used by `load`, which restores saved tensors).
    ``name`` adds the adapter next to those already attached: the active one is set aside first, so the new
    adapter is built and initialised on the base model exactly as alone, and then becomes the active one.
    A failed attach leaves the model as it was, the previously active adapter active again.  A W0-moving init
    (PiSSA, OLoRA, BA-LoRA, LoRA-GA) moves W0 one layer at a time and keeps no float copy of it (alone; next to
    other adapters W0 is kept, see the module docstring): beyond LoRA's memory, attach needs the saved offsets
    and one layer's work at a time (its factorisation and residual) at any model size; a failure puts the moved
    layers back from their residual and offset
    (`AdapterLayer.restore_base`: W0 within one rounding in the weight's dtype, bit for bit on a quantized base).
    """
    with adding_adapter(model, name, f"attach adapter {name!r} next to it"):
        return _attach(model, config, data, loss_fn, initialize, name)


def _attach(model: nn.Module, config: AdapterConfig, data: Iterable[Any] | None,
            loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None, initialize: bool, name: str) -> nn.Module:
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
    for target, base in targets:
        _check_rank(target, base, config)
        if isinstance(base.weight, DTensor):
            raise LorakitError(f"layer '{target}' is sharded (FSDP): attach the adapter to the unsharded model; "
                               "lorakit's trainer then shards it (TrainConfig(fsdp=True), lorakit train --fsdp)")
    find_modules_to_save(model, config.modules_to_save)  # raises on a bad name before the model is touched

    flags = {id(p): p.requires_grad for p in model.parameters()}
    others = all_adapters(model)
    model.requires_grad_(False)
    layers: dict[str, AdapterLayer] = {}
    try:
        # next to other adapters a W0-moving init keeps W0, so setting this adapter aside is bit-exact; alone,
        # PiSSA/OLoRA/BA-LoRA layers move W0 as they are built, one layer at a time, undone if a later one fails
        with keep_original() if others else contextlib.nullcontext(), undo_moves():
            for target, base in progress.track(targets, len(targets), f"attach {method.name}"):
                layers[target] = method.layer_class(base, config, target)
    except BaseException:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        raise
    for target, layer in layers.items():
        replace_module(model, target, layer)

    saved: dict[str, tuple[nn.Module, nn.Module]] = {}
    for target, original in find_modules_to_save(model, config.modules_to_save):
        trainable = copy.deepcopy(original)
        trainable.requires_grad_(True)
        replace_module(model, target, trainable)
        saved[target] = (original, trainable)

    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    from .io.persistence import layer_fingerprints  # persistence imports this module
    # what `detach` restores when the last adapter goes: the flags from before the first attach
    before = next(iter(others.values())).requires_grad if others else flags
    state = AdapterState(method, config, layers, saved, method.hooks_class(model, layers, config),
                         before, str(name_or_path), layer_fingerprints(layers), name)
    setattr(model, ADAPTERS_ATTR, {**others, name: state})
    setattr(model, STATE_ATTR, state)
    if initialize and method.initialize is not None:
        try:  # a W0-moving init (LoRA-GA) moves layer by layer, keeping no W0: detach recomputes the moved ones
            method.initialize(model, layers, config, data, loss_fn)
        except BaseException:
            detach(model, name)
            raise
    return model


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Delete adapter ``name`` (``None``: the active one; the model then runs as its base model until
    `set_active`).  The active adapter's layers give back the original module objects with W0 (see
    `AdapterLayer.restore_base`); an inactive one is dropped (W0 is in the base already).  When the last adapter
    goes, every parameter gets back the ``requires_grad`` it had before the first `attach`."""
    state = get_state(model, name)
    if state is getattr(model, STATE_ATTR, None):
        for target, layer in state.layers.items():
            layer.restore_base()
            replace_module(model, target, layer.base)
        for target, (original, _) in state.saved_modules.items():
            replace_module(model, target, original)
        delattr(model, STATE_ATTR)
    remaining = {n: s for n, s in all_adapters(model).items() if s is not state}
    if remaining:
        setattr(model, ADAPTERS_ATTR, remaining)
        return model
    for p in model.parameters():
        if id(p) in state.requires_grad:
            p.requires_grad_(state.requires_grad[id(p)])
    if hasattr(model, ADAPTERS_ATTR):
        delattr(model, ADAPTERS_ATTR)
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
    Refused while other named adapters are attached (their W0 would change under them).
    """
    state = get_state(model)
    others = [n for n in all_adapters(model) if n != state.name]
    if others:
        raise LorakitError(f"merge_and_unload would fold adapter {state.name!r} into the base weights that the "
                           f"other adapters {others} were trained on; save and detach(model, name) them first")
    if safe:
        _check_finite(state.layers)
    errors: dict[str, float] = {}
    kinds: dict[str, str] = {}
    for name, layer in progress.track(state.layers.items(), len(state.layers), "merge"):
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
    delattr(model, ADAPTERS_ATTR)
    return model


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
