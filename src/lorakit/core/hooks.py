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
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

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

    def load_state_dict(self, plain: dict[str, Any], tensors: dict[str, Tensor]) -> None:
        """Restore `state_dict`'s output (tensors move to the device of the first adapter layer)."""
        plain = dict(plain)
        layout: dict[str, str] = plain.pop("__tensor_layout__", {})
        for name, value in plain.items():
            setattr(self, name, value)
        device = next((p.device for layer in self.layers.values() for p in layer.parameters()), None)
        for name, kind in layout.items():
            own = {k[len(name) + 1:]: v.to(device) for k, v in tensors.items() if k.startswith(name + "/")}
            if kind == "tensor":
                setattr(self, name, tensors[name].to(device))
            elif kind == "dict":
                setattr(self, name, own)
            else:
                grouped: dict[str, dict[int, Tensor]] = {}
                for key, t in own.items():
                    base, _, index = key.rpartition("/")
                    grouped.setdefault(base, {})[int(index)] = t
                setattr(self, name, {k: tuple(v[i] for i in sorted(v)) for k, v in grouped.items()})


def _survives_json(value: Any) -> bool:
    """Whether ``value`` comes back equal from JSON (int dict keys or tuples would not)."""
    try:
        return json.loads(json.dumps(value)) == value
    except (TypeError, ValueError):
        return False
