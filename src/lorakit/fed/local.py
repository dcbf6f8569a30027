"""What a client computes, and what the server needs to evaluate: the model with its adapter, a client's
data shard, the gradient sum behind Fed-SB's shared init, one round of local training, and reading and
writing adapter tensors.

Models and shards are cached per process (a Flower simulation actor serves many virtual clients), so
every call first puts the model into the exact state the message describes: global trainable tensors,
the frozen factors and base-weight offsets that the client keeps between rounds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import api
from ..core.driver import init_batches
from ..core.gradients import dense_gradients
from ..core.layer import AdapterLayer
from ..core.loss import model_loss
from ..io.persistence import adapter_tensors
from ..models import load_model
from ..train import evaluate as lk_evaluate
from ..train.data import Example, TaskSpec, collate, load_task
from ..train.run import RunConfig, encode, method_config
from ..train.trainer import TrainConfig, train
from . import dp
from .config import FedConfig
from .errors import FedConfigError, FedError
from .partition import partition
from .strategies import STRATEGIES, StrategySpec, fedsb_shared_init

logger = logging.getLogger(__name__)


@dataclass
class Workspace:
    """A model with the strategy's adapter attached, its tokenizer and task, each layer's pristine W0 and the
    adapter's tensors as built (`reset` restores both)."""

    config: FedConfig
    strategy: StrategySpec
    model: nn.Module
    tokenizer: Any
    task: TaskSpec
    base_weights: dict[str, Tensor]
    initial: dict[str, Tensor]

    @property
    def layers(self) -> dict[str, AdapterLayer]:
        return api.adapter_layers(self.model)

    @property
    def scale(self) -> float:
        return api.get_state(self.model).config.scale

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


def run_config(cfg: FedConfig) -> RunConfig:
    """The single-run description lorakit's task helpers take (method options from the fed config)."""
    spec = STRATEGIES[cfg.strategy]
    options: dict[str, Any] = {"r": cfg.r}
    if spec.method == "lora-sb":
        options["init_lr"] = cfg.sb_init_lr
    elif cfg.lora_alpha is not None:
        options["alpha"] = cfg.lora_alpha
    return RunConfig(model=cfg.model, task=cfg.task, method=spec.method, method_options=options,
                     data_dir=cfg.data_dir, max_length=cfg.max_length, batch_size=cfg.batch_size, seed=cfg.seed,
                     eval_split=cfg.eval_split, eval_limit=cfg.eval_limit, device="cpu")


def _model_key(cfg: FedConfig) -> tuple:
    return (cfg.model, cfg.quantize, cfg.task, cfg.strategy, cfg.r, cfg.lora_alpha, cfg.sb_init_lr, cfg.seed,
            cfg.data_dir, cfg.max_length)


_WORKSPACES: dict[tuple, Workspace] = {}
_SHARDS: dict[tuple, list[dict[str, Any]]] = {}
_EVAL: dict[tuple, list[dict[str, Any]]] = {}


def _build(cfg: FedConfig) -> Workspace:
    spec = STRATEGIES[cfg.strategy]
    run = run_config(cfg)
    task, _ = load_task(cfg.task, "train", cfg.data_dir, seed=cfg.seed, limit=1)
    torch.manual_seed(cfg.seed)  # the head's init; every party uses the server's broadcast head anyway
    model, tokenizer = load_model(cfg.model, task.type, num_labels=task.num_labels, device="cpu",
                                  quantize=cfg.quantize)
    api.attach(model, method_config(run, task, model), initialize=False)  # Fed-SB's factors come from the server
    for name, tensor in adapter_tensors(model).items():
        if spec.is_frozen(name) and tensor.requires_grad:
            tensor.requires_grad_(False)  # FFA-LoRA: A stays at its shared seeded init
    # W0, to rebuild W0 + offset (FedEx-LoRA, which a quantized base refuses: `FedConfig`)
    base = {} if cfg.quantize else {name: layer.base.weight.detach().clone()
                                    for name, layer in api.adapter_layers(model).items()}
    initial = {name: tensor.detach().clone() for name, tensor in adapter_tensors(model).items()}
    return Workspace(cfg, spec, model, tokenizer, task, base, initial)


def reset(ws: Workspace) -> None:
    """Put the cached model back to its state as built (a run in the same process may have trained it)."""
    load_tensors(ws, ws.initial)
    set_base_offsets(ws, {})


def workspace(cfg: FedConfig) -> Workspace:
    """The cached model for ``cfg`` (built on first use; the two most recent models are kept)."""
    key = _model_key(cfg)
    if key not in _WORKSPACES:
        if len(_WORKSPACES) >= 2:
            _WORKSPACES.pop(next(iter(_WORKSPACES)))
        _WORKSPACES[key] = _build(cfg)
    ws = _WORKSPACES[key]
    ws.config = cfg
    return ws


def client_features(cfg: FedConfig, partition_id: int, num_partitions: int) -> list[dict[str, Any]]:
    """Client ``partition_id``'s encoded training examples (every client computes the same split)."""
    if not 0 <= partition_id < num_partitions:
        raise FedError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    key = (*_model_key(cfg), cfg.train_limit, held_out(cfg), cfg.partition, cfg.alpha, partition_id, num_partitions)
    if key not in _SHARDS:
        ws = workspace(cfg)
        examples = client_pool(cfg)
        shards = partition(examples, num_partitions, cfg.partition, cfg.alpha, cfg.seed)
        _SHARDS[key] = encode(ws.task, [examples[i] for i in shards[partition_id]], ws.tokenizer, run_config(cfg))
    return _SHARDS[key]


def held_out(cfg: FedConfig) -> int:
    """How many training examples the server's init sample takes out of the clients' pool: ``init_samples`` for
    Fed-SB's server init from the ``train`` split (unless ``init_overlap``), else 0."""
    server_init = STRATEGIES[cfg.strategy].server_init and cfg.init_source == "server"
    return cfg.init_samples if server_init and cfg.init_data == "train" and not cfg.init_overlap else 0


def client_pool(cfg: FedConfig) -> list[Example]:
    """The training examples split across the clients: the first ``train_limit`` (all) after the ``held_out``
    init rows (`init_features` reads the train split's first ``init_samples``), so no client holds an init row."""
    held = held_out(cfg)
    limit = None if cfg.train_limit is None else cfg.train_limit + held
    _, examples = load_task(cfg.task, "train", cfg.data_dir, seed=cfg.seed, limit=limit)
    if len(examples) <= held:
        raise FedConfigError(f"the train split has {len(examples)} examples and Fed-SB's init holds out the first "
                             f"{held} (init_samples): none is left for the clients; lower init_samples, or take "
                             "the init from another split (init_data dev) or a file")
    return list(examples[held:])


def shard_sizes(cfg: FedConfig) -> list[int]:
    """How many training examples each of the ``cfg.clients`` partitions holds (the server's bound on counts)."""
    return [len(shard) for shard in partition(client_pool(cfg), cfg.clients, cfg.partition, cfg.alpha, cfg.seed)]


def init_features(cfg: FedConfig) -> list[dict[str, Any]]:
    """The first ``init_samples`` examples of ``init_data`` (a split of the task, or a .jsonl / .csv file),
    encoded: the sample the server holds for Fed-SB's init."""
    ws = workspace(cfg)
    if cfg.init_data.endswith((".jsonl", ".csv")):
        _, examples = load_task(cfg.init_data, "train", limit=cfg.init_samples)
    else:
        _, examples = load_task(cfg.task, cfg.init_data, cfg.data_dir, seed=cfg.seed, limit=cfg.init_samples)
    return encode(ws.task, examples, ws.tokenizer, run_config(cfg))


def eval_features(cfg: FedConfig) -> list[dict[str, Any]]:
    """The server's evaluation features (``eval_split``, first ``eval_limit`` examples)."""
    key = (*_model_key(cfg), cfg.eval_split, cfg.eval_limit)
    if key not in _EVAL:
        ws = workspace(cfg)
        _, examples = load_task(cfg.task, cfg.eval_split, cfg.data_dir, seed=cfg.seed, limit=cfg.eval_limit)
        _EVAL[key] = encode(ws.task, examples, ws.tokenizer, run_config(cfg))
    return _EVAL[key]


# ---------------------------------------------------------------------------------------------- tensors


def select(ws: Workspace, which: str) -> dict[str, Tensor]:
    """Copies of the adapter's ``"trainable"`` (uploaded each round) or ``"frozen"`` tensors."""
    test = ws.strategy.is_trainable if which == "trainable" else ws.strategy.is_frozen
    return {k: v.detach().to("cpu").clone() for k, v in adapter_tensors(ws.model).items() if test(k)}


@torch.no_grad()
def load_tensors(ws: Workspace, tensors: Mapping[str, Tensor]) -> None:
    """Copy ``tensors`` (a subset of the adapter's, by name) into the model."""
    own = adapter_tensors(ws.model)
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise FedError(f"received tensors this model's adapter does not have: {unknown[:3]}")
    for key, value in tensors.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise FedError(f"received {key} with shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        own[key].copy_(value.to(own[key].dtype))


@torch.no_grad()
def set_base_offsets(ws: Workspace, offsets: Mapping[str, Tensor]) -> None:
    """Every base weight becomes ``W0 + offset`` (FedEx-LoRA's folded residuals; W0 where none is given).  A
    quantized base never moves (`FedConfig` refuses FedEx-LoRA on it): it takes no offset."""
    if not ws.base_weights:
        if offsets:
            raise FedError(f"received base-weight offsets for {sorted(offsets)[:3]}, but this client's base is "
                           f"quantized ({ws.config.quantize}) and cannot hold them")
        return
    for name, layer in ws.layers.items():
        w0 = ws.base_weights[name]
        offset = offsets.get(name)
        if offset is None:
            layer.base.weight.copy_(w0)
        else:
            layer.base.weight.copy_(w0 + (offset.T if layer.transposed else offset).to(w0.dtype))


# ---------------------------------------------------------------------------------------------- work


def gradient_sum(ws: Workspace, features: list[dict[str, Any]]) -> dict[str, Tensor]:
    """``Σ ∇_W ℓ`` over ``features[:init_samples]`` for every adapted weight (adapters off, train mode).

    `dense_gradients` returns the mean over batches of each batch's gradient; each batch's loss is scaled
    by its size, so the result times the number of batches is the sum over samples (exact for mean-reduced
    classification losses).  The passes leave every parameter's ``.grad`` as it was (`gradient_pass` restores
    them), so nothing of this sum reaches the client's local training.
    """
    cfg = ws.config
    batches = init_batches(features, cfg.init_samples, cfg.batch_size, lambda chunk: collate(chunk, ws.pad_id).inputs)

    def summed_loss(model: nn.Module, batch: Any) -> Tensor:
        return model_loss(model, batch) * batch["input_ids"].shape[0]

    out: dict[str, Tensor] = {}
    for group in dense_gradients(ws.model, ws.layers, batches, summed_loss, 1 << 30, cfg.seed):
        out.update({name: g * len(batches) for name, g in group.items()})
    return out


def shared_init(ws: Workspace, features: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Fed-SB's B, R, A (LoRA-SB's init, `fedsb_shared_init`) from the gradient sum of ``features[:init_samples]``."""
    return fedsb_shared_init([gradient_sum(ws, features)], api.get_state(ws.model).config)


def local_seed(cfg: FedConfig, round_: int, partition_id: int) -> int:
    return cfg.seed + 7919 * round_ + partition_id


def train_round(ws: Workspace, features: list[dict[str, Any]], round_: int, partition_id: int,
                privacy: dp.PrivacyState | None = None) -> dict[str, float]:
    """``local_steps`` steps on the client's shard from the current model state; returns metrics
    (``train-loss``, and with DP ``epsilon`` spent so far by this client)."""
    cfg = ws.config
    seed = local_seed(cfg, round_, partition_id)
    if privacy is not None:
        losses = dp.private_train(ws.model, features, privacy, steps=cfg.local_steps, batch_size=cfg.batch_size,
                                  lr=cfg.learning_rate, max_length=cfg.max_length, pad_id=ws.pad_id, seed=seed)
        return {"train-loss": sum(losses) / len(losses), "epsilon": privacy.epsilon()}
    config = TrainConfig(steps=cfg.local_steps, batch_size=min(cfg.batch_size, len(features)), lr=cfg.learning_rate,
                         schedule="constant", warmup_steps=0, seed=seed, log_every=0, progress=False,
                         save_adapter=False)
    result = train(ws.model, features, config, pad_token_id=ws.pad_id)
    return {"train-loss": sum(result.losses) / len(result.losses)}


@torch.no_grad()
def evaluate(ws: Workspace, features: list[dict[str, Any]], batch_size: int = 64) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of the current model on ``features``."""
    if ws.task.type != "classification":
        return {"loss": lk_evaluate.answer_nll(ws.model, features, batch_size=batch_size)}
    was_training = ws.model.training
    ws.model.eval()
    total_loss, correct = 0.0, 0
    try:
        for i in range(0, len(features), batch_size):
            inputs = collate(features[i:i + batch_size], ws.pad_id).inputs
            labels = inputs.pop("labels")
            logits = ws.model(**inputs).logits.float()
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
    finally:
        ws.model.train(was_training)
    loss = total_loss / len(features)
    if not math.isfinite(loss):
        raise FedError(f"the global model's evaluation loss is {loss}")
    return {"loss": loss, "accuracy": correct / len(features)}
