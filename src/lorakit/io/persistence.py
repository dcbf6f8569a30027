"""Save and load adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, never pickle.

The JSON holds the method, its config, the lorakit format version, the base model's name, a
fingerprint of every targeted base weight (its norm and 16 sampled values, compared with a 1%
tolerance so a bf16 copy of the same base still matches) and the rank of each layer's base offset.
The safetensors file holds each adapter layer's tensors under ``{layer}.{tensor}`` (frozen factors and
base-offset factors included) and the trained copies of ``modules_to_save`` under
``modules_to_save.{module}.{param}``.

Adapter files may be hostile: `load` checks the JSON against its schema and the method's config schema
before anything else, reads only regular files, checks every tensor's name, dtype and shape from the
safetensors header before reading any tensor data, refuses any tensor the method does not declare (base
offsets included), any non-float or non-finite tensor, and any loaded update too large for the base
weights; every failure is a `LorakitError` naming the file and the item, and leaves the model as it was.
"""

from __future__ import annotations

import json
import logging
import math
import os
import reprlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from ..api import DEFAULT_NAME, adding_adapter, attach, detach, get_state
from ..config import AdapterConfig
from ..core.files import write_files
from ..core.inject import find_targets
from ..core.layer import AdapterLayer, base_shape, skip_init, undo_moves
from ..core.quant import FINGERPRINT_RTOL, dequantize, quant_kind
from ..core.registry import Method, get_method
from ..core.state import (  # noqa: F401  (re-exported: save's tensor names, used by io and the trainers)
    SAVED_PREFIX,
    adapter_tensors,
    check_adapter_tensors,
    check_offsets,
    check_tensor_names,
    copy_adapter_tensors,
)
from ..errors import AdapterConfigError, AdapterFileError, ConfigError, LorakitError, TargetError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PROBES = 16
MAX_CONFIG_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on a header
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HEADER_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
# named as torch names them in the refusal
_OTHER_DTYPES = {"I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# A loaded tensor, update or base offset with entries beyond MAX_UPDATE_RATIO * max(1, max|W0|) is refused: no
# training produces one, and it overflows the activations (e.g. alpha = 1e30 in a hand-edited config).
MAX_UPDATE_RATIO = 1e5


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




def layer_fingerprints(layers: dict[str, nn.Module]) -> dict[str, dict[str, Any]]:
    """`weight_fingerprint` of every layer's original base weight, by layer name."""
    return {n: weight_fingerprint(*_original_weight(layer)) for n, layer in layers.items()}


def fingerprints(model: nn.Module, name: str | None = None) -> dict[str, dict[str, Any]]:
    """The base-weight fingerprints taken at `attach`, before any init moved W0: `save` writes these, so a
    resumed, sharded or merged-round run writes the same file as an uninterrupted single-process one (W0
    recomputed as residual + offset would differ in the last bits).  ``name``: as in `adapter_tensors`."""
    return get_state(model, name).fingerprints


def save(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write adapter ``name`` (``None``: the active one) to ``directory`` (created if needed), all or nothing
    (`lorakit.core.files.write_files`: a temporary directory, then renames; the config last).  The files do not
    record the name: `load` gives the adapter the name it is asked for."""
    state = get_state(model, name)
    merged = [n for n, layer in state.layers.items() if layer.merged]
    if merged:
        raise LorakitError(f"layer '{merged[0]}' is merged; unmerge(model) before saving")
    config = {
        "lorakit_format_version": FORMAT_VERSION,
        "method": state.method.name,
        "config": state.config.to_dict(),
        "base_model": state.base_model_name,
        "fingerprint": fingerprints(model, state.name),
        "modules_to_save": list(state.saved_modules),
        "base_offsets": {n: int(layer.base_offset_B.shape[1]) for n, layer in state.layers.items()
                         if layer.base_offset_B is not None},
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in adapter_tensors(model, state.name).items()}

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "lorakit"})  # one key: a map's order is random
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")

    return write_files(directory, write, last=CONFIG_NAME)


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse ``adapter_config.json`` and check its schema (format, version, keys and their types)."""
    return check_adapter_config(Path(directory) / CONFIG_NAME, read_config_json(directory))


def read_config_json(directory: str | os.PathLike) -> dict[str, Any]:
    """``adapter_config.json`` parsed (size-limited, a JSON object), lorakit's or PEFT's, not yet checked."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"no {CONFIG_NAME} in {directory}: not an adapter directory")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterFileError(f"{path} is {path.stat().st_size} bytes; an adapter config is at most "
                               f"{MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise AdapterFileError(f"{path} is not valid JSON ({type(err).__name__}: {str(err)[:200]}); "
                               "the file is corrupt") from err
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def check_adapter_config(path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (from ``path``) is a lorakit adapter config of a readable version with the required keys."""
    if "lorakit_format_version" not in data:
        kind = "a PEFT adapter" if "peft_type" in data else "not a lorakit adapter"
        raise AdapterFileError(f"{path} is {kind} (no 'lorakit_format_version'); lorakit.load reads PEFT LoRA "
                               "adapters directly")
    version = data["lorakit_format_version"]
    if not _is_int(version) or version > FORMAT_VERSION:
        raise AdapterFileError(f"{path} has format version {reprlib.repr(version)}; this lorakit reads up to "
                               f"{FORMAT_VERSION}: upgrade lorakit")
    if version < 1:
        raise _bad(path, "'lorakit_format_version'", f"an integer from 1 to {FORMAT_VERSION}", version)
    for key in ("method", "config", "fingerprint"):
        if key not in data:
            raise AdapterFileError(f"{path} is missing the required key {key!r}")
    _expect(path, "method", data["method"], str, "a method name (string)")
    _expect(path, "config", data["config"], dict, "an object")
    _expect(path, "fingerprint", data["fingerprint"], dict, "an object (layer name -> fingerprint)")
    _expect(path, "base_model", data.get("base_model", ""), str, "a string")
    saved = data.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(n, str) for n in saved):
        raise _bad(path, "'modules_to_save'", "a list of module names", saved)
    offsets = data.get("base_offsets", {})
    if not isinstance(offsets, dict) or not all(_is_int(k) and k >= 1 for k in offsets.values()):
        raise _bad(path, "'base_offsets'", "an object (layer name -> positive rank)", offsets)
    for key in ("r", "target_modules"):
        if key not in data["config"]:
            raise AdapterFileError(f"{path}: config is missing the required key {key!r}")
    for name, entry in data["fingerprint"].items():
        _check_fingerprint(path, name, entry)
    return data


def _largest(tensor: Tensor) -> float:
    """``max |x|`` in one pass (no ``|x|`` copy): inf if an entry is infinite, nan if one is NaN."""
    if not tensor.numel():
        return 0.0
    low, high = (float(v) for v in torch.aminmax(tensor.detach()))
    return max(-low, high) if not (math.isnan(low) or math.isnan(high)) else math.nan


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= 1e308 \
        and math.isfinite(value)


def _bad(path: Path, item: str, expected: str, found: Any) -> AdapterFileError:
    return AdapterFileError(f"{path}: {item} must be {expected}, found {reprlib.repr(found)}")


def _expect(path: Path, key: str, value: Any, kind: type, expected: str) -> None:
    if not isinstance(value, kind):
        raise _bad(path, repr(key), expected, value)


def _check_fingerprint(path: Path, name: str, entry: Any) -> None:
    """``{"shape": [d_out, d_in], "norm": x, "probe": [16 numbers], "quant": null | kind}``, every number finite."""
    item = f"fingerprint of {name!r:.120}"
    if not isinstance(entry, dict) or not {"shape", "norm", "probe"} <= set(entry):
        raise _bad(path, item, "an object with 'shape', 'norm' and 'probe'", entry)
    shape, norm, probe = entry["shape"], entry["norm"], entry["probe"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(_is_int(d) and d >= 1 for d in shape):
        raise _bad(path, f"{item}: 'shape'", "two positive integers", shape)
    if not _is_number(norm) or norm < 0:
        raise _bad(path, f"{item}: 'norm'", "a finite number >= 0", norm)
    if not isinstance(probe, list) or len(probe) != PROBES or not all(_is_number(v) for v in probe):
        raise _bad(path, f"{item}: 'probe'", f"a list of {PROBES} finite numbers", probe)
    if entry.get("quant") not in FINGERPRINT_RTOL:
        raise _bad(path, f"{item}: 'quant'", f"null or one of {sorted(k for k in FINGERPRINT_RTOL if k)}",
                   entry.get("quant"))


def _weights_file(directory: str | os.PathLike) -> Path:
    """``adapter_model.safetensors`` in ``directory``, which must be a regular file (opening a FIFO blocks)."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        what = "is not a regular file" if path.exists() or path.is_symlink() else "does not exist"
        raise AdapterFileError(f"no {WEIGHTS_NAME} in {directory}: {path} {what}")
    return path


def read_adapter_header(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The safetensors file's tensor names, dtypes and shapes from its header alone, as meta tensors: only the
    header's bytes are read (no tensor data, no mapping of the file), so names and shapes are checked before a
    huge or unexpected tensor costs memory.  As safetensors requires, the tensors' byte ranges must tile the data
    section exactly (a truncated file fails here); each must be float (`FLOAT_DTYPES`)."""
    path = _weights_file(directory)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            total = os.fstat(f.fileno()).st_size
            if not 2 <= size <= min(MAX_HEADER_BYTES, total - 8):
                raise ValueError(f"header length {size} does not fit a {total}-byte file")
            header = json.loads(f.read(size))
    except (OSError, ValueError, RecursionError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt and cannot be read: {err}") from err
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path} is corrupt: its header is not a JSON object")
    entries = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape) \
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets):
            raise AdapterFileError(f"{path} is corrupt: tensor '{key:.160}' has a malformed header entry")
        if dtype not in _HEADER_DTYPES:
            raise AdapterFileError(f"{path}: tensor '{key:.160}' has dtype {_OTHER_DTYPES.get(dtype, dtype)}, "
                                   "expected float (float16, bfloat16, float32 or float64)")
        entries.append((offsets, key, shape, _HEADER_DTYPES[dtype]))
    out, end = {}, 0
    for offsets, key, shape, dtype in sorted(entries, key=lambda e: e[0]):
        nbytes = math.prod(shape) * dtype.itemsize
        if offsets != [end, end + nbytes]:
            raise AdapterFileError(f"{path} is truncated or corrupt: tensor '{key:.160}' of shape {shape} has data "
                                   f"offsets {offsets}, expected {[end, end + nbytes]}")
        end += nbytes
        out[key] = torch.empty(shape, dtype=dtype, device="meta")
    if end != total - 8 - size:
        raise AdapterFileError(f"{path} is truncated or corrupt: its tensors take {end} bytes, the file holds "
                               f"{total - 8 - size}")
    return out


def read_adapter_tensors(directory: str | os.PathLike) -> dict[str, Tensor]:
    """The safetensors file's tensors (`read_adapter_header`'s checks first); each must be finite."""
    path = Path(directory) / WEIGHTS_NAME
    header = read_adapter_header(directory)
    try:
        with safe_open(str(path), "pt") as f:
            tensors = {key: f.get_tensor(key) for key in header}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, KeyError) as err:
        raise AdapterFileError(f"{path} is truncated or corrupt and cannot be read: {err}") from err
    for key, tensor in tensors.items():
        if tensor.dtype != header[key].dtype or tensor.shape != header[key].shape:  # replaced since the header
            raise AdapterFileError(f"{path} changed while it was read; load it again")
        if not math.isfinite(_largest(tensor)):
            raise AdapterFileError(f"{path}: tensor '{key}' holds NaN or inf values; the adapter is corrupt")
    return tensors


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` (the same base it was trained on) as adapter
    ``name`` (``None``: ``"default"``), next to any already attached, and make it the active one; a PEFT LoRA
    adapter directory is loaded by `peft_import.load_peft`.

    Nothing is attached until the config and every file-level check passed; a check that needs the
    attached layers (tensor names and shapes, the size of the loaded update) detaches again on failure, and
    the adapter active before is active again.
    """
    name = DEFAULT_NAME if name is None else name
    with adding_adapter(model, name, f"load adapter {name!r} next to it"):
        return _load(model, Path(directory), name)


def _load(model: nn.Module, path: Path, name: str) -> nn.Module:
    """`load` on a model with no active adapter."""
    data = read_config_json(path)
    from .peft_import import is_peft_config, load_peft  # imports this module
    if is_peft_config(data):
        return load_peft(model, path, data, name)
    data = check_adapter_config(path / CONFIG_NAME, data)
    method, config = _read_method_config(path, data)
    header = read_adapter_header(path)  # names, dtypes, shapes: no tensor data is read before they are checked
    try:
        targets = dict(find_targets(model, config.target_modules, exclude=config.modules_to_save))
    except TargetError as err:
        raise AdapterFileError(f"{path / CONFIG_NAME}: target_modules: {err}") from err
    _check_targets(path, data, config, targets)
    offsets = _declared_offsets(path, method, data, targets)

    try:
        with skip_init():
            attach(model, config, initialize=False, name=name)  # a failed attach leaves the model as it was
    except ConfigError as err:
        raise AdapterConfigError(f"{path / CONFIG_NAME}: {err}") from err
    except LorakitError as err:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {err}") from err
    state = get_state(model)
    try:
        state.base_model_name = data.get("base_model", "")
        check_tensor_names(adapter_tensors(model), header, path)
        check_offsets(state.layers, offsets, header, path)
        tensors = read_adapter_tensors(path)
        copy_adapter_tensors(model, tensors, move_bases=False)
        moves = {target: (tensors[f"{target}.base_offset_B"], tensors[f"{target}.base_offset_A"])
                 for target in state.layers if f"{target}.base_offset_B" in tensors}
        _check_loaded(state.layers, state.saved_modules, method.low_rank, path, moves)
        # checked while W0 is untouched (a refused load leaves it bit for bit); then W0 moves one layer at a time,
        # keeping no copy of it, as attach does (`undo_moves`)
        with undo_moves():
            for target, (offset_B, offset_A) in moves.items():
                state.layers[target].move_base(offset_B, offset_A)
    except BaseException:
        detach(model, name)
        raise
    return model


def _read_method_config(path: Path, data: dict[str, Any]) -> tuple[Method, AdapterConfig]:
    try:
        method = get_method(data["method"])
        return method, method.config_class.from_dict(data["config"])
    except ConfigError as err:
        raise AdapterConfigError(f"{path / CONFIG_NAME}: {err}") from err
    except LorakitError as err:
        raise AdapterFileError(f"{path / CONFIG_NAME}: {err}") from err


def _check_targets(path: Path, data: dict[str, Any], config: AdapterConfig, targets: dict[str, nn.Module]) -> None:
    """The adapter's layers are this model's targets, on the same base weights, and r fits them."""
    saved_fp: dict[str, Any] = data["fingerprint"]
    if set(targets) != set(saved_fp):
        missing, extra = sorted(set(saved_fp) - set(targets)), sorted(set(targets) - set(saved_fp))
        raise AdapterFileError(f"the adapter in {path} does not fit this model: layers in the adapter but "
                               f"not the model {missing[:5]}, in the model but not the adapter {extra[:5]}")
    for name, module in targets.items():
        if not fingerprints_match(saved_fp[name], weight_fingerprint(*_original_weight(module))):
            raise AdapterFileError(
                f"{path}: base weights differ at '{name}': this adapter was trained on "
                f"{data.get('base_model') or 'another model'!r}; load it on that base model")
        d_out, d_in = base_shape(module)
        if [d_out, d_in] != saved_fp[name]["shape"]:
            raise AdapterFileError(f"{path}: layer '{name}' is {d_out}x{d_in} here but {saved_fp[name]['shape']} "
                                   "in the adapter")
    largest = max(max(base_shape(m)) for m in targets.values())
    if config.r > largest:  # checked before attach allocates r-wide factors
        raise AdapterConfigError(f"{path / CONFIG_NAME}: config 'r' is {config.r}, larger than every targeted "
                                 f"layer (the largest dimension is {largest})")


def _declared_offsets(path: Path, method: Method, data: dict[str, Any],
                      targets: dict[str, nn.Module]) -> dict[str, int | None]:
    """Layer -> rank of the base offset the file must hold (``None``: any rank; files without the record)."""
    declared: dict[str, int] = data.get("base_offsets", {})
    unknown = sorted(set(declared) - set(targets))
    if unknown:
        raise _bad(path / CONFIG_NAME, "'base_offsets'", "adapter layers", unknown[:5])
    if method.base_offsets == "none" and declared:
        raise AdapterFileError(f"{path / CONFIG_NAME}: 'base_offsets' lists {sorted(declared)[:5]}, but "
                               f"{method.name} never moves the base weights")
    if method.base_offsets == "every-layer":
        if declared and set(declared) != set(targets):
            raise AdapterFileError(f"{path / CONFIG_NAME}: {method.name} moves the base weights of every layer; "
                                   f"'base_offsets' lacks {sorted(set(targets) - set(declared))[:5]}")
        return {name: declared.get(name) for name in targets}
    return dict(declared)


@torch.no_grad()
def _check_loaded(layers: dict[str, AdapterLayer], saved_modules: dict[str, tuple[nn.Module, nn.Module]],
                  low_rank: bool, path: Path, offsets: Mapping[str, tuple[Tensor, Tensor]] | None = None) -> None:
    """Every loaded tensor, update ΔW and base offset (a layer's own, or ``offsets[layer]``: factors that will
    move W0) is finite and within MAX_UPDATE_RATIO·max(1, max|W0|)."""
    def limit_of(reference: Tensor) -> float:
        return MAX_UPDATE_RATIO * max(1.0, _largest(reference))

    def check(what: str, value: Tensor, limit: float) -> None:
        top = _largest(value)
        if not math.isfinite(top) or top > limit:
            raise AdapterFileError(f"{path}: the loaded {what} has entries up to {top:.3g}, expected at most "
                                   f"{limit:.3g} ({MAX_UPDATE_RATIO:g} x max(1, max|W0|)): the adapter's tensors "
                                   "or its config (alpha, scales) were corrupted")

    def check_product(what: str, factors: tuple[Tensor, Tensor] | None, dense: Callable[[], Tensor],
                      limit: float) -> None:
        """``B @ A`` (or ``dense()``) within ``limit``; the dense product only when the factor bound
        ``max|(BA)_ij| <= max_i ‖B_i,:‖ · max_j ‖A_:,j‖`` (Cauchy-Schwarz) does not already show it."""
        if factors is not None:
            B, A = factors
            bound = float(B.norm(dim=1).max() * A.norm(dim=0).max()) if B.numel() and A.numel() else 0.0
            if bound <= limit:
                return
        check(what, dense(), limit)

    for name, layer in layers.items():
        # a quantized base is read dequantized (its packed tensor supports no reductions)
        limit = limit_of(layer.weight if layer.quant is not None else layer.original_weight
                         if layer.original_weight is not None else layer.base.weight)
        for key, tensor in layer.adapter_state().items():
            check(f"tensor '{name}.{key}'", tensor, limit)
        # as_lora() is the update itself for low-rank methods (the PEFT export relies on it)
        check_product(f"update of layer '{name}'", layer.as_lora() if low_rank else None, layer.delta_weight, limit)
        offset = (offsets or {}).get(name)
        if offset is not None:
            for key, tensor in zip(("base_offset_B", "base_offset_A"), offset):
                check(f"tensor '{name}.{key}'", tensor, limit)
        elif layer.base_offset_B is not None:
            offset = (layer.base_offset_B, layer.base_offset_A)
        if offset is not None:
            check_product(f"base offset of layer '{name}'", offset, lambda o=offset: o[0] @ o[1], limit)
    for name, (original, trainable) in saved_modules.items():
        reference = dict(original.state_dict())
        for key, tensor in trainable.state_dict().items():
            check(f"modules_to_save tensor '{name}.{key}'", tensor, limit_of(reference[key]))
