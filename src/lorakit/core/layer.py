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
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers.pytorch_utils import Conv1D

from ..config import AdapterConfig
from ..errors import LorakitError
from .quant import dequantize, packed, prepare, quant_kind, relative_error, requantize, restore

logger = logging.getLogger(__name__)

SUPPORTED_BASES = (nn.Linear, Conv1D)
_SKIP_INIT = False
_KEEP_ORIGINAL = False


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


@contextlib.contextmanager
def keep_original() -> Iterator[None]:
    """Layers built inside this block keep the untouched W0 in CPU memory when their init moves it
    (`AdapterLayer.move_base`), so `detach` restores it bit for bit; the cost is one copy of every moved
    weight in CPU memory.  By default W0 is not kept and `detach` recomputes it within float rounding."""
    global _KEEP_ORIGINAL
    previous, _KEEP_ORIGINAL = _KEEP_ORIGINAL, True
    try:
        yield
    finally:
        _KEEP_ORIGINAL = previous


_MOVES: list[tuple[AdapterLayer, Tensor | None, Tensor | None]] | None = None  # journal of `undo_moves`


@contextlib.contextmanager
def undo_moves() -> Iterator[None]:
    """If the block raises, every layer whose W0 `move_base` moved inside it is put back, newest first: from its
    residual and offset (`restore_base`: W0 within one rounding of the residual in the weight's dtype; bit for bit
    on a quantized base or where W0 is kept), or to the offset it had before the block.

    This is how a W0-moving init (PiSSA, OLoRA, BA-LoRA, LoRA-GA) stays undoable at any size: each `move_base`
    completes (residual and offset stored) before the next layer starts and keeps no float W0, so beyond the
    adapter and its saved offsets the init holds one layer's work at a time (its factorisation and the new
    residual), not a copy of every moved weight (``benchmarks/results/scale.md``)."""
    global _MOVES
    previous, journal = _MOVES, []
    _MOVES = journal
    try:
        yield
    except BaseException:
        _MOVES = None  # the undoing moves are not journaled
        with torch.no_grad():
            for layer, offset_B, offset_A in reversed(journal):
                if offset_B is None:
                    layer.restore_base()
                else:
                    layer.move_base(offset_B, offset_A)
        raise
    finally:
        _MOVES = previous
    if previous is not None:  # an enclosing block undoes these too if it fails later
        previous.extend(journal)


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
    residual, and `detach` restores W0 (see `move_base` for what is kept).  A quantized base
    (`lorakit.core.quant`) is read dequantized through `weight` and written back re-quantized.
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
        try:
            self.quant = quant_kind(base)
        except LorakitError as err:
            raise LorakitError(f"{config.method} cannot adapt layer '{name}': {err}") from None
        if self.quant is not None:
            prepare(base)
        self.keep_original = _KEEP_ORIGINAL
        self.original_weight: Tensor | None = None  # W0 kept by move_base (packed, or under keep_original)
        self.residual_quant_error: float | None = None
        self.parked_weight: Tensor | None = None  # this layer's residual while its adapter is inactive
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
        """The base weight in ``(d_out, d_in)`` layout (a view for Conv1D; dequantized to float32, a new
        tensor, for a quantized base)."""
        if self.quant is not None:
            return dequantize(self.base)
        w = self.base.weight
        return w.T if self.transposed else w

    def adapter_device_dtype(self) -> tuple[torch.device, torch.dtype]:
        """Where adapter tensors live: the base's device; float32 unless the base is float64."""
        w = self.base.weight
        return w.device, (torch.float64 if w.dtype == torch.float64 else torch.float32)

    @torch.no_grad()
    def _add_to_base(self, update: Tensor) -> None:
        """``W <- W + update``; a quantized base is dequantized, updated and re-quantized (as PEFT merges)."""
        if self.quant is not None:
            requantize(self.base, dequantize(self.base) + update.float())
            return
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
    def original_float(self) -> Tensor:
        """The untouched W0 in float32 (``d_out, d_in``): dequantized on a quantized base; on a float base
        whose W0 was moved and not kept, recomputed as ``residual + offset_B @ offset_A``."""
        if self.quant is not None:
            return dequantize(self.base, self.original_weight)
        if self.original_weight is not None:
            w = self.original_weight.to(self.base.weight.device, torch.float32)
            return w.T if self.transposed else w
        w = self.weight.float()
        if self.base_offset_B is not None:
            w = w + self.base_offset_B @ self.base_offset_A
        return w

    @torch.no_grad()
    def move_base(self, offset_B: Tensor, offset_A: Tensor) -> None:
        """``W0 <- W0 - offset_B @ offset_A`` in float32, then cast back (re-quantized on a quantized base).

        Used by inits that make the adapter carry part of W0 (PiSSA, OLoRA) or that cancel their own
        initial output (LoRA-GA).  The factors are saved, so loading recomputes the identical residual.
        The base's device then holds the residual only: a float W0 is not kept (`restore_base` recomputes
        it) unless the layer was built inside `keep_original`, which keeps it in CPU memory; a quantized
        base keeps its packed W0 (no copy: the residual is a new packed weight), so `detach` is exact.
        On a quantized base the residual's relative quantization error is logged and kept in
        ``residual_quant_error`` (as PEFT reports it for PiSSA on 4-bit bases).
        """
        w = self.base.weight
        if isinstance(w, DTensor):  # sharded by FSDP2: rewrite this rank's rows in place (FSDP gathers from them)
            if _MOVES is not None:
                _MOVES.append((self, self.base_offset_B, self.base_offset_A))
            self.register_buffer("base_offset_B", offset_B.detach().to(w.device, torch.float32).clone())
            self.register_buffer("base_offset_A", offset_A.detach().to(w.device, torch.float32).clone())
            offset = self.base_offset_B @ self.base_offset_A
            if self.original_weight is None:  # this rank's shard of W0 (1/world of the weight)
                self.original_weight = w.detach().clone()
            local = distribute_tensor(offset.T if self.transposed else offset, w.device_mesh, w.placements,
                                      src_data_rank=None)
            w.detach().copy_((self.original_weight.float() - local).to(w.dtype))
            return
        if self.quant is not None and self.original_weight is None:  # a plain attribute, not a parameter:
            object.__setattr__(self, "original_weight", packed(self.base))
        elif self.keep_original and self.original_weight is None:
            self.original_weight = w.data.to("cpu")  # the untouched tensor (a copy only off the CPU)
        w0 = self.original_float()
        offset_B = offset_B.detach().to(w0.device, torch.float32).clone()
        offset_A = offset_A.detach().to(w0.device, torch.float32).clone()
        residual = offset_B @ offset_A
        torch.sub(w0, residual, out=residual)  # W0 - B A into the product's memory: one layer-sized temporary
        del w0
        # commit: until here nothing of the layer changed, so a failure above leaves W0 as it was
        if _MOVES is not None:
            _MOVES.append((self, self.base_offset_B, self.base_offset_A))
        self.register_buffer("base_offset_B", offset_B)
        self.register_buffer("base_offset_A", offset_A)
        if self.quant is not None:
            requantize(self.base, residual)
            self.residual_quant_error = relative_error(self.base, residual)
            logger.info("%s: the %s-quantized residual W0 - BA has relative error %.4g", self.name, self.quant,
                        self.residual_quant_error)
        else:
            w.data = (residual.T if self.transposed else residual).to(w.dtype)

    @torch.no_grad()
    def restore_base(self) -> None:
        """Put back the untouched W0 (after `move_base`), e.g. for `detach`: bit for bit on a quantized base
        or when kept (`keep_original`); otherwise ``residual + offset`` recomputed in float32 and cast to the
        weight's dtype, i.e. W0 within one rounding of the residual in that dtype."""
        if self.merged:
            self.unmerge()
        if self.base_offset_B is None:
            return
        if isinstance(self.original_weight, DTensor):  # sharded (FSDP2): in place, as `move_base` wrote it
            self.base.weight.detach().copy_(self.original_weight)
        elif self.quant is not None:
            restore(self.base, self.original_weight)
        elif self.original_weight is not None:
            self.base.weight.data = self.original_weight.to(self.base.weight.device)
        else:
            w, w0 = self.base.weight, self.original_float()
            w.data = (w0.T if self.transposed else w0).to(w.dtype)
        self.original_weight = None
        self.base_offset_B = self.base_offset_A = None

    @torch.no_grad()
    def park_base(self) -> None:
        """Put W0 back into the base while this layer's adapter is inactive (named adapters), keeping the moved
        weight aside for `unpark_base`, which puts it back bit for bit.  W0 is the kept original (bit for bit:
        quantized, or `keep_original`); a layer without one keeps ``residual + offset_B @ offset_A`` cast to the
        weight's dtype (CPU memory) the first time it is parked, so every later switch, and `restore_base`,
        put back that same tensor (W0 within one rounding of the residual, as `restore_base` documents)."""
        if self.base_offset_B is None or self.parked_weight is not None:
            return
        if self.quant is not None:
            object.__setattr__(self, "parked_weight", packed(self.base))
            restore(self.base, self.original_weight)
            return
        w = self.base.weight
        if self.original_weight is None:
            w0 = self.original_float()
            self.original_weight = (w0.T if self.transposed else w0).to(w.dtype).to("cpu")
            self.keep_original = True
        self.parked_weight = w.data
        w.data = self.original_weight.to(w.device, w.dtype, copy=True)  # a copy: a merge into it must not reach W0

    @torch.no_grad()
    def unpark_base(self) -> None:
        """Undo `park_base`: the base computes with this layer's moved weight again (the same tensor)."""
        if self.parked_weight is None:
            return
        if self.quant is not None:
            restore(self.base, self.parked_weight)
        else:
            w = self.base.weight
            w.data = self.parked_weight.to(w.device, w.dtype)
        object.__setattr__(self, "parked_weight", None)

    @contextlib.contextmanager
    def original_base(self) -> Iterator[None]:
        """Inside the block the base computes with W0 (after `move_base`): a kept W0 (quantized, or under
        `keep_original`) is swapped in; otherwise a hook adds ``offset_B (offset_A x)`` to the residual's
        output, so no full-size W0 is formed (the output equals W0 x within float rounding)."""
        if self.base_offset_B is None:
            yield
            return
        if self.original_weight is None:
            B, A = self.base_offset_B, self.base_offset_A

            def add_offset(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
                return out + F.linear(F.linear(args[0].to(A.dtype), A), B).to(out.dtype)
            handle = self.base.register_forward_hook(add_offset)
            try:
                yield
            finally:
                handle.remove()
            return
        current = self.base.weight if self.quant is not None else self.base.weight.data
        if self.quant is not None:
            restore(self.base, self.original_weight)
        else:
            self.base.weight.data = self.original_weight.to(current.device)
        try:
            yield
        finally:
            if self.quant is not None:
                restore(self.base, current)
            else:
                self.base.weight.data = current

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
