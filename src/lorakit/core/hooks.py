"""The training-hook protocol: the fixed points of a training step where a method may act.

The lorakit trainer and the Hugging Face Trainer callback call these in this order each step::

    hooks.before_forward(step)                    # Flat-LoRA perturbation, DyLoRA rank sampling, ...
    for each micro-batch:                          # `lorakit.core.driver.step_loss`
        task_loss, logits = forward(batch)
        hooks.after_forward(batch, task_loss, logits)  # BA-LoRA, ALoRA, PRILoRA see the batch here
        loss = task_loss + hooks.regularizer()    # AdaLoRA/LoRA² orthogonality, BA-LoRA, ...
    loss.backward()
    hooks.after_loss(step, task_loss)             # XGBLoRA's loss-plateau rule
    clip_grad_norm_(trainable, max_grad_norm)     # on the raw gradients, as transformers.Trainer does
    hooks.after_backward(step)                    # gradient adjustment (LoRA-Pro), end of perturbation
    optimizer.step()
    hooks.after_step(step)                        # rank masks, proximal steps, boosting merges
    optimizer.zero_grad()

`build_optimizer` lets a method choose its optimizer or parameter groups (LoRA+, LoRA-RITE); the
front ends ask for it once, and again whenever `optimizer_reset_requested` is set (Chain of LoRA,
XGBLoRA start each link/round with a fresh optimizer state; `lorakit.core.driver.reset_optimizer`).
No method registers torch forward hooks: what a step computes reaches the hooks as arguments.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import AdapterFileError

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from .layer import AdapterLayer


class TrainingHooks:
    """Default hooks: plain AdamW on the trainable parameters, nothing else.

    ``needs_logits``: whether `after_forward` must receive the logits of every position (the driver then computes
    them; a custom ``loss_fn``, which gives none, is refused).  ``state_attrs``: the attributes a checkpoint
    carries; each class lists its own, `state_dict` takes them over the class hierarchy."""

    needs_logits: ClassVar[bool] = False
    state_attrs: ClassVar[tuple[str, ...]] = ("total_steps", "optimizer_reset_requested")

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: AdapterConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.total_steps: int | None = None
        self.optimizer_reset_requested = False

    def on_train_begin(self, total_steps: int) -> None:
        """Receives the planned number of optimizer steps; called once, before the first step (and before a
        data-driven init in the HF callback).  May set schedules; must not touch parameters."""
        self.total_steps = total_steps

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        """Receives the parameters that require grad, the run's lr and weight decay; called before the first step
        and on every requested reset.  Returns the optimizer (any groups; each group's lr is then scaled by the
        run's schedule) and clears `optimizer_reset_requested`."""
        self.optimizer_reset_requested = False
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def before_forward(self, step: int) -> None:
        """Receives the 0-based optimizer step; called once per step before its first micro-batch's forward.
        May change adapter weights or masks for this step's forwards (perturbation, rank sampling)."""

    def after_forward(self, batch: Any, loss: Tensor, logits: Tensor | None) -> None:
        """Receives a training micro-batch (the model's inputs), its task loss (detached, float32) and, only if
        `needs_logits`, the logits of every position (attached to the graph); called after each training
        forward, before `regularizer`.  May only record (for the regularizer, statistics, validation data)."""

    def regularizer(self) -> Tensor | None:
        """Called once per micro-batch after `after_forward`; returns a term added to the task loss (with a graph
        to the adapter), or None.  May consume what `after_forward` recorded."""
        return None

    def after_loss(self, step: int, loss: float) -> None:
        """Receives the task loss (a float, regularizer excluded) of optimizer step ``step``, after backward and
        before ``after_backward``.  The lorakit trainer calls it once per step with the mean over the step's
        micro-batches (and ranks); `LorakitTrainerMixin` once per micro-batch, with the loss
        ``Trainer.compute_loss`` returns.  It may only record: the gradients are already computed."""

    def after_backward(self, step: int) -> None:
        """Called once per step after the gradients are summed over ranks and clipped, before the optimizer step.
        May change the gradients (LoRA-Pro) or undo a perturbation made in `before_forward`."""

    def after_step(self, step: int) -> None:
        """Called once per step after the optimizer step, before the gradients are zeroed.  May change parameters,
        masks and ranks (proximal steps, pruning, merges) and set `optimizer_reset_requested`."""

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging (current budget, sparsity, ...)."""
        return {}

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
        """What a resumed run needs: ``(plain, tensors, unsupported)``.

        Of the declared ``state_attrs`` (those set): ``plain``, the values that survive a JSON round trip
        (counters, budgets, masks as lists); ``tensors``, tensor attributes, alone or in str-keyed dicts of tensors
        or of tuples of tensors (EMAs, moments), flattened to ``attr/key/i``; ``unsupported``: the names of
        anything else, and of public attributes that are not declared (their state would be lost on resume).
        """
        plain: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        layout: dict[str, str] = {}
        declared = self.declared_state()
        unsupported = [name for name in vars(self) if not name.startswith("_") and name not in declared
                       and name not in ("model", "layers", "config")]
        for name in declared:
            if name not in vars(self):
                continue
            value = getattr(self, name)
            if isinstance(value, Tensor):
                tensors[name], layout[name] = value, "tensor"
            elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and all(
                    isinstance(v, Tensor) for v in value.values()):
                tensors.update({f"{name}/{key}": v for key, v in value.items()})
                layout[name] = "dict"
            elif isinstance(value, dict) and value and all(isinstance(k, str) for k in value) and all(
                    isinstance(v, tuple) and all(isinstance(t, Tensor) for t in v) for v in value.values()):
                tensors.update({f"{name}/{key}/{i}": t for key, v in value.items() for i, t in enumerate(v)})
                layout[name] = "dict-tuple"
            elif _survives_json(value):
                plain[name] = value
            else:
                unsupported.append(name)
        plain["__tensor_layout__"] = layout
        return plain, {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, unsupported

    @classmethod
    def declared_state(cls) -> list[str]:
        """The ``state_attrs`` of this class and its bases, base classes first."""
        names: list[str] = []
        for klass in reversed(cls.__mro__):
            names += [n for n in vars(klass).get("state_attrs", ()) if n not in names]
        return names

    def load_state_dict(self, plain: dict[str, Any], tensors: dict[str, Tensor],
                        source: str = "the checkpoint") -> None:
        """Restore `state_dict`'s output (tensors move to the device of the first adapter layer), after
        `checked_state` accepted all of it: a bad value changes nothing."""
        for name, value in self.checked_state(plain, tensors, source).items():
            setattr(self, name, value)

    def checked_state(self, plain: dict[str, Any], tensors: dict[str, Tensor], source: str) -> dict[str, Any]:
        """`state_dict`'s output as ``{attribute: value}``, checked before anything is set: only declared
        ``state_attrs``; each value of the kind the attribute holds now (after ``on_train_begin``: an int stays an
        int, a tensor keeps its dtype and shape); every number and tensor finite; then the class's own ranges
        (`check_state`).  Anything else is an `AdapterFileError` naming ``source`` and the key."""
        declared = set(self.declared_state())
        plain = dict(plain)
        layout = plain.pop("__tensor_layout__", {})
        if not isinstance(layout, dict) or not all(v in ("tensor", "dict", "dict-tuple") for v in layout.values()):
            raise AdapterFileError(f"{source}: hooks.__tensor_layout__ must map attributes to 'tensor', 'dict' or "
                                   f"'dict-tuple', got {layout!r}")
        unknown = sorted((set(plain) | set(layout)) - declared)
        if unknown:
            raise AdapterFileError(f"{source}: hooks.{unknown[0]} is not state of {type(self).__name__} (it carries "
                                   f"{', '.join(sorted(declared))}); the checkpoint belongs to another method")
        values = dict(plain)
        device = next((p.device for layer in self.layers.values() for p in layer.parameters()), None)
        claimed: set[str] = set()
        for name, kind in layout.items():
            own = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + "/")}
            claimed.update(f"{name}/{k}" for k in own)
            if kind == "tensor":
                if name not in tensors:
                    raise AdapterFileError(f"{source}: the tensor of hooks.{name} is missing")
                claimed.add(name)
                values[name] = tensors[name].to(device)
            elif kind == "dict":
                values[name] = {k: v.to(device) for k, v in own.items()}
            else:
                grouped: dict[str, dict[int, Tensor]] = {}
                for key, t in own.items():
                    base, _, index = key.rpartition("/")
                    if not index.isdigit():
                        raise AdapterFileError(f"{source}: hooks tensor {name}/{key} has no tuple index")
                    grouped.setdefault(base, {})[int(index)] = t.to(device)
                if any(sorted(v) != list(range(len(v))) for v in grouped.values()):
                    raise AdapterFileError(f"{source}: the tuples of hooks.{name} have missing items")
                values[name] = {k: tuple(v[i] for i in sorted(v)) for k, v in grouped.items()}
        stray = sorted(set(tensors) - claimed)
        if stray:
            raise AdapterFileError(f"{source}: hooks tensor {stray[0]!r} belongs to no declared attribute")
        for name, value in values.items():
            _check_like(f"{source}: hooks.{name}", value, getattr(self, name, None))
        try:
            self.check_state(values)
        except (ValueError, TypeError) as err:
            raise AdapterFileError(f"{source}: hooks.{err}") from None
        return values

    def check_state(self, values: dict[str, Any]) -> None:
        """The class's own ranges for saved state (``values``: attribute -> value, kinds already checked); raise
        ``ValueError("<attribute> must be ..., got ...")``.  The base class checks its own attributes."""
        total = values.get("total_steps")
        if total is not None and total < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total}")


def _check_like(where: str, value: Any, like: Any) -> None:
    """``value`` is finite and of the kind of ``like`` (the attribute's value now; None: any kind)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterFileError(f"{where} holds NaN or inf")
        if isinstance(like, Tensor) and (value.dtype != like.dtype or value.shape != like.shape):
            raise AdapterFileError(f"{where} is a {value.dtype} tensor of shape {list(value.shape)}; expected "
                                   f"{like.dtype} of shape {list(like.shape)}")
        if like is not None and not isinstance(like, Tensor):
            raise AdapterFileError(f"{where} is a tensor; expected {type(like).__name__}")
        return
    if isinstance(value, float) and not math.isfinite(value) and value != like:  # inf where the start value is inf
        raise AdapterFileError(f"{where} is {value}; expected a finite number")
    if like is not None:
        kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,), list: (list,), dict: (dict,),
                 tuple: (tuple, list)}
        expected = kinds.get(type(like), (type(like),))
        if not isinstance(value, expected) or (isinstance(value, bool) and type(like) is not bool):
            raise AdapterFileError(f"{where} is {type(value).__name__} {value!r:.60}; expected {type(like).__name__}")
    if isinstance(value, (list, tuple)):
        sample = like[0] if isinstance(like, (list, tuple)) and like else None
        for i, item in enumerate(value):
            _check_like(f"{where}[{i}]", item, sample)
    elif isinstance(value, dict):
        for key, item in value.items():
            sample = like.get(key, next(iter(like.values()), None)) if isinstance(like, dict) and like else None
            _check_like(f"{where}[{key!r}]", item, sample)


def _survives_json(value: Any) -> bool:
    """Whether ``value`` comes back equal from JSON (int dict keys or tuples would not)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False
