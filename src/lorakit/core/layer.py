"""The adapter-layer protocol: a frozen base linear layer plus a method's update.

``forward(x) = base(x) + delta(x)`` unless merged or disabled.  A method subclasses `AdapterLayer`
and implements `delta` (the added output, in its cheapest order) and `delta_weight` (the dense
update, for merge, export and tests).  Weights are handled in ``(d_out, d_in)`` layout everywhere;
`transformers`' ``Conv1D`` (GPT-2), which stores ``(d_in, d_out)``, is transposed at the edges only.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.pytorch_utils import Conv1D

from ..config import AdapterConfig
from ..errors import LorakitError

logger = logging.getLogger(__name__)

SUPPORTED_BASES = (nn.Linear, Conv1D)
_SKIP_INIT = False


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Layers built inside this block skip their (possibly costly) init: `load` overwrites them."""
    global _SKIP_INIT
    previous, _SKIP_INIT = _SKIP_INIT, True
    try:
        yield
    finally:
        _SKIP_INIT = previous


def init_skipped() -> bool:
    return _SKIP_INIT


def base_shape(base: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D."""
    if isinstance(base, Conv1D):
        d_in, d_out = base.weight.shape
        return d_out, d_in
    return base.out_features, base.in_features


class AdapterLayer(nn.Module):
    """Wraps one frozen ``nn.Linear`` / ``Conv1D``.  Subclasses add their parameters in ``__init__``
    (trainable ones as ``nn.Parameter``, frozen factors as buffers) and implement `delta`/`delta_weight`.

    Methods whose initialisation moves W0 (PiSSA, OLoRA, LoRA-GA) call `move_base` with low-rank
    factors of the offset; the factors are saved with the adapter so `load` rebuilds the same
    residual, and the untouched W0 is kept so `detach` restores it bit for bit.
    """

    def __init__(self, base: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.config = config
        self.out_features, self.in_features = base_shape(base)
        self.transposed = isinstance(base, Conv1D)
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        self.original_weight: Tensor | None = None
        self.register_buffer("base_offset_B", None)  # set by move_base
        self.register_buffer("base_offset_A", None)

    # -- the protocol -------------------------------------------------------------------------
    def delta(self, x: Tensor) -> Tensor:
        """The method's added output for input ``x`` (``..., d_in``) -> (``..., d_out``)."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The dense update ``ΔW`` (``d_out, d_in``, float32) such that the layer computes ``(W + ΔW) x``."""
        raise NotImplementedError

    def as_lora(self) -> tuple[Tensor, Tensor] | None:
        """``(B, A)`` with ``B @ A == delta_weight()``, or ``None`` when the update is not low-rank."""
        return None

    def forward(self, x: Tensor) -> Tensor:
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        return out + self.delta(x).to(out.dtype)

    # -- weights -------------------------------------------------------------------------------
    @property
    def weight(self) -> Tensor:
        """The base weight in ``(d_out, d_in)`` layout (a view for Conv1D)."""
        w = self.base.weight
        return w.T if self.transposed else w

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where adapter tensors live: the base's device; float32 unless the base is float64."""
        w = self.base.weight
        return w.device, (torch.float64 if w.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def _add_to_base(self, update: Tensor) -> None:
        w = self.base.weight
        w.add_((update.T if self.transposed else update).to(w.dtype))

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        """``W <- W + ΔW``.  ``safe`` raises if the update holds a NaN or inf (nothing is changed)."""
        if self.merged:
            logger.warning("%s is already merged; merging again changes nothing", self.name)
            return
        update = self.delta_weight()
        if safe and not torch.isfinite(update).all():
            raise LorakitError(f"refusing to merge layer '{self.name}': its update has NaN or inf values; "
                               "the base weights were left unchanged")
        self._add_to_base(update)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """``W <- W - ΔW`` (exact within fp32 rounding)."""
        if not self.merged:
            logger.warning("%s is not merged; unmerge changes nothing", self.name)
            return
        self._add_to_base(-self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def move_base(self, offset_B: Tensor, offset_A: Tensor) -> None:
        """``W0 <- W0 - offset_B @ offset_A`` in float32, then cast back; keeps the original W0 for `detach`.

        Used by inits that make the adapter carry part of W0 (PiSSA, OLoRA) or that cancel their own
        initial output (LoRA-GA).  The factors are saved, so loading recomputes the identical residual.
        """
        w = self.base.weight
        self.register_buffer("base_offset_B", offset_B.detach().to(w.device, torch.float32).clone())
        self.register_buffer("base_offset_A", offset_A.detach().to(w.device, torch.float32).clone())
        offset = self.base_offset_B @ self.base_offset_A
        offset = offset.T if self.transposed else offset
        if isinstance(w, DTensor):  # sharded by FSDP2: rewrite this rank's rows in place (FSDP gathers from them)
            if self.original_weight is None:
                self.original_weight = w.detach().clone()
            local = distribute_tensor(offset, w.device_mesh, w.placements, src_data_rank=None)
            w.detach().copy_((self.original_weight.float() - local).to(w.dtype))
            return
        if self.original_weight is None:
            self.original_weight = w.data
        original = self.original_weight.to(w.device, torch.float32)
        w.data = (original - offset).to(w.dtype)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put back the untouched W0 object (after `move_base`), e.g. for `detach`."""
        if self.merged:
            self.unmerge()
        if isinstance(self.original_weight, DTensor):  # sharded (FSDP2): in place, as `move_base` wrote it
            self.base.weight.detach().copy_(self.original_weight)
        elif self.original_weight is not None:
            self.base.weight.data = self.original_weight.to(self.base.weight.device)
        self.original_weight = None

    # -- persistence ------------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, Tensor]:
        """Every tensor that defines this adapter (trainable and frozen), without the base weights."""
        state = {n: t for n, t in self.named_parameters() if not n.startswith("base.")}
        state.update({n: t for n, t in self.named_buffers() if not n.startswith("base.")})
        return state

    @torch.no_grad()
    def load_adapter_state(self, state: dict[str, Tensor]) -> None:
        """Copy saved tensors in (shapes already checked by the caller) and rebuild any base offset."""
        for name, tensor in self.adapter_state().items():
            if not name.startswith("base_offset_"):
                tensor.copy_(state[name].to(tensor.device, tensor.dtype))
        if "base_offset_B" in state:
            self.move_base(state["base_offset_B"], state["base_offset_A"])

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, r={self.config.r}"
