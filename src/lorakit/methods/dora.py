"""DoRA (Liu et al. 2024, arXiv 2402.09353): weight-decomposed low-rank adaptation.

``W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_c`` (paper eq. 5).  In lorakit's ``(d_out, d_in)`` layout the paper's
column norm ``‖·‖_c`` is the norm of each output row.  ``m`` (d_out) is trainable and starts at
``‖W0 + s·B A‖_c`` (``= ‖W0‖_c`` with B = 0), so the initial output is unchanged; A, B start as in LoRA.

The norm is treated as a constant in backward (§4.3, "we suggest treating ‖V + ΔV‖_c as a constant ... detaching
it from the gradient graph"): gradients reach ``m`` and, through the direction ``W0 + s·B A``, A and B, but not
through the norm.  The forward reuses the base output (PEFT's formulation)::

    f = m / ‖W0 + s·B A‖_c (detached);   y = W0 x + b + (f − 1) ⊙ W0 x + f ⊙ s·B A x

With dropout active the adapter path (both terms) sees ``dropout(x)``, as in PEFT.  DoRA's update is not
low-rank (it rescales W0's rows); `export_peft_dora` writes the adapter in PEFT's ``use_dora=True`` format.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.files import write_files
from ..core.inject import PEFT_PREFIX, target_names
from ..core.registry import Method, register
from ..core.state import get_state
from ..errors import LorakitError
from .lora import LoraConfig, LoraLayer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DoraConfig(LoraConfig):
    """DoRA: LoRA's fields (``use_rslora`` included) plus a trainable magnitude per output row."""

    method: ClassVar[str] = "dora"


class DoraLayer(LoraLayer):
    """LoRA factors plus ``lora_magnitude`` (d_out).  Merging caches the row norm so unmerge is exact (as PEFT)."""

    def __init__(self, base: nn.Module, config: DoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        with torch.no_grad():
            norm = self.row_norm(self.weight.float())
        self.lora_magnitude = nn.Parameter(norm.to(self.lora_A.dtype))
        self.merged_norm: Tensor | None = None

    def lora_weight(self) -> Tensor:
        """``s·B A`` (d_out, d_in)."""
        return (self.lora_B * self.scale) @ self.lora_A

    def row_norm(self, w0: Tensor) -> Tensor:
        """``‖W0 + s·B A‖_c`` per output row, detached (paper §4.3)."""
        return torch.linalg.vector_norm(w0 + self.lora_weight().detach().to(w0.dtype), dim=1).detach()

    def factor(self, w0: Tensor) -> Tensor:
        """``f = m / ‖W0 + s·B A‖_c`` (d_out)."""
        return self.lora_magnitude / self.row_norm(w0).to(self.lora_magnitude.dtype)

    def _adapter_out(self, x: Tensor, base_out: Tensor) -> Tensor:
        """``(f − 1) ⊙ W0 x + f ⊙ s·B A x`` given ``base_out = W0 x`` (no bias)."""
        f = self.factor(self.weight.to(self.lora_A.dtype))
        h = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scale, self.lora_B)
        return (f - 1) * base_out.to(f.dtype) + f * h

    def delta(self, x: Tensor) -> Tensor:
        x = self.dropout(x)
        return self._adapter_out(x, F.linear(x, self.weight.to(x.dtype)))

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base.bias
            base_out = out if bias is None else out - bias  # reuse W0 x from the base output (as PEFT)
            return out + self._adapter_out(x, base_out).to(out.dtype)
        return out + self.delta(x).to(out.dtype)

    def delta_weight(self) -> Tensor:
        w0 = self.unmerged_weight()
        direction = w0 + self.lora_weight()
        return self.factor(w0)[:, None] * direction - w0

    def unmerged_weight(self) -> Tensor:
        """W0 in float32, recovered from the merged weight when merged: ``W0 = W'/f − s·B A``."""
        w = self.weight.to(self.lora_A.dtype)
        if not self.merged:
            return w
        f = self.lora_magnitude / self.merged_norm
        return w / f[:, None] - self.lora_weight()

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        if self.merged:
            logger.warning("%s is already merged; merging again changes nothing", self.name)
            return
        w0 = self.weight.to(self.lora_A.dtype)
        update = self.delta_weight()
        if safe and not torch.isfinite(update).all():
            raise LorakitError(f"refusing to merge layer '{self.name}': its update has NaN or inf values; "
                               "the base weights were left unchanged")
        self.merged_norm = self.row_norm(w0)
        self._add_to_base(update)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            logger.warning("%s is not merged; unmerge changes nothing", self.name)
            return
        self._add_to_base(self.unmerged_weight() - self.weight.to(self.lora_A.dtype))
        self.merged = False
        self.merged_norm = None


def dora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * (d_in + d_out) + d_out


def write_peft_lora(model: nn.Module, directory: str | os.PathLike, factors: dict[str, tuple[Tensor, Tensor]],
                    magnitudes: dict[str, Tensor] | None = None, task_type: str | None = None) -> Path:
    """Write ``(B, A)`` per layer as a PEFT LoRA adapter (``lora_alpha = r``: scale 1, ranks zero-padded to the
    largest); ``magnitudes`` adds DoRA's ``lora_magnitude_vector`` and sets ``use_dora``."""
    state = get_state(model)
    r = max(B.shape[1] for B, _ in factors.values())
    tensors: dict[str, Tensor] = {}
    for name, (B, A) in factors.items():
        k = B.shape[1]
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat([A.float(), A.new_zeros(r - k, A.shape[1])])
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.cat([B.float(), B.new_zeros(B.shape[0], r - k)], 1)
    for name, m in (magnitudes or {}).items():
        tensors[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.float()
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": state.base_model_name or None,
        "r": r, "lora_alpha": r, "target_modules": target_names(model, list(state.layers)), "lora_dropout": 0.0,
        "bias": "none", "fan_in_fan_out": any(layer.transposed for layer in state.layers.values()),
        "use_rslora": False, "use_dora": magnitudes is not None, "init_lora_weights": True, "inference_mode": True,
    }

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "adapter_model.safetensors",
                  metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")

    return write_files(directory, write, last="adapter_config.json")  # together, never through a planted link


@torch.no_grad()
def export_peft_dora(model: nn.Module, directory: str | os.PathLike, task_type: str | None = None) -> Path:
    """Write the DoRA adapter in PEFT's LoRA format with ``use_dora=True`` (s folded into B)."""
    state = get_state(model)
    if state.method.name != "dora":
        raise LorakitError(f"export_peft_dora exports DoRA adapters; this model has {state.method.name!r}")
    if any(layer.merged for layer in state.layers.values()):
        raise LorakitError("the adapter is merged into the base weights; unmerge(model) before exporting")
    layers = {n: layer for n, layer in state.layers.items() if isinstance(layer, DoraLayer)}
    factors = {n: (layer.lora_B * layer.scale, layer.lora_A) for n, layer in layers.items()}
    magnitudes = {n: layer.lora_magnitude for n, layer in layers.items()}
    return write_peft_lora(model, directory, factors, magnitudes, task_type)


register(Method(
    name="dora", paper="Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation, arXiv 2402.09353",
    config_class=DoraConfig, layer_class=DoraLayer, trainable="A, B, magnitude m", params_per_matrix=dora_params,
    low_rank=False))
