"""Load a PEFT LoRA adapter directory as the matching lorakit method (``lora``, ``rslora`` or ``dora``), exactly.

PEFT writes ``base_model.model.{layer}.lora_A.weight`` (r×d_in) and ``.lora_B.weight`` (d_out×r), DoRA adds
``.lora_magnitude_vector`` (d_out), and each ``modules_to_save`` module is stored as ``base_model.model.{module}.
{param}``.  A layer's scale is ``α/r`` (``α/√r`` with ``use_rslora``), r and α taken from ``rank_pattern`` /
``alpha_pattern`` where a key matches: the same rule as lorakit's `LoraConfig`, so the outputs are identical.

Whatever PEFT expresses that lorakit cannot reproduce exactly is refused with an `AdapterFileError`, never
approximated: other ``peft_type``s, trained biases, layer-selection options, base-moving inits, DoRA on
transposed (``fan_in_fan_out``) layers, non-Linear targets, any unknown option that is set.  Pickled weights
(``adapter_model.bin``) are never read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..api import DEFAULT_NAME, attach, detach, get_state
from ..core.inject import find_targets, regex_matcher
from ..core.layer import SUPPORTED_BASES, base_shape, skip_init
from ..core.registry import get_method
from ..core.state import check_tensor_names
from ..errors import AdapterConfigError, AdapterFileError, ConfigError, LorakitError
from .peft_export import PEFT_PREFIX
from .persistence import (
    CONFIG_NAME,
    SAVED_PREFIX,
    WEIGHTS_NAME,
    _check_loaded,
    adapter_tensors,
    read_adapter_header,
    read_adapter_tensors,
)

# Options lorakit reproduces; options that do not change the outputs; every other key must be unset.
SUPPORTED = frozenset({"r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern",
                       "use_rslora", "use_dora", "modules_to_save", "lora_dropout", "fan_in_fan_out",
                       "init_lora_weights"})
INFORMATIONAL = frozenset({"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode",
                           "auto_mapping", "peft_version", "megatron_core", "qalora_group_size", "runtime_config"})
UNSET = (None, False, "none", "", [], {})
# Inits that only set the factors (overwritten by the loaded ones); the others move or quantize W0.
PLAIN_INITS = (True, False, "gaussian", "orthogonal", "eva")
FACTORS = {"lora_A.weight": "lora_A", "lora_B.weight": "lora_B", "lora_magnitude_vector": "lora_magnitude"}


def is_peft_config(data: dict[str, Any]) -> bool:
    """``adapter_config.json`` was written by PEFT (or in its format), not by lorakit's `save`."""
    return "peft_type" in data and "lorakit_format_version" not in data


def _check_options(where: Path, data: dict[str, Any]) -> None:
    if data["peft_type"] != "LORA":
        raise AdapterFileError(f"{where}: peft_type is {data['peft_type']!r:.60}; lorakit loads PEFT LoRA "
                               "adapters (peft_type 'LORA') only")
    for key, value in data.items():
        if key not in SUPPORTED | INFORMATIONAL and not any(value is u or value == u for u in UNSET
                                                                 if type(value) is type(u)):
            raise AdapterFileError(f"{where}: PEFT option {key!r:.60} is set to {value!r:.80}; lorakit cannot "
                                   "reproduce it exactly (it loads plain LoRA, rsLoRA, DoRA, rank/alpha "
                                   "patterns and modules_to_save), so the adapter is refused")
    for key in ("r", "lora_alpha"):  # PEFT computes lora_alpha / r: null (lorakit's "alpha = r") fails there
        value = data.get(key, 8)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AdapterFileError(f"{where}: {key} must be a number, found {value!r:.60}; PEFT cannot load this "
                                   "adapter either")
    init = data.get("init_lora_weights", True)
    if not any(init is v if isinstance(v, bool) else init == v for v in PLAIN_INITS):
        raise AdapterFileError(f"{where}: init_lora_weights={init!r:.60} is not one of {list(PLAIN_INITS)}: "
                               "inits such as PiSSA, OLoRA, LoftQ, CorDA or LoRA-GA move or quantize the base "
                               "weights, so the factors do not apply to the plain base model; convert the adapter "
                               "with PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) first")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(data.get(key, False), bool):
            raise AdapterFileError(f"{where}: {key} must be true or false, found {data[key]!r:.60}")
    if data.get("use_dora") and data.get("fan_in_fan_out"):
        raise AdapterFileError(f"{where}: use_dora with fan_in_fan_out (transposed Conv1D layers) is not "
                               "supported by lorakit's DoRA import")
    if data.get("target_modules") is None:
        raise AdapterFileError(f"{where}: target_modules is missing; lorakit needs the adapted layers named")


def _lorakit_config(where: Path, data: dict[str, Any], layers: list[str], saved: list[str]) -> Any:
    method = get_method("dora" if data.get("use_dora") else "rslora" if data.get("use_rslora") else "lora")
    values = {"r": data.get("r", 8), "alpha": data.get("lora_alpha", 8), "target_modules": layers,
              "modules_to_save": saved, "dropout": data.get("lora_dropout", 0.0),
              "rank_pattern": data.get("rank_pattern") or {}, "alpha_pattern": data.get("alpha_pattern") or {},
              "use_rslora": data.get("use_rslora", False)}
    try:
        return method, method.config_class.from_dict(values)
    except ConfigError as err:
        raise AdapterConfigError(f"{where}: {err}") from err


def _split(where: Path, tensors: dict[str, Tensor], saved: list[str]) -> dict[str, Tensor]:
    """PEFT's tensor names -> `save`'s names (``{layer}.lora_A``, ``modules_to_save.{module}.{param}``)."""
    embedding = next((k for k in tensors if ".lora_embedding_" in k), None)
    if embedding is not None:
        raise AdapterFileError(f"{where.parent / WEIGHTS_NAME}: tensor {embedding!r:.160} adapts an Embedding "
                               "layer; lorakit adapts nn.Linear and Conv1D layers only")
    out: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else None
        factor = next((f for f in FACTORS if name and name.endswith("." + f)), None)
        module = next((m for m in saved if name and name.startswith(m + ".")), None)
        if name is not None and factor is not None:
            out[f"{name[:-len(factor) - 1]}.{FACTORS[factor]}"] = tensor
        elif name is not None and module is not None:
            out[f"{SAVED_PREFIX}{name}"] = tensor
        else:
            raise AdapterFileError(f"{where.parent / WEIGHTS_NAME}: unexpected tensor {key!r:.160}: not a LoRA "
                                   "factor (base_model.model.<layer>.lora_A.weight, ...) nor in a modules_to_save "
                                   "module")
    return out


def _layers(where: Path, model: nn.Module, data: dict[str, Any], found: dict[str, Tensor],
            saved: list[str]) -> list[str]:
    """The adapted layers: those the file holds factors for, which must be exactly what PEFT's
    ``target_modules`` selects (all-linear aside: its exclusions are heuristics) and Linear/Conv1D."""
    layers = sorted({k.rsplit(".", 1)[0] for k in found if not k.startswith(SAVED_PREFIX)})
    if not layers:
        raise AdapterFileError(f"{where.parent / WEIGHTS_NAME}: holds no LoRA factors")
    modules = dict(model.named_modules())
    for name in layers:
        if not isinstance(modules.get(name), SUPPORTED_BASES):
            kind = type(modules[name]).__name__ if name in modules else "missing"
            raise AdapterFileError(f"{where.parent / WEIGHTS_NAME}: layer {name!r:.160} is {kind} in this model; "
                                   "lorakit adapts nn.Linear and Conv1D layers: wrong base model")
        if data.get("use_dora") and isinstance(modules[name], Conv1D):
            raise AdapterFileError(f"{where}: DoRA on the transposed Conv1D layer {name!r:.160} is not supported")
    targets = data["target_modules"]
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return layers
    if not isinstance(targets, (str, list)) or not all(isinstance(t, str) for t in targets):
        raise AdapterFileError(f"{where}: target_modules must be a list of names or a regex, found {targets!r:.80}")
    excluded = data.get("exclude_modules") or []
    if not isinstance(excluded, (str, list)) or not all(isinstance(e, str) for e in excluded):
        raise AdapterFileError(f"{where}: exclude_modules must be a list of names or a regex, found {excluded!r:.80}")
    try:
        selected = {n for n, _ in find_targets(model, targets)
                    if not any(n == m or n.startswith(m + ".") for m in saved)}
        if isinstance(excluded, str):  # PEFT: a regex matching the whole name, else names or name suffixes
            selected -= {n for n in selected if regex_matcher(excluded)(n)}
        else:
            selected -= {n for n in selected if any(n == e or n.endswith("." + e) for e in excluded)}
    except LorakitError as err:
        raise AdapterFileError(f"{where}: target_modules/exclude_modules: {err}") from err
    if selected != set(layers):
        raise AdapterFileError(f"{where}: target_modules selects layers the file has no factors for "
                               f"{sorted(selected - set(layers))[:5]}, and the file has factors for layers it "
                               f"does not select {sorted(set(layers) - selected)[:5]}: the adapter is inconsistent "
                               "or for another model")
    return layers


def _saved_modules(where: Path, model: nn.Module, data: dict[str, Any]) -> list[str]:
    """Modules PEFT's ``modules_to_save`` wraps: names ending with an entry (plain ``str.endswith``, as PEFT)."""
    entries = data.get("modules_to_save") or []
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        raise AdapterFileError(f"{where}: modules_to_save must be a list of module names, found {entries!r:.80}")
    return sorted({n for n, _ in model.named_modules() if n and any(n.endswith(e) for e in entries)})


def load_peft(model: nn.Module, directory: Path, data: dict[str, Any], name: str = DEFAULT_NAME) -> nn.Module:
    """Attach the PEFT LoRA adapter in ``directory`` (its parsed ``adapter_config.json`` is ``data``) to
    ``model`` as lorakit's lora/rslora/dora adapter ``name``; every check runs before the model is changed, or
    detaches again."""
    where = directory / CONFIG_NAME
    if not (directory / WEIGHTS_NAME).is_file() and (directory / "adapter_model.bin").is_file():
        raise AdapterFileError(f"{directory} holds adapter_model.bin (pickle), which lorakit never loads: it can "
                               "run code. Convert it to adapter_model.safetensors (PEFT's save_pretrained with "
                               "safe_serialization=True) in a trusted environment")
    _check_options(where, data)
    saved = _saved_modules(where, model, data)
    found = _split(where, read_adapter_header(directory), saved)  # meta tensors: no data read before the checks
    layers = _layers(where, model, data, found, saved)
    method, config = _lorakit_config(where, data, layers, saved)
    modules = dict(model.named_modules())
    for name in layers:  # shapes first: a wrong base must not allocate or attach anything
        d_out, d_in = base_shape(modules[name])
        r = config.rank_for(name)
        a, b = found.get(f"{name}.lora_A"), found.get(f"{name}.lora_B")
        if a is None or b is None or tuple(a.shape) != (r, d_in) or tuple(b.shape) != (d_out, r):
            raise AdapterFileError(
                f"{where.parent / WEIGHTS_NAME}: layer {name!r:.160} needs lora_A {r}x{d_in} and lora_B {d_out}x{r} "
                f"(rank {r} from the config), found {None if a is None else tuple(a.shape)} and "
                f"{None if b is None else tuple(b.shape)}: the adapter is for another base model or corrupt")
    try:
        with skip_init():
            attach(model, config, initialize=False, name=name)
    except ConfigError as err:
        raise AdapterConfigError(f"{where}: {err}") from err
    except LorakitError as err:
        raise AdapterFileError(f"{where}: {err}") from err
    try:
        state = get_state(model)
        base_name = data.get("base_model_name_or_path")
        state.base_model_name = base_name if isinstance(base_name, str) else ""
        check_tensor_names(adapter_tensors(model), found, directory / WEIGHTS_NAME)
        found = _split(where, read_adapter_tensors(directory), saved)
        for name, layer in state.layers.items():
            layer.load_adapter_state({k: found[f"{name}.{k}"] for k in layer.adapter_state()})
        with torch.no_grad():
            for name, (_, trainable) in state.saved_modules.items():
                for key, tensor in trainable.state_dict().items():
                    tensor.copy_(found[f"{SAVED_PREFIX}{name}.{key}"])
        _check_loaded(state.layers, state.saved_modules, method.low_rank, directory / WEIGHTS_NAME)
    except BaseException:
        detach(model)
        raise
    return model
