"""The Flower `ClientApp`: a client fine-tunes its shard and returns only its trainable tensors.

Messages (Flower's Message API):

* ``query.fedsb_init`` (Fed-SB with ``init_source = client``, once, to one designated client): reply
  ``arrays`` = LoRA-SB's B, R, A built from the client's first ``init_samples`` examples.
* ``query.gradsum`` (Fed-SB with ``init_source = clients``, once, to every client): reply ``arrays`` =
  Σ ∇W ℓ over the client's first ``init_samples`` examples, per layer (dense d_out × d_in).
* ``train``: ``arrays`` = global trainable tensors, ``config`` = the `FedConfig` and ``server-round``,
  and, only when this client does not hold them yet, ``frozen`` (Fed-SB's shared B, A) and ``offsets``
  (FedEx-LoRA's folded residuals, with ``offsets-version`` in the config).  Both are kept in the node's
  ``context.state`` for later rounds, so they cross the network once per change.  Reply: ``arrays`` =
  the trainable tensors after ``local_steps`` steps, ``metrics`` = num-examples, train-loss (and epsilon
  with DP, whose accountant also lives in ``context.state``).

The node's shard comes from its ``node_config`` (``partition-id``, ``num-partitions``), as Flower's
simulation engine and ``flower-supernode --node-config`` set it.
"""

from __future__ import annotations

import logging
import os

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import Mod

from . import dp, local
from .config import FedConfig
from .errors import FedError

logger = logging.getLogger(__name__)

FROZEN = "lorakit.frozen"
OFFSETS = "lorakit.offsets"
OFFSETS_VERSION = "offsets-version"
PRIVACY = "lorakit.privacy"
SYNC = "lorakit.sync"


def _partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as err:
        raise FedError(f"this SuperNode has no {err} in its node config; start it with --node-config "
                       "'partition-id=<i> num-partitions=<n>'") from None


def _threads() -> None:
    torch.set_num_threads(int(os.environ.get("LORAKIT_FED_THREADS", "1")))


def _init_reply(message: Message, context: Context, factors: bool) -> Message:
    _threads()
    cfg = FedConfig.from_record(message.content["config"])
    pid, n = _partition(context)
    ws = local.workspace(cfg)
    features = local.client_features(cfg, pid, n)
    arrays = local.shared_init(ws, features) if factors else local.gradient_sum(ws, features)
    count = min(cfg.init_samples, len(features))
    return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": count})}),
                   reply_to=message)


def shared_init(message: Message, context: Context) -> Message:
    """Fed-SB's init computed by this (designated) client: B, R, A from its own first examples."""
    return _init_reply(message, context, factors=True)


def gradient_sum(message: Message, context: Context) -> Message:
    """Fed-SB's ``clients`` init: this client's gradient sum of every adapted weight."""
    return _init_reply(message, context, factors=False)


def _restore(ws: local.Workspace, message: Message, context: Context) -> None:
    """Put the model in the state the server describes: frozen factors, base offsets, global tensors."""
    content = message.content
    if "frozen" in content:
        context.state[FROZEN] = content["frozen"]
    if "offsets" in content:
        context.state[OFFSETS] = content["offsets"]
        context.state[SYNC] = ConfigRecord({OFFSETS_VERSION: int(content["config"][OFFSETS_VERSION])})
    if ws.strategy.server_init:
        if FROZEN not in context.state:
            raise FedError("Fed-SB's shared B, A never reached this client (no 'frozen' record yet)")
        local.load_tensors(ws, context.state[FROZEN].to_torch_state_dict())
    offsets = context.state[OFFSETS].to_torch_state_dict() if OFFSETS in context.state else {}
    local.set_base_offsets(ws, offsets)
    local.load_tensors(ws, content["arrays"].to_torch_state_dict())


def train(message: Message, context: Context) -> Message:
    """One round of local training; replies with the trainable tensors only."""
    _threads()
    cfg = FedConfig.from_record(message.content["config"])
    round_ = int(message.content["config"]["server-round"])
    pid, n = _partition(context)
    ws = local.workspace(cfg)
    features = local.client_features(cfg, pid, n)
    _restore(ws, message, context)
    privacy = None
    if cfg.dp_epsilon is not None:
        if PRIVACY in context.state:
            privacy = dp.PrivacyState.from_record(context.state[PRIVACY])
        else:
            privacy = dp.calibrate(cfg.dp_epsilon, cfg.dp_delta, len(features), cfg.batch_size,
                                   cfg.rounds * cfg.local_steps, cfg.dp_max_grad_norm)
    metrics = local.train_round(ws, features, round_, pid, privacy)
    if privacy is not None:
        context.state[PRIVACY] = ConfigRecord(privacy.to_record())
    metrics["num-examples"] = len(features)
    logger.info("client %d round %d: %s", pid, round_, metrics)
    return Message(RecordDict({"arrays": ArrayRecord(local.select(ws, "trainable")),
                               "metrics": MetricRecord(metrics)}), reply_to=message)


def build_client_app(mods: list[Mod] | None = None) -> ClientApp:
    """A `ClientApp` with lorakit's handlers (``mods``: Flower mods wrapped around every message)."""
    app = ClientApp(mods=mods or [])
    app.train()(train)
    app.query("gradsum")(gradient_sum)
    app.query("fedsb_init")(shared_init)
    return app


app = build_client_app()
