"""Quantized base layers: the one place that knows how to read and write a quantized base weight.

Supported bases (all ``nn.Linear`` subclasses or ``nn.Linear`` with a tensor-subclass weight):

* ``"nf4"`` / ``"fp4"``: bitsandbytes ``Linear4bit`` (``Params4bit``; double quantization or not),
* ``"int8"``: bitsandbytes ``Linear8bitLt`` with int8 weights (``Int8Params``, row-wise absmax scales),
* ``"torchao-int8"``: an ``nn.Linear`` after torchao's ``Int8WeightOnlyConfig`` (``Int8Tensor`` weight),
* ``"torchao-int4"``: an ``nn.Linear`` after torchao's ``Int4WeightOnlyConfig`` (``Int4*Tensor`` weight);
  its kernels need a GPU (and torchao's kernel package), so on a CPU it is refused when loading.

`dequantize` gives the weight as float32 ``(d_out, d_in)``; `requantize` writes a float weight back in the
layer's own format (same quantization type, block size and double quantization), replacing the weight
Parameter; `packed` returns the current packed weight as a self-contained object so that `restore` can
put it back bit for bit (an int8 weight keeps its scales).  Nothing here imports bitsandbytes or torchao:
a quantized layer can only exist once its library is imported, so it is read from ``sys.modules``.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import LorakitError

QUANT_KINDS = ("nf4", "fp4", "int8", "torchao-int8", "torchao-int4")

# Fingerprint tolerance (relative to the norm and to the largest probed entry): the worst elementwise
# error of each format is about half a quantization step of the block's absmax (nf4/fp4: 16 levels per
# 64-entry block, int8: 255 levels per row, torchao int4: 16 levels per group).
FINGERPRINT_RTOL = {None: 1e-2, "int8": 2e-2, "torchao-int8": 2e-2, "nf4": 0.25, "fp4": 0.35,
                    "torchao-int4": 0.25}


def _bnb() -> Any:
    return sys.modules.get("bitsandbytes")


def quant_kind(base: nn.Module) -> str | None:
    """The quantization of ``base``'s weight (one of `QUANT_KINDS`), ``None`` for a float weight.

    Raises `LorakitError` for a quantized weight lorakit cannot read (another torchao tensor subclass); a
    bitsandbytes layer that still holds float weights (not moved to a device yet) is a float layer.
    """
    w = getattr(base, "weight", None)
    if w is None:
        return None
    name = type(w).__name__
    if name == "Params4bit":
        if not getattr(w, "bnb_quantized", False):
            return None  # not quantized yet (bitsandbytes quantizes on the first .to(device))
        return str(w.quant_type)
    if name == "Int8Params":
        return "int8" if w.dtype == torch.int8 else None
    if type(w).__module__.startswith("torchao"):
        if name == "Int8Tensor" and getattr(w, "act_quant_kwargs", None) is None:
            return "torchao-int8"
        if name.startswith("Int4") and name.endswith("Tensor"):
            return "torchao-int4"
        what = f"{name} with activation quantization" if name == "Int8Tensor" else name
        raise LorakitError(f"the weight of this {type(base).__name__} is a torchao {what}; lorakit reads torchao "
                           "weight-only Int8Tensor and Int4*Tensor weights (Int8WeightOnlyConfig, "
                           "Int4WeightOnlyConfig); quantize the base with one of those")
    return None


def _int8_scales(base: nn.Module, weight: Tensor) -> Tensor:
    scb = getattr(weight, "SCB", None)
    if scb is None:  # after a forward, bitsandbytes keeps the scales in the layer's matmul state
        scb = base.state.SCB
    return scb


def prepare(base: nn.Module) -> None:
    """Keep a bitsandbytes 4-bit weight in its portable layout: its CPU inference path repacks the weight
    in place (``packing_format_for_cpu``) into a layout ``dequantize_4bit`` misreads; undo it, switch it off."""
    w = base.weight
    if type(w).__name__ == "Params4bit" and hasattr(base, "support_avx512bf16_for_cpu"):
        base.support_avx512bf16_for_cpu = False
        state = w.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            nested, dtype = state.original_nested, state.original_dtype
            w.data, w.quant_state = _bnb().functional._convert_weight_packed_for_cpu_inverse(w.data, state)
            if not nested:  # bitsandbytes 0.50's inverse leaves this absmax transposed, in bf16
                w.quant_state.absmax = w.quant_state.absmax.T.reshape(-1).to(dtype)


@torch.no_grad()
def dequantize(base: nn.Module, weight: Tensor | None = None) -> Tensor:
    """``base``'s weight (or ``weight``, a packed weight of ``base`` kept by `packed`) as float32 (d_out, d_in)."""
    kind = quant_kind(base)
    w = base.weight if weight is None else weight
    if kind in ("nf4", "fp4"):
        prepare(base)
        return _bnb().functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "int8":
        return w.data.float() * (_int8_scales(base, w).float()[:, None] / 127.0)
    if kind in ("torchao-int8", "torchao-int4"):
        return w.dequantize().float()
    return w.detach().float()


def packed(base: nn.Module) -> nn.Parameter:
    """The current packed weight as a self-contained Parameter (no copy), for `restore` later."""
    w = base.weight
    if quant_kind(base) == "int8" and getattr(w, "SCB", None) is None:
        w.SCB, w.CB = base.state.SCB, w.data  # the next forward reloads the matmul state from these
    return w


def restore(base: nn.Module, weight: nn.Parameter) -> None:
    """Swap a weight kept by `packed` into ``base``; the outgoing weight is made self-contained as well."""
    packed(base)
    base.weight = weight
    if quant_kind(base) == "int8":
        _fresh_int8_state(base)


def _fresh_int8_state(base: nn.Module) -> None:
    """A new matmul state for a new int8 weight (filled from it at the next forward); the old state object
    stays with any autograd graph that still needs it for its backward."""
    base.state = copy.copy(base.state)
    base.state.CB = base.state.SCB = None


@torch.no_grad()
def requantize(base: nn.Module, weight: Tensor) -> None:
    """Quantize the float ``weight`` (d_out, d_in) in ``base``'s own format and make it ``base``'s weight."""
    kind = quant_kind(base)
    old = base.weight
    device = old.device
    if kind in ("nf4", "fp4"):
        state = old.quant_state
        dtype = base.compute_dtype or state.dtype or torch.float32
        base.weight = _bnb().nn.Params4bit(
            weight.to("cpu", dtype), requires_grad=False, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=old.quant_storage,
            module=base).to(device)
    elif kind == "int8":
        base.weight = _bnb().nn.Int8Params(weight.to("cpu", torch.float16 if device.type == "cuda"
                                                     else torch.float32),
                                           requires_grad=False, has_fp16_weights=False).to(device)
        _fresh_int8_state(base)
    elif kind in ("torchao-int8", "torchao-int4"):
        base.weight = nn.Parameter(_torchao_quantize(weight.to(device, old.dtype), kind,
                                                     int(old.block_size[-1])),
                                   requires_grad=False)
    else:
        raise LorakitError(f"requantize: the weight of this {type(base).__name__} is not quantized")


def _torchao_quantize(weight: Tensor, kind: str, group: int) -> Tensor:
    """``weight`` quantized by torchao's weight-only config for ``kind`` with ``group`` entries per scale."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    holder.weight.data = weight
    if kind == "torchao-int8":
        config: Any = Int8WeightOnlyConfig() if group == weight.shape[1] else Int8WeightOnlyConfig(group_size=group)
    else:
        config = Int4WeightOnlyConfig(group_size=group)
    quantize_(holder, config)
    return holder.weight.detach()


def relative_error(base: nn.Module, target: Tensor) -> float:
    """``‖deq(W) − target‖ / ‖target‖`` after ``base`` holds a quantized ``target`` (the quantization error)."""
    target = target.float()
    return float((dequantize(base) - target).norm() / target.norm().clamp_min(1e-12))


def dequantized_linear(base: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` with ``base``'s dequantized weight (in ``dtype``, default its compute dtype)."""
    dtype = dtype or compute_dtype(base)
    w = dequantize(base)
    out = nn.Linear(w.shape[1], w.shape[0], bias=base.bias is not None, device=w.device, dtype=dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if base.bias is not None:
            out.bias.copy_(base.bias)
    out.requires_grad_(False)
    return out


def compute_dtype(base: nn.Module) -> torch.dtype:
    """The float dtype a quantized layer computes in (its bias dtype, bitsandbytes' compute dtype)."""
    kind = quant_kind(base)
    if kind in ("nf4", "fp4") and base.compute_dtype is not None:
        return base.compute_dtype
    if kind in ("torchao-int8", "torchao-int4"):
        return base.weight.dtype
    if base.bias is not None and base.bias.is_floating_point():
        return base.bias.dtype
    return torch.float32


def quantize_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """A quantized copy of the float ``linear`` in ``kind`` (bitsandbytes kinds build a new layer)."""
    device, dtype = linear.weight.device, linear.weight.dtype
    has_bias = linear.bias is not None
    if kind in ("nf4", "fp4", "int8"):
        import bitsandbytes as bnb
        if kind == "int8":
            q: nn.Module = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias,
                                               has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=has_bias, compute_dtype=dtype,
                                  quant_type=kind, compress_statistics=False)
        q.load_state_dict({k: v.to("cpu") for k, v in linear.state_dict().items()})
        q = q.to(device)
        prepare(q)
        if has_bias:
            q.bias.data = q.bias.data.to(dtype)
        return q.requires_grad_(False)
    q = copy.deepcopy(linear)
    group = linear.in_features if kind == "torchao-int8" else min(128, linear.in_features)  # per row / int4
    q.weight = nn.Parameter(_torchao_quantize(linear.weight.detach(), kind, group), requires_grad=False)
    return q


def quantize_model(model: nn.Module, kind: str, skip: tuple[str, ...] = ()) -> nn.Module:
    """Replace every float ``nn.Linear`` of ``model`` (but the output embedding and modules named in
    ``skip``) by its ``kind``-quantized copy, in place; the result is what bitsandbytes' and torchao's
    transformers integrations build (``Linear4bit``/``Linear8bitLt``, or a torchao weight tensor)."""
    if kind not in QUANT_KINDS:
        raise LorakitError(f"quantization must be one of {', '.join(QUANT_KINDS)}, got {kind!r}")
    if kind == "torchao-int4" and not torch.cuda.is_available():
        raise LorakitError("torchao-int4 needs a CUDA GPU (its int4 kernels do not run on a CPU); use "
                           "torchao-int8, int8 or nf4 here")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head and quant_kind(m) is None
             and not any(n == s or n.endswith("." + s) for s in skip)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, quantize_linear(getattr(parent, child), kind))
    return model
