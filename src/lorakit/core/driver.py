"""What every front end shares: the lorakit trainer (`lorakit.train.trainer`), the Hugging Face callback and mixin
(`lorakit.integrations.hf`) and the federated client (`lorakit.fed.local`) call these, so that a method behaves
the same whichever drives it.

* Data-driven inits: `init_batches` / `loader_batches` build the init batches, `data_init` runs the method's
  init with roll-back (a failed init leaves the adapter as it was) and the one DDP policy (below).
* The step's loss: `step_loss` computes the task loss, hands the batch, the loss and (if the hooks ask,
  ``needs_logits``) the logits to ``hooks.after_forward``, then adds ``hooks.regularizer()``.
* The optimizer: `build_optimizer` asks the hooks for it; `reset_optimizer` says what a reset
  (``hooks.optimizer_reset_requested``) means: a fresh optimizer from ``hooks.build_optimizer`` over the parameters
  that require grad now (empty state; parameters that became trainable join, frozen ones leave).

DDP policy: rank 0's adapter is the adapter.  Every rank runs a data-driven init on its own batches, then takes
rank 0's result (`share_rank0_adapter`, a broadcast, when a process group is up); the lorakit trainer checks at
its start that every rank holds the same adapter and refuses to train otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..errors import TrainingError
from .hooks import TrainingHooks
from .loss import model_forward
from .state import adapter_tensors, check_adapter_tensors, copy_adapter_tensors, get_state

logger = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]


# ------------------------------------------------------------------------------------------ data-driven inits
def init_batches(features: Sequence[Mapping[str, Any]], samples: int, batch_size: int,
                 collate: Callable[[list[Mapping[str, Any]]], Any]) -> list[Any]:
    """The init batches: the first ``samples`` features in batches of ``batch_size``, each ``collate``'d."""
    head = list(features[:samples])
    return [collate(head[i:i + batch_size]) for i in range(0, len(head), batch_size)]


def loader_batches(loader: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches of a data loader (mappings copied into plain dicts).

    A packed, padding-free batch (``position_ids`` and no ``attention_mask``, as TRL's packing and transformers'
    ``DataCollatorWithFlattening`` give) gets ``use_cache=False``: transformers keeps its examples apart from the
    position ids only when no KV cache is built (TRL's ``SFTTrainer.compute_loss`` passes it for training too)."""
    batches = [dict(b) if isinstance(b, Mapping) else b for b in itertools.islice(loader, count)]
    for b in batches:
        if isinstance(b, dict) and "position_ids" in b and "attention_mask" not in b:
            b.setdefault("use_cache", False)
    return batches


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> None:
    """Check ``tensors`` (``lorakit.save``'s names) against the adapter attached to ``model`` and copy them in
    (`lorakit.core.state.copy_adapter_tensors`); ``source`` names them in errors."""
    check_adapter_tensors(model, dict(tensors), source)
    copy_adapter_tensors(model, tensors)


def data_init(model: nn.Module, batches: list[Any], loss_fn: LossFn | None = None) -> None:
    """Run the attached method's data-driven init on ``batches`` in place (the parameter objects stay, so an
    optimizer built before keeps them), then apply the DDP policy.  If the init raises, the adapter's tensors are
    put back as they were before it (a W0 it moved from its residual and offset, `AdapterLayer.restore_base`) and the
    error propagates."""
    state = get_state(model)
    if state.method.initialize is None:
        return
    layers = {name: ({k: v.detach().clone() for k, v in layer.adapter_state().items()}, layer.base_offset_B is None)
              for name, layer in state.layers.items()}
    saved = {name: {k: v.detach().clone() for k, v in module.state_dict().items()}
             for name, (_, module) in state.saved_modules.items()}
    try:  # a W0-moving init keeps no W0 (one layer's at a time): the moved layers are recomputed below
        state.method.initialize(model, state.layers, state.config, batches, loss_fn)
    except BaseException:
        with torch.no_grad():
            for name, (before, unmoved) in layers.items():
                layer = state.layers[name]
                if unmoved and layer.base_offset_B is not None:  # the init moved W0: put the original back
                    layer.restore_base()
                    layer.base_offset_B = layer.base_offset_A = None
                layer.load_adapter_state(before)
            for name, (_, module) in state.saved_modules.items():
                module.load_state_dict(saved[name])
        raise
    share_rank0_adapter(model)


def share_rank0_adapter(model: nn.Module) -> None:
    """Under a process group of several ranks, every rank takes rank 0's adapter (the DDP policy)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    tensors = {k: v.detach().clone() for k, v in adapter_tensors(model).items()}
    for tensor in tensors.values():
        dist.broadcast(tensor, src=0)
    load_adapter_tensors(model, tensors, "rank 0")


# ------------------------------------------------------------------------------------------ the step's loss
def step_loss(model: nn.Module, batch: Any, hooks: TrainingHooks, loss_fn: LossFn | None = None,
              autocast: torch.autocast | None = None) -> tuple[Tensor, Tensor | None]:
    """``(task loss, regularizer or None)`` of one micro-batch: the forward (under ``autocast`` if given; the task
    loss in float32), ``hooks.after_forward(batch, loss, logits)``, then ``hooks.regularizer()``.

    ``loss_fn(model, batch)`` replaces the default loss (`lorakit.core.loss.model_loss`); it gives no logits, so
    hooks that need them (``needs_logits``) refuse it."""
    if loss_fn is not None and hooks.needs_logits:
        raise TrainingError(f"{type(hooks).__name__} needs the model's logits, which a custom loss_fn does not give: "
                            "train with the default loss (batches with labels)")
    with autocast if autocast is not None else contextlib.nullcontext():
        if loss_fn is None:
            task, logits = model_forward(model, batch, logits=hooks.needs_logits)
        else:
            task, logits = loss_fn(model, batch), None
        task = task.float()
    hooks.after_forward(batch, task.detach(), logits)
    return task, hooks.regularizer()


# ------------------------------------------------------------------------------------------ the optimizer
def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, hooks: TrainingHooks, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """The method's optimizer (``hooks.build_optimizer``) over the parameters that require grad; each group
    remembers its own lr as ``base_lr`` (a schedule scales it; LoRA+ has several)."""
    params = trainable(model)
    if not params:
        raise TrainingError("the model has no trainable parameters; attach an adapter (lorakit.attach) first")
    optimizer = hooks.build_optimizer(params, lr=lr, weight_decay=weight_decay)
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    return optimizer


def reset_optimizer(model: nn.Module, hooks: TrainingHooks, optimizer: torch.optim.Optimizer, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """What ``hooks.optimizer_reset_requested`` means, for every front end: a fresh optimizer from
    ``hooks.build_optimizer`` over the parameters that require grad now.  It is moved into ``optimizer`` itself
    (its attributes: param groups, empty state, defaults), so that a front end whose optimizer is wrapped or
    referenced elsewhere (an lr scheduler, accelerate) keeps the same object, which is returned."""
    fresh = build_optimizer(model, hooks, lr, weight_decay)
    if type(fresh) is not type(optimizer):
        raise TrainingError(f"{type(hooks).__name__}.build_optimizer returned a {type(fresh).__name__} on reset, "
                            f"but the run's optimizer is a {type(optimizer).__name__}")
    vars(optimizer).update(vars(fresh))
    return optimizer

