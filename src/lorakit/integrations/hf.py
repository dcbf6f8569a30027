"""lorakit in a Hugging Face ``transformers.Trainer`` (or TRL ``SFTTrainer``): the same training hooks as a callback.

Plug and play, with the raw model::

    callback = LorakitCallback(lorakit.LoraSbConfig(r=16), init_batches=8)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator, callbacks=[callback])
    trainer.train()
    lorakit.save(model, "adapter")

Where each piece happens, given transformers' own order (``Trainer.train`` builds the optimizer from the
parameters that require grad *before* ``on_train_begin``):

* ``on_init_end`` (end of ``Trainer.__init__``): `attach` the adapter, so the optimizer sees only its
  parameters.  Data-driven methods (LoRA-GA, LoRA-SB) are attached without their init.
* ``on_train_begin``: under ``gradient_checkpointing``, make gradients reach the adapters inside checkpointed
  blocks (`LorakitCallback._gradients_through_checkpoints`); ``hooks.on_train_begin(max_steps)``, then the
  data-driven init on the first ``init_batches`` batches of the trainer's own train dataloader
  (`lorakit.core.driver.data_init`: in place, so the optimizer keeps the same parameter objects; rolled back
  on failure; under DDP every rank takes rank 0's result).  LoRA-SB
  without ``init_lr`` gets η = learning_rate / warm-up steps (`lorakit.methods.lora_sb.first_step_lr`).
* ``on_step_begin``: ``before_forward``.  ``on_pre_optimizer_step``: ``after_backward`` (transformers
  has clipped the gradients here, as the lorakit trainer does before this hook).
  ``on_optimizer_step``: ``after_step`` (gradients still present).  ``on_step_end``: a requested
  optimizer reset (`lorakit.core.driver.reset_optimizer`: a fresh optimizer from ``hooks.build_optimizer``,
  moved into the Trainer's optimizer object; the lr schedule carries on).
  ``on_log``: ``hooks.metrics()`` join the log history as ``lorakit/<name>``.  `LorakitTrainerMixin`'s
  ``compute_loss`` hands each micro-batch's inputs, loss (and logits, for BA-LoRA) to ``after_forward`` and its
  loss to ``after_loss``.

A callback cannot reach the loss or the optimizer's construction, so methods whose hooks define a
regularizer (BA-LoRA, XGBLoRA, AdaLoRA), read the forward or the loss (``after_forward``: BA-LoRA, ALoRA, PRILoRA;
``after_loss``: XGBLoRA) or build their own optimizer
(LoRA+, LoRA-Pro, LoRA-RITE, XGBLoRA) need
`LorakitTrainerMixin` in the trainer class (``LorakitTrainer`` for the
plain Trainer; ``class MySFT(LorakitTrainerMixin, SFTTrainer)`` for TRL).  The callback refuses to start
without it for those methods instead of silently training something else.

Checkpoints (``checkpoint-N``, written by ``save_strategy``) hold the lorakit adapter (``adapter_config.json`` +
``adapter_model.safetensors``, what `lorakit.load` reads), the hooks' state and the trainable parameter names
(``lorakit_state.json`` + ``lorakit_state.safetensors``, `TrainingHooks.state_dict`), and transformers' own
optimizer, scheduler, RNG and trainer state; never the full model (``on_save`` deletes the weights
``save_pretrained`` wrote, `LorakitTrainerMixin._save` does not write them).  ``train(resume_from_checkpoint=...)``
needs `LorakitTrainerMixin` (transformers' own loader knows only whole models and PEFT adapters): it restores the
adapter and the trainable set before the optimizer is built, the hooks' state after ``hooks.on_train_begin``,
and never re-runs a data-driven init (LoRA-GA, PiSSA, OLoRA, LoRA-SB moved W0 once; doing it again would move it
twice).  ``on_train_end`` saves the final adapter to ``output_dir/adapter``.

``gradient_checkpointing=True`` in the arguments works with every method.  DeepSpeed ZeRO-3 is refused with a
clear error at attach (see `_refuse_sharding`).

FSDP (``TrainingArguments(fsdp=True)``, FSDP2, or ``accelerate launch --use_fsdp``) needs `LorakitTrainerMixin`,
which shards the model lorakit's way, as lorakit's own trainer does (`lorakit.train.trainer.shard_frozen_base`): the
frozen base weights are sharded per block, the adapter stays whole on every rank. It does so when the Trainer
prepares the model (`LorakitTrainerMixin._prepare_for_training`), after the train-begin work (hooks, resumed state,
a data-driven init on the unsharded base, rank 0's adapter shared), and averages the adapter's gradients over the
ranks at each optimizer step (`reduce_gradients(average=True)`, what DDP would do). accelerate is left nothing to
wrap: under its FSDP2 plugin (GPUs) ``fsdp2_prepare_model`` keeps a model whose root is already an ``FSDPModule``;
on CPU accelerate (1.15) never enters FSDP mode at all (``AcceleratorState`` picks ``DistributedType.FSDP`` only for
GPU-like backends, leaving ``MULTI_CPU``, which would wrap the model in DDP), so the mixin marks the model
prepared. The adapter files are those a single-process run writes (tests/test_hf_fsdp.py: 2 CPU ranks, gloo); the
model stays sharded after training, so load the adapter onto an unsharded base to use it. Refused with a clear
error: FSDP1, accelerate's CPU offload, its activation checkpointing (use ``gradient_checkpointing``) and mixed
precision (accelerate applies none of its policies to a model sharded this way), and a single process.

Packing: TRL's own (``SFTConfig(packing=True)``: best-fit-decreasing rows, flattened padding-free with position ids
restarting per example and no attention mask) and transformers' ``DataCollatorWithFlattening`` need nothing more.
transformers keeps the examples apart from the position ids (a block-diagonal mask under sdpa, eager and flex
attention, the variable-length kernel under flash attention) as long as no KV cache is built: the Trainer turns the
cache off for training (``TrainingArguments.use_cache=False``, the default), TRL's ``compute_loss`` passes
``use_cache=False``, `LorakitTrainerMixin.compute_loss` does on such batches (so ``use_cache=True`` is safe there),
and so does the callback's data-driven init (`lorakit.core.driver.loader_batches`).  tests/test_packing.py checks
that a flattened run trains the adapter a padded one does.  ``SFTConfig(assistant_only_loss=True)`` supervises the
same assistant tokens as ``lorakit train`` on ``messages`` data (tests/test_conversations.py).

A model that already carries an adapter works too (``LorakitCallback()`` without a config); for a
data-driven method the callback then runs its init, unless ``init_batches=0`` (attached with data).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled

from ..api import STATE_ATTR, AdapterState, attach, get_state
from ..config import AdapterConfig
from ..core.driver import data_init, load_adapter_tensors, loader_batches, reset_optimizer, share_rank0_adapter
from ..core.files import atomic_write, read_regular, write_text
from ..core.hooks import TrainingHooks
from ..core.registry import get_method
from ..errors import AdapterFileError, LorakitError
from ..io.persistence import WEIGHTS_NAME, read_adapter_tensors, save
from ..methods.lora_sb import LoraSbConfig, first_step_lr
from ..train.distributed import reduce_gradients
from ..train.trainer import ADAPTER_DIR, shard_frozen_base

logger = logging.getLogger(__name__)

STATE_JSON = "lorakit_state.json"
STATE_TENSORS = "lorakit_state.safetensors"
STATE_FORMAT = "lorakit-hf-checkpoint"
STATE_VERSION = 1
_SHARDED_ATTR = "_lorakit_fsdp_sharded"  # set on a model `LorakitTrainerMixin` sharded (frozen base only)
# What ``save_pretrained`` writes for the whole model: a checkpoint must not hold it (see `LorakitCallback.on_save`).
_FULL_MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def _fsdp_requested(args: TrainingArguments | None) -> bool:
    """Whether the Trainer is asked for FSDP: ``TrainingArguments(fsdp=...)`` or ``accelerate launch --use_fsdp``."""
    return bool(getattr(args, "fsdp", None)) or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _refuse_sharding(args: TrainingArguments | None, model: nn.Module, integrated: bool) -> None:
    """Refuse the parameter sharding the callback does not handle, instead of training something wrong: DeepSpeed
    ZeRO-3 (partitioned base weights: the adapter would wrap empty placeholders), FSDP without
    `LorakitTrainerMixin` (which shards the base itself and keeps the adapter whole) and a model sharded elsewhere
    (its adapter tensors sharded where the methods' hooks, data-driven inits and `lorakit.save` need them whole)."""
    if is_deepspeed_zero3_enabled() or any(hasattr(p, "ds_id") for p in model.parameters()):
        raise LorakitError("DeepSpeed ZeRO-3 partitions the base weights, which lorakit adapters cannot wrap: use "
                           "ZeRO stage 1 or 2, DDP, FSDP through LorakitTrainer, or lorakit's own trainer with FSDP2 "
                           "(TrainConfig(fsdp=True) / lorakit train --fsdp under torchrun)")
    if _fsdp_requested(args) and not integrated:
        raise LorakitError("LorakitCallback alone does not support accelerate's FSDP (accelerate would shard the "
                           "adapter tensors that the method's hooks and lorakit.save need whole): train with "
                           "lorakit.integrations.hf.LorakitTrainer, or put LorakitTrainerMixin first in your trainer's "
                           "bases; it shards the frozen base weights and keeps the adapter whole")
    if getattr(model, _SHARDED_ATTR, False):
        return
    if any(isinstance(p, DTensor) for p in model.parameters()) or \
            any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise LorakitError("the Trainer's model is already sharded (DTensor parameters or FullyShardedDataParallel): "
                           "LorakitCallback does not support accelerate's FSDP sharding the adapter; give the Trainer "
                           "the unsharded model and fsdp in TrainingArguments, with LorakitTrainer (it shards the "
                           "frozen base weights itself and keeps the adapter whole)")


def _check_fsdp_arguments(args: TrainingArguments) -> None:
    """The FSDP settings `LorakitTrainerMixin` honours: FSDP2, no CPU offload, no FSDP activation checkpointing,
    no mixed precision (the model is sharded by lorakit, so accelerate applies none of its FSDP policies)."""
    plugin = getattr(args, "fsdp_plugin_args", None) or {}
    version = int(plugin.get("fsdp_version", os.environ.get("FSDP_VERSION", 2)))
    refused = {"fsdp_version 1 (FSDP1)": version != 2,
               "cpu_offload": bool(plugin.get("cpu_offload")) or
               os.environ.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true",
               "FSDP activation_checkpointing (use gradient_checkpointing=True instead)":
                   bool(plugin.get("activation_checkpointing")) or
                   os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true",
               "mixed precision (bf16/fp16; load the model in the dtype to train in)": bool(args.bf16 or args.fp16) or
               str(getattr(args, "mixed_precision", "no")).lower() != "no"}  # ACCELERATE_MIXED_PRECISION
    found = [name for name, bad in refused.items() if bad]
    if found:
        raise LorakitError(f"FSDP through LorakitTrainer shards the frozen base weights itself (FSDP2, adapter whole "
                           f"on every rank) and supports no {', '.join(found)}; found them in the TrainingArguments "
                           "or the accelerate environment")


def save_checkpoint_state(model: nn.Module, directory: str | os.PathLike) -> None:
    """Write the adapter (`lorakit.save`), the hooks' state (`TrainingHooks.state_dict`) and the names of the
    trainable parameters into ``directory``, and delete any whole-model weights there."""
    out = Path(directory)
    state = get_state(model)
    save(model, out)
    plain, tensors, unsupported = state.hooks.state_dict()
    if unsupported:
        logger.warning("the %s hooks hold state that the checkpoint cannot carry (%s): a resumed run will not "
                       "match an uninterrupted one exactly", type(state.hooks).__name__, ", ".join(unsupported))
    atomic_write(out / STATE_TENSORS, lambda tmp: save_file(tensors, tmp, metadata={"format": STATE_FORMAT}))
    meta = {"format": STATE_FORMAT, "version": STATE_VERSION, "hooks": plain,
            "trainable": [n for n, p in model.named_parameters() if p.requires_grad]}
    write_text(out / STATE_JSON, json.dumps(meta, indent=1) + "\n")
    for name in _FULL_MODEL_FILES:
        (out / name).unlink(missing_ok=True)
    for shard in itertools.chain(out.glob("model-*-of-*.safetensors"), out.glob("pytorch_model-*-of-*.bin")):
        shard.unlink()


def _read_checkpoint_state(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``lorakit_state.json`` (checked) and its tensors."""
    path = directory / STATE_JSON
    if not path.is_file() or not (directory / WEIGHTS_NAME).is_file():
        raise AdapterFileError(f"{directory} is not a lorakit checkpoint (expected {WEIGHTS_NAME} and {STATE_JSON} "
                               "written by LorakitCallback; found neither or only one)")
    try:  # regular files only: a FIFO planted there is an error, not a hang
        meta = json.loads(read_regular(path))
        tensors = safetensors.torch.load(read_regular(directory / STATE_TENSORS))
    except (LorakitError, ValueError, SafetensorError) as err:
        raise AdapterFileError(f"the lorakit state in {directory} is corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT or meta.get("version") != STATE_VERSION \
            or not isinstance(meta.get("hooks"), dict) or not isinstance(meta.get("trainable"), list):
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise AdapterFileError(f"{path} is not a lorakit checkpoint state this version reads (expected format "
                               f"{STATE_FORMAT!r} version {STATE_VERSION} with hooks and trainable; found {found!r})")
    return meta, tensors


def load_checkpoint_adapter(model: nn.Module, directory: str | os.PathLike) -> None:
    """Copy the checkpoint's adapter into the attached one and restore which parameters train (before the
    optimizer is built: boosting rounds and rank schedules change that set)."""
    path = Path(directory)
    meta, _ = _read_checkpoint_state(path)
    load_adapter_tensors(model, read_adapter_tensors(path), str(path))
    trainable = set(meta["trainable"])
    unknown = trainable - {n for n, _ in model.named_parameters()}
    if unknown:
        raise AdapterFileError(f"{path / STATE_JSON}: trainable parameters {sorted(unknown)[:3]} are not in the "
                               "model; the checkpoint belongs to another model or method")
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)


def load_checkpoint_hooks(model: nn.Module, directory: str | os.PathLike) -> None:
    """Restore the hooks' state saved by `save_checkpoint_state` (after ``hooks.on_train_begin``)."""
    meta, tensors = _read_checkpoint_state(Path(directory))
    get_state(model).hooks.load_state_dict(meta["hooks"], tensors, str(Path(directory) / STATE_JSON))


class LorakitCallback(TrainerCallback):
    """Attach ``config``'s method to the Trainer's model and call its training hooks at every step.

    ``init_batches``: how many batches of the trainer's train dataloader feed a data-driven init.
    ``loss_fn(model, batch) -> loss`` for that init (default ``model(**batch).loss``).
    """

    def __init__(self, config: AdapterConfig | None = None, init_batches: int = 8,
                 loss_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> None:
        if init_batches < 0:
            raise LorakitError(f"init_batches must be >= 0, got {init_batches}")
        self.config = config
        self.init_batches = init_batches
        self.loss_fn = loss_fn
        self.pending_init = False  # a data-driven init still has to run (at train begin)
        self.resume_dir: Path | None = None  # the checkpoint LorakitTrainerMixin resumes from
        self.trainer_integrated = False  # set by LorakitTrainerMixin: it adds the regularizer, builds the optimizer
        self.begun = False  # `begin` ran already (LorakitTrainerMixin, before sharding the model for FSDP)

    def _state(self, model: nn.Module | None) -> AdapterState:
        if model is None or getattr(model, STATE_ATTR, None) is None:
            raise LorakitError("the Trainer's model has no lorakit adapter: pass LorakitCallback(config) in "
                               "Trainer(callbacks=[...]) (not trainer.add_callback, which comes after the "
                               "optimizer's parameters are chosen), or attach the adapter before building the Trainer")
        return get_state(model)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is None:
            return
        _refuse_sharding(args, model, self.trainer_integrated)
        if getattr(model, STATE_ATTR, None) is None:
            if self.config is None:
                raise LorakitError("LorakitCallback() without a config needs a model with a lorakit adapter "
                                   "attached; pass LorakitCallback(config)")
            needs_data = get_method(self.config.method).needs_data
            attach(model, self.config, initialize=not needs_data)
            self.pending_init = needs_data
        elif self.config is not None:
            raise LorakitError("the model already has a lorakit adapter; use LorakitCallback() without a config")
        else:
            self.pending_init = get_state(model).method.needs_data and self.init_batches > 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       model: nn.Module | None = None, train_dataloader: Any = None, **kwargs: Any) -> None:
        if self.begun:  # LorakitTrainerMixin ran it before sharding the model
            self.begun = False
            return
        self.begin(args, state, model, train_dataloader)

    def begin(self, args: TrainingArguments, state: TrainerState, model: nn.Module | None,
              train_dataloader: Any) -> None:
        """The train-begin work: checks, ``hooks.on_train_begin``, a resumed checkpoint's hooks state or the
        data-driven init on the first ``init_batches`` batches of ``train_dataloader``."""
        adapter = self._state(model)
        _refuse_sharding(args, model, self.trainer_integrated)
        self._check_integration(adapter)
        if getattr(args, "activation_checkpointing", None) or getattr(args, "gradient_checkpointing", False):
            self._gradients_through_checkpoints(model)
        adapter.hooks.on_train_begin(state.max_steps)
        if self.resume_dir is not None:
            load_checkpoint_hooks(model, self.resume_dir)
            self.resume_dir = None
            self.pending_init = False
        elif state.global_step > 0 and self.pending_init:
            raise LorakitError(f"resuming at step {state.global_step} without LorakitTrainerMixin: "
                               f"{adapter.method.name}'s data-driven init would run again on the checkpoint's "
                               "weights; train with lorakit.integrations.hf.LorakitTrainer (or the mixin)")
        if not self.pending_init:
            return
        if self.init_batches == 0 or train_dataloader is None:
            raise LorakitError(f"{adapter.method.name} initialises from gradients: give init_batches > 0 and a "
                               "train_dataset, or attach the adapter with data= before building the Trainer")
        batches = loader_batches(train_dataloader, self.init_batches)
        logger.info("%s: gradient init on %d batches of the trainer's train dataloader", adapter.method.name,
                    len(batches))
        if isinstance(adapter.config, LoraSbConfig) and adapter.config.init_lr is None:  # η: the first-step lr
            eta = first_step_lr(args.learning_rate, args.get_warmup_steps(state.max_steps))
            adapter.config = adapter.config.replace(init_lr=eta)
        data_init(model, batches, self.loss_fn)  # in place, rolled back on failure; every rank takes rank 0's
        self.pending_init = False

    @staticmethod
    def _gradients_through_checkpoints(model: nn.Module) -> None:
        """Reentrant checkpointing (transformers 4's default) gives a checkpointed block's adapter gradients only
        if the block's input requires grad; with the base frozen it does not, so make the input embeddings' output
        require grad, as PEFT does (transformers does it only for some models).  Harmless when non-reentrant."""
        hooked = getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook")
        if not hooked and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()

    def _check_integration(self, adapter: AdapterState) -> None:
        hooks = adapter.hooks
        needs = []
        if type(hooks).regularizer is not TrainingHooks.regularizer:
            needs.append("a regularizer in the loss")
        if type(hooks).after_loss is not TrainingHooks.after_loss or \
                type(hooks).after_forward is not TrainingHooks.after_forward:
            needs.append("the training loss")
        if type(hooks).build_optimizer is not TrainingHooks.build_optimizer:
            needs.append("its own optimizer")
        if needs and not self.trainer_integrated:
            raise LorakitError(f"{adapter.method.name} needs {' and '.join(needs)}, which a callback cannot provide: "
                               "train with lorakit.integrations.hf.LorakitTrainer, or put LorakitTrainerMixin first "
                               "in your trainer's bases (class MyTrainer(LorakitTrainerMixin, SFTTrainer))")

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                      model: nn.Module | None = None, **kwargs: Any) -> None:
        self._state(model).hooks.before_forward(state.global_step)

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              model: nn.Module | None = None, **kwargs: Any) -> None:
        self._state(model).hooks.after_backward(state.global_step)

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                          model: nn.Module | None = None, **kwargs: Any) -> None:
        self._state(model).hooks.after_step(state.global_step)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                    model: nn.Module | None = None, optimizer: Any = None, **kwargs: Any) -> None:
        hooks = self._state(model).hooks
        if not hooks.optimizer_reset_requested or optimizer is None:
            return
        inner = _unwrap(optimizer)
        first = inner.param_groups[0]
        factor = first["lr"] / first.get("initial_lr", args.learning_rate)  # the lr schedule's current factor
        reset_optimizer(model, hooks, inner, args.learning_rate, args.weight_decay)
        for group in inner.param_groups:  # the lr scheduler sets the next step's lr; this step keeps its own
            group["initial_lr"] = group["lr"]
            group["lr"] *= factor

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                model: nn.Module | None = None, **kwargs: Any) -> None:
        """Put the adapter and the hooks' state in the checkpoint just written, instead of the whole model."""
        self._state(model)
        if args.should_save:
            save_checkpoint_state(model, Path(args.output_dir) / f"checkpoint-{state.global_step}")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     model: nn.Module | None = None, **kwargs: Any) -> None:
        """Save the final adapter to ``output_dir/adapter`` (what `lorakit.load` reads)."""
        if args.should_save and model is not None and getattr(model, STATE_ATTR, None) is not None:
            save(model, Path(args.output_dir) / ADAPTER_DIR)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
               model: nn.Module | None = None, **kwargs: Any) -> None:
        metrics = self._state(model).hooks.metrics()
        if metrics and state.log_history:
            state.log_history[-1].update({f"lorakit/{k}": v for k, v in metrics.items()})


class LorakitTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (first in the bases) next to a `LorakitCallback`: adds the
    method's regularizer to the training loss, builds the method's optimizer (``hooks.build_optimizer`` with
    the Trainer's lr and weight decay; the method picks the rest), and under FSDP shards the frozen base while
    the adapter stays whole (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        for callback in kwargs.get("callbacks") or ():  # before Trainer.__init__ ends: on_init_end reads it
            if isinstance(callback, LorakitCallback):
                callback.trainer_integrated = True
        super().__init__(*args, **kwargs)
        callbacks = [cb for cb in self.callback_handler.callbacks if isinstance(cb, LorakitCallback)]
        if not callbacks:
            raise LorakitError("LorakitTrainer needs a LorakitCallback: pass callbacks=[LorakitCallback(config)]")
        for callback in callbacks:
            callback.trainer_integrated = True
        self._lorakit_callbacks = callbacks

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """``save_model`` and checkpoints: the lorakit adapter, not the whole model."""
        if self.args.should_save:
            save(self.model, output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Resume: the checkpoint's adapter and trainable set now; its hooks' state at train begin (after
        ``hooks.on_train_begin``); no data-driven init."""
        load_checkpoint_adapter(model if model is not None else self.model, resume_from_checkpoint)
        for callback in self._lorakit_callbacks:
            callback.resume_dir = Path(resume_from_checkpoint)
            callback.pending_init = False

    def _prepare_for_training(self, max_steps: int, train_dataloader: Any, resume_from_checkpoint: str | None) -> Any:
        """Under FSDP, shard the model lorakit's way before the Trainer builds the optimizer and accelerate
        prepares the model (`_shard_for_fsdp`)."""
        if _fsdp_requested(self.args) and not getattr(self.model, _SHARDED_ATTR, False):
            self._shard_for_fsdp(train_dataloader)
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _shard_for_fsdp(self, train_dataloader: Any) -> None:
        """The callbacks' train-begin work on the unsharded model (a data-driven init reads whole base weights),
        rank 0's adapter on every rank, then FSDP2 over the frozen base weights (`shard_frozen_base`; the root too,
        without the replicated parameters, so that accelerate's FSDP2 preparation keeps the model as it is)."""
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        _check_fsdp_arguments(self.args)
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            raise LorakitError("FSDP shards the model across processes: launch with torchrun --nproc-per-node N "
                               "(or accelerate launch --num-processes N), N >= 2; found a single process")
        device = self.args.device
        model = self.model.to(device)  # the Trainer leaves placement to FSDP, which would skip the adapter
        for callback in self._lorakit_callbacks:
            callback.begin(self.args, self.state, model, train_dataloader)
            callback.begun = True
        share_rank0_adapter(model)  # what DDP's wrapping would do: every rank starts from rank 0's adapter
        shard_frozen_base(model, device)
        if not isinstance(model, FSDPModule):
            whole = {p for p in model.parameters() if not isinstance(p, DTensor)}
            fully_shard(model, mesh=init_device_mesh(device.type, (dist.get_world_size(),)), ignored_params=whole)
        setattr(model, _SHARDED_ATTR, True)
        # Sharded and reduced here: accelerate must not wrap it in DDP (its CPU mode, which ignores FSDP).
        model._is_accelerate_prepared = True

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Tensor | int | None = None,
                      ) -> Tensor:
        """The Trainer's step; on the last micro-batch of an optimizer step of a model sharded for FSDP, the
        adapter's gradients averaged over the ranks (before clipping and the hooks' ``after_backward``)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if getattr(self.model, _SHARDED_ATTR, False) and self.accelerator.sync_gradients:
            trainable = [p for p in self.model.parameters() if p.requires_grad]
            if trainable:
                reduce_gradients(trainable, trainable[0].device, average=True)
        return loss

    def _lorakit_hooks(self) -> TrainingHooks:
        return get_state(self.model).hooks

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            params = [p for p in (model or self.model).parameters() if p.requires_grad]
            self.optimizer = self._lorakit_hooks().build_optimizer(
                params, lr=self.args.learning_rate, weight_decay=self.args.weight_decay)
        return self.optimizer

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Tensor | int | None = None) -> Any:
        hooks = self._lorakit_hooks()
        if "position_ids" in inputs and "attention_mask" not in inputs:  # packed: no KV cache hiding the packing
            inputs["use_cache"] = False
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        want = return_outputs or hooks.needs_logits
        out = super().compute_loss(model, inputs, return_outputs=want, num_items_in_batch=num_items_in_batch)
        loss, outputs = out if want else (out, None)
        logits = outputs["logits"] if hooks.needs_logits else None
        hooks.after_forward(inputs, loss.detach().float(), logits)
        hooks.after_loss(self.state.global_step, float(loss.detach()))
        reg = hooks.regularizer()
        if reg is None:
            return (loss, outputs) if return_outputs else loss
        # The Trainer divides a per-batch mean by the accumulation steps itself, but not a loss already
        # normalised over the whole accumulated batch; the regularizer must count once per optimizer step.
        scaled = self.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        if scaled:
            reg = reg / self.current_gradient_accumulation_steps
        loss = loss + reg.to(loss.device)
        return (loss, outputs) if return_outputs else loss


class LorakitTrainer(LorakitTrainerMixin, Trainer):
    """``transformers.Trainer`` with `LorakitTrainerMixin`: use it with a `LorakitCallback`."""
