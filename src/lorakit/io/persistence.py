"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

The JSON holds the method, its config, the lorakit format version, the base model's name and a
fingerprint of every targeted base weight (its norm and 16 sampled values, compared with a 1%
tolerance so a bf16 copy of the same base still matches).  The safetensors file holds each adapter
layer's tensors under ``{layer}.{tensor}`` (frozen factors and base-offset factors included) and the
trained copies of ``modules_to_save`` under ``modules_to_save.{module}.{param}``.
Every check runs before the model is touched, so a bad file never leaves a partial load behind.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..api import STATE_ATTR, attach, detach, get_state
from ..core.inject import find_targets
from ..core.layer import base_shape, skip_init
from ..core.quant import FINGERPRINT_RTOL, dequantize, quant_kind
from ..core.registry import get_method
from ..errors import AdapterFileError, LorakitError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SAVED_PREFIX = "modules_to_save."
PROBES = 16


def weight_fingerprint(weight: Tensor, quant: str | None = None) -> dict[str, Any]:
    """Norm and 16 evenly spaced entries of a weight in ``(d_out, d_in)`` layout, as float64; ``quant``
    records the base's quantization (`lorakit.core.quant`), which sets the tolerance of `fingerprints_match`."""
    flat = weight.detach().reshape(-1)
    idx = torch.linspace(0, flat.numel() - 1, PROBES).long().to(flat.device)
    return {"shape": list(weight.shape), "norm": float(flat.double().norm()),
            "probe": [float(v) for v in flat[idx].double().cpu()], "quant": quant}


def fingerprints_match(saved: dict[str, Any], current: dict[str, Any], rtol: float | None = None) -> bool:
    """Same shape, norm and probes within ``rtol`` (default: the coarser quantization's tolerance, 1% for
    float on both sides), so a float base and its nf4/int8 copy match and another model does not."""
    if rtol is None:
        rtol = max(FINGERPRINT_RTOL.get(saved.get("quant")), FINGERPRINT_RTOL.get(current.get("quant")))
    if saved["shape"] != current["shape"]:
        return False
    if abs(saved["norm"] - current["norm"]) > rtol * max(saved["norm"], 1e-12):
        return False
    scale = max(max(abs(v) for v in saved["probe"]), 1e-12)
    return all(abs(a - b) <= rtol * scale for a, b in zip(saved["probe"], current["probe"]))


def _original_weight(module: nn.Module) -> tuple[Tensor, str | None]:
    """The untouched W0 of a target (``d_out, d_in``; dequantized when quantized) and its quantization."""
    from ..core.layer import AdapterLayer
    if isinstance(module, AdapterLayer):
        if module.merged:
            raise LorakitError(f"layer '{module.name}' is merged; unmerge(model) before saving")
        return module.original_float(), module.quant
    kind = quant_kind(module)
    if kind is not None:
        return dequantize(module), kind
    return (module.weight.T if type(module).__name__ == "Conv1D" else module.weight), None


def _atomic_write(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def adapter_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The flat ``name -> tensor`` dict that `save` writes."""
    state = get_state(model)
    tensors: dict[str, Tensor] = {}
    for name, layer in state.layers.items():
        for key, tensor in layer.adapter_state().items():
            tensors[f"{name}.{key}"] = tensor
    for name, (_, trainable) in state.saved_modules.items():
        for key, tensor in trainable.state_dict().items():
            tensors[f"{SAVED_PREFIX}{name}.{key}"] = tensor
    return tensors


def save(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the attached adapter to ``directory`` (created if needed); each file is replaced atomically."""
    state = get_state(model)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "lorakit_format_version": FORMAT_VERSION,
        "method": state.method.name,
        "config": state.config.to_dict(),
        "base_model": state.base_model_name,
        "fingerprint": {n: weight_fingerprint(*_original_weight(layer)) for n, layer in state.layers.items()},
        "modules_to_save": list(state.saved_modules),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(model).items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(
        tensors, p, metadata={"format": "lorakit", "lorakit_format_version": str(FORMAT_VERSION)}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate ``adapter_config.json`` (format, version, required keys)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {directory}: not an adapter directory")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{path} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object")
    if "lorakit_format_version" not in data:
        kind = "a PEFT adapter" if "peft_type" in data else "not a lorakit adapter"
        raise AdapterFileError(f"{path} is {kind} (no 'lorakit_format_version'); load PEFT adapters "
                               "with peft.PeftModel.from_pretrained")
    version = data["lorakit_format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {version!r}; this lorakit reads up to "
                               f"{FORMAT_VERSION}: upgrade lorakit")
    for key in ("method", "config", "fingerprint"):
        if key not in data:
            raise AdapterFileError(f"{path} is missing the required key {key!r}")
    for key in ("r", "target_modules"):
        if key not in data["config"]:
            raise AdapterFileError(f"{path}: config is missing the required key {key!r}")
    return data


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt and cannot be read: {err}") from err


def load(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` (the same base it was trained on)."""
    if getattr(model, STATE_ATTR, None) is not None:
        raise LorakitError("this model already has a lorakit adapter; detach(model) it before loading another")
    data = read_adapter_config(directory)
    method = get_method(data["method"])
    config = method.config_class.from_dict(data["config"])
    tensors = read_adapter_tensors(directory)

    targets = dict(find_targets(model, config.target_modules, exclude=config.modules_to_save))
    saved_fp: dict[str, Any] = data["fingerprint"]
    if set(targets) != set(saved_fp):
        missing, extra = sorted(set(saved_fp) - set(targets)), sorted(set(targets) - set(saved_fp))
        raise AdapterFileError(f"the adapter in {directory} does not fit this model: layers in the adapter but "
                               f"not the model {missing[:5]}, in the model but not the adapter {extra[:5]}")
    for name, module in targets.items():
        if not fingerprints_match(saved_fp[name], weight_fingerprint(*_original_weight(module))):
            raise AdapterFileError(
                f"base weights differ at '{name}': this adapter was trained on "
                f"{data.get('base_model') or 'another model'!r}; load it on that base model")
        d_out, d_in = base_shape(module)
        if [d_out, d_in] != saved_fp[name]["shape"]:
            raise AdapterFileError(f"layer '{name}' is {d_out}x{d_in} here but {saved_fp[name]['shape']} "
                                   "in the adapter")

    with skip_init():
        attach(model, config, initialize=False)
    try:
        state = get_state(model)
        state.base_model_name = data.get("base_model", "")
        expected = adapter_tensors(model)
        _check_tensors(expected, tensors, directory)
        if method.moves_base:
            _check_offsets(state.layers, tensors, directory)
        for name, layer in state.layers.items():
            own = {k for k in tensors if k.startswith(name + ".") and not k.startswith(SAVED_PREFIX)}
            layer.load_adapter_state({k[len(name) + 1:]: tensors[k] for k in own})
        with torch.no_grad():
            for name, (_, trainable) in state.saved_modules.items():
                for key, tensor in trainable.state_dict().items():
                    tensor.copy_(tensors[f"{SAVED_PREFIX}{name}.{key}"])
    except BaseException:
        detach(model)
        raise
    return model


def _check_offsets(layers: dict[str, Any], found: dict[str, Tensor], directory: Any) -> None:
    """Inits that moved W0 must ship the offset factors (``d_out×k`` and ``k×d_in``)."""
    for name, layer in layers.items():
        b, a = found.get(f"{name}.base_offset_B"), found.get(f"{name}.base_offset_A")
        if b is None or a is None:
            raise AdapterFileError(f"{directory}: layer '{name}' lacks its base-offset factors "
                                   "(base_offset_B/base_offset_A); the file is incomplete")
        if b.ndim != 2 or a.ndim != 2 or b.shape[0] != layer.out_features or a.shape[1] != layer.in_features \
                or b.shape[1] != a.shape[0]:
            raise AdapterFileError(f"{directory}: base-offset factors of '{name}' have shapes "
                                   f"{tuple(b.shape)} and {tuple(a.shape)}, which do not fit a "
                                   f"{layer.out_features}x{layer.in_features} layer")


def _check_tensors(expected: dict[str, Tensor], found: dict[str, Tensor], directory: Any) -> None:
    # base-offset factors are checked by _check_offsets: a skip-init layer has none yet.
    optional = {k for k in found if ".base_offset_" in k}
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected) - optional)
    if missing or extra:
        raise AdapterFileError(f"{directory}: tensors missing from the file {missing[:5]}"
                               f"{' ...' if len(missing) > 5 else ''}, unexpected tensors {extra[:5]}"
                               f"{' ...' if len(extra) > 5 else ''}")
    for key, tensor in expected.items():
        if tuple(found[key].shape) != tuple(tensor.shape):
            raise AdapterFileError(f"{directory}: tensor '{key}' has shape {tuple(found[key].shape)}, "
                                   f"expected {tuple(tensor.shape)}")
        if not found[key].is_floating_point():
            raise AdapterFileError(f"{directory}: tensor '{key}' has dtype {found[key].dtype}, expected float")
