"""The training-hook protocol: the fixed points of a training step where a method may act.

The lorakit trainer and the Hugging Face Trainer callback call these in this order each step::

    hooks.before_forward(step)                    # Flat-LoRA perturbation, DyLoRA rank sampling, ...
    loss = task_loss + hooks.regularizer()        # AdaLoRA/LoRA² orthogonality, BA-LoRA, ...
    loss.backward()
    hooks.after_loss(step, task_loss)             # XGBLoRA's loss-plateau rule
    clip_grad_norm_(trainable, max_grad_norm)     # on the raw gradients, as transformers.Trainer does
    hooks.after_backward(step)                    # gradient adjustment (LoRA-Pro), end of perturbation
    optimizer.step()
    hooks.after_step(step)                        # rank masks, proximal steps, boosting merges
    optimizer.zero_grad()

`build_optimizer` lets a method choose its optimizer or parameter groups (LoRA+, LoRA-RITE); the
trainer asks for it once, and again whenever `optimizer_reset_requested` is set (Chain of LoRA,
XGBLoRA start each link/round with a fresh optimizer state).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from ..config import AdapterConfig
    from .layer import AdapterLayer


class TrainingHooks:
    """Default hooks: plain AdamW on the trainable parameters, nothing else."""

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: AdapterConfig) -> None:
        self.model = model
        self.layers = layers
        self.config = config
        self.total_steps: int | None = None
        self.optimizer_reset_requested = False

    def on_train_begin(self, total_steps: int) -> None:
        """Called once with the planned number of optimizer steps (schedules depend on it)."""
        self.total_steps = total_steps

    def build_optimizer(self, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                        **kwargs: Any) -> torch.optim.Optimizer:
        self.optimizer_reset_requested = False
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def regularizer(self) -> Tensor | None:
        return None

    def before_forward(self, step: int) -> None:
        pass

    def after_loss(self, step: int, loss: float) -> None:
        """Receives the task loss (a float, regularizer excluded) of optimizer step ``step``, after backward and
        before ``after_backward``.  The lorakit trainer calls it once per step with the mean over the step's
        micro-batches (and ranks); `LorakitTrainerMixin` once per micro-batch, with the loss
        ``Trainer.compute_loss`` returns.  It may only record: the gradients are already computed."""

    def after_backward(self, step: int) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        """Numbers worth logging (current budget, sparsity, ...)."""
        return {}

    def state_dict(self) -> tuple[dict[str, Any], dict[str, Tensor], list[str]]:
        """What a resumed run needs: ``(plain, tensors, unsupported)``.

        ``plain``: the public attributes that survive a JSON round trip (counters, budgets, masks as lists);
        ``tensors``: tensor attributes, alone or in str-keyed dicts of tensors or of tuples of tensors (EMAs,
        moments), flattened to ``attr/key/i``; ``unsupported``: the names of anything else.
        """
        plain: dict[str, Any] = {}
        tensors: dict[str, Tensor] = {}
        layout: dict[str, str] = {}
        unsupported: list[str] = []
        for name, value in vars(self).items():
            if name.startswith("_") or name in ("model", "layers", "config"):
                continue
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
