"""Export any low-rank adapter as a standard PEFT LoRA adapter (which vLLM also loads).

Each layer's update relative to the ORIGINAL base weight is written as plain ``lora_B @ lora_A``
with ``lora_alpha = r`` (scale 1, the method's scale folded into B):

* LoRA-family layers: ``(s·B, A)``;  LoRA-XS / LoRA-SB: ``(s·B R, A)``.
* Inits that moved W0 (PiSSA, OLoRA, LoRA-GA) train on ``W_res = W0 − B0 A0``, so the update
  relative to W0 is ``s·B A − B0 A0 = [s·B, −B0] [A; A0]``: rank doubles.

Ranks are made uniform (zero padding) because vLLM ignores ``rank_pattern``; ``rank_pattern=True``
writes each layer at its own rank instead (per-layer ranks from ``LoraConfig.rank_pattern`` included).
``modules_to_save`` are written only when asked.  `peft_import` reads such directories back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..api import get_state
from ..core import progress
from ..core.files import write_files
from ..core.inject import PEFT_PREFIX, target_names
from ..core.layer import AdapterLayer
from ..errors import LorakitError


def export_factors(layer: AdapterLayer) -> tuple[Tensor, Tensor]:
    """``(B, A)`` with ``B @ A`` = the layer's update relative to its original base weight (float32)."""
    factors = layer.as_lora()
    if factors is None:
        raise LorakitError(f"layer '{layer.name}' has a full-rank update ({type(layer).__name__}); it has no "
                           "exact LoRA form")
    B, A = (t.detach().float() for t in factors)
    if layer.base_offset_B is not None:
        B = torch.cat([B, -layer.base_offset_B], dim=1)
        A = torch.cat([A, layer.base_offset_A], dim=0)
    return B, A


def pad_rank(B: Tensor, A: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """``(B, A)`` of rank k <= r as rank r: zero columns of B and zero rows of A (the same product)."""
    k = B.shape[1]
    if k == r:
        return B, A
    return (torch.cat([B, B.new_zeros(B.shape[0], r - k)], dim=1),
            torch.cat([A, A.new_zeros(r - k, A.shape[1])], dim=0))


def export_peft(model: nn.Module, directory: str | os.PathLike, modules_to_save: bool = False,
                rank_pattern: bool = False, task_type: str | None = None) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` in PEFT's LoRA format."""
    state = get_state(model)
    if not state.method.low_rank:
        raise LorakitError(f"{state.method.name} updates are not low-rank and have no exact PEFT LoRA form; "
                           "use `lorakit merge` for the exact model")
    if any(layer.merged for layer in state.layers.values()):
        raise LorakitError("the adapter is merged into the base weights; unmerge(model) before exporting")
    factors = {name: export_factors(layer)
               for name, layer in progress.track(state.layers.items(), len(state.layers), "export")}
    ranks = {name: B.shape[1] for name, (B, _) in factors.items()}
    r = max(ranks.values())
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        if not rank_pattern:
            B, A = pad_rank(B, A, r)
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A.contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = B.contiguous()
    saved: list[str] = []
    if modules_to_save:
        for name, (_, trainable) in state.saved_modules.items():
            saved.append(name.rsplit(".", 1)[-1])
            for key, tensor in trainable.state_dict().items():
                tensors[f"{PEFT_PREFIX}{name}.{key}"] = tensor.detach().float().contiguous()

    pattern = {n: k for n, k in ranks.items() if k != r} if rank_pattern else {}
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": state.base_model_name or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": {n: k for n, k in pattern.items()},
        "target_modules": target_names(model, list(state.layers)),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": any(layer.transposed for layer in state.layers.values()),
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": saved or None,
        "inference_mode": True,
    }
    return write_peft_files(directory, {k: v.cpu() for k, v in tensors.items()}, config)


def write_peft_files(directory: str | os.PathLike, tensors: dict[str, Tensor], config: dict[str, Any]) -> Path:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``directory`` together
    (`lorakit.core.files.write_files`: all or nothing, symlinks replaced, never written through)."""
    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_files(directory, write, last="adapter_config.json")
