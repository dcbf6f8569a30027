"""The Flower `ServerApp`: rounds of sampling, local training, screening and exact low-rank aggregation.

`LowRankStrategy` is Flower's `FedAvg` (its node sampling and message flow) with lorakit's pieces in the
two places a strategy decides: `configure_train` adds, per node, what that node still lacks (Fed-SB's
shared B, A once; FedEx-LoRA's base offsets when they changed) and counts the bytes sent;
`aggregate_train` excludes failed, late and malformed replies with a logged reason and aggregates the
rest with `strategies.aggregate`.  `run_server` drives the rounds: Fed-SB's shared init first, then
train, aggregate, evaluate the global model on the server and checkpoint, round after round, resuming
after the last completed round when asked.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from torch import Tensor

from .. import api
from . import checkpoint, local, validate
from .checkpoint import ServerState
from .client import OFFSETS_VERSION
from .comm import INIT_ROUND, payload_bytes
from .config import FedConfig
from .errors import FedError
from .strategies import STRATEGIES, aggregate, fedsb_shared_init

logger = logging.getLogger(__name__)

RESULT_FILE = "fed_result.json"
GRADSUM = "query.gradsum"


def _reason(message: Message) -> str:
    lines = [line.strip() for line in str(message.error.reason).splitlines() if line.strip()]
    tail = [line for line in lines if "Error" in line or "Exception" in line]
    return (tail[-1] if tail else lines[-1] if lines else "unknown error")[:300]


class LowRankStrategy(FedAvg):
    """FedAvg's sampling and message flow with Fed-SB / FedIT / FFA-LoRA / FedEx-LoRA aggregation."""

    def __init__(self, config: FedConfig, state: ServerState, scale: float) -> None:
        super().__init__(fraction_train=config.fraction, fraction_evaluate=0.0,
                         min_train_nodes=config.min_train_clients, min_available_nodes=config.clients)
        self.config, self.state, self.scale = config, state, scale
        self.spec = STRATEGIES[config.strategy]
        self.has_frozen: set[int] = set()
        self.offsets_seen: dict[int, int] = {}
        self.pending: dict[int, tuple[bool, int | None]] = {}
        self.sent: dict[int, list[int]] = {}
        self.excluded: dict[int, dict[str, str]] = {}
        self.residuals: dict[str, Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid,
                        ) -> Iterable[Message]:
        """FedAvg's sampled messages, each completed with what its node lacks; bytes down are counted."""
        state, out = self.state, []
        base_bytes = payload_bytes(arrays.to_torch_state_dict())
        for sampled in super().configure_train(server_round, arrays, config, grid):
            node = sampled.metadata.dst_node_id
            record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
            down, what = base_bytes, ["trainable"]
            send_frozen = bool(state.frozen) and node not in self.has_frozen
            if send_frozen:
                record["frozen"] = ArrayRecord(state.frozen)
                down += payload_bytes(state.frozen)
                what.append("frozen factors")
            version = None
            if state.offsets and self.offsets_seen.get(node) != state.offsets_version:
                record["offsets"] = ArrayRecord(state.offsets)
                down += payload_bytes(state.offsets)
                version = state.offsets_version
                what.append("base offsets")
            self.pending[node] = (send_frozen, version)
            state.ledger.add(server_round, node, down=down, what="+".join(what))
            out.append(Message(content=record, message_type=MessageType.TRAIN, dst_node_id=node))
        self.sent[server_round] = [m.metadata.dst_node_id for m in out]
        return out

    def aggregate_train(self, server_round: int, replies: Iterable[Message],
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Exclude failed, missing and malformed replies (logged with the reason); aggregate the rest."""
        cfg, replies = self.config, list(replies)
        excluded: dict[str, str] = {}
        answered = {m.metadata.src_node_id for m in replies}
        for node in self.sent.get(server_round, []):
            if node not in answered:
                excluded[str(node)] = (f"no reply within the round timeout (round_timeout = {cfg.round_timeout:g} s):"
                                       " dropped out, or too slow")
        updates: dict[str, dict[str, Tensor]] = {}
        counts: dict[str, float] = {}
        metrics: dict[str, dict[str, Any]] = {}
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                excluded[str(node)] = f"client failed: {_reason(message)}"
                continue
            try:
                tensors = message.content[self.arrayrecord_key].to_torch_state_dict()
                record = dict(message.content["metrics"])
                count = float(record["num-examples"])
            except (KeyError, TypeError, ValueError) as err:
                excluded[str(node)] = f"malformed reply: {type(err).__name__}: {err}"
                continue
            self.state.ledger.add(server_round, node, up=payload_bytes(tensors), what="trainable")
            frozen_done, version = self.pending.pop(node, (False, None))
            if frozen_done:
                self.has_frozen.add(node)
            if version is not None:
                self.offsets_seen[node] = version
            if not count > 0:
                excluded[str(node)] = f"malformed reply: num-examples = {count}"
                continue
            updates[str(node)], counts[str(node)], metrics[str(node)] = tensors, count, record
        for node, reason in validate.screen(updates, self.state.tensors, cfg.max_update_norm, cfg.norm_factor).items():
            excluded[node] = reason
            del updates[node]
        for node, reason in excluded.items():
            logger.warning("round %d: excluded client %s: %s", server_round, node, reason)
        self.excluded[server_round] = excluded
        self.residuals = {}
        if not updates:
            logger.warning("round %d: no usable update; the global adapter is unchanged", server_round)
            return None, None
        nodes = sorted(updates)
        result = aggregate(self.spec, [updates[n] for n in nodes], [counts[n] for n in nodes], self.scale)
        self.residuals = result.residuals
        total = sum(counts[n] for n in nodes)
        train_loss = sum(counts[n] * float(metrics[n]["train-loss"]) for n in nodes) / total
        summary: dict[str, Any] = {"clients": len(nodes), "num-examples": total, "train-loss": train_loss}
        eps = [float(metrics[n]["epsilon"]) for n in nodes if "epsilon" in metrics[n]]
        if eps:
            summary["epsilon"] = max(eps)
        return ArrayRecord(result.tensors), MetricRecord(summary)


def shared_init(grid: Grid, config: FedConfig, ws: local.Workspace, state: ServerState) -> dict[str, str]:
    """Fed-SB's init: every client uploads its gradient sum once; the server sums them and builds B, R, A.

    Waits up to ``init_timeout`` (not the per-round ``round_timeout``): these are the federation's first
    messages, so their replies also wait for the simulation engine to start and for each client to load its
    model and shard.  Returns ``client -> reason`` for every client left out (each is logged); raises
    `FedError`, naming every reason, if no usable gradient sum arrived.
    """
    nodes, _ = sample_nodes(grid, config.clients, config.clients)
    record = ConfigRecord(config.to_record())
    messages = [Message(RecordDict({"config": record}), message_type=GRADSUM, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=config.init_timeout))
    reference = {name: torch.empty(layer.out_features, layer.in_features, dtype=torch.float32, device="meta")
                 for name, layer in ws.layers.items()}
    excluded: dict[str, str] = {}
    answered = {m.metadata.src_node_id for m in replies}
    for node in nodes:
        if node not in answered:
            excluded[str(node)] = (f"no gradient sum within init_timeout ({config.init_timeout:g} s), which covers "
                                   "the clients starting and loading their model and data; raise it on a slow machine")
    sums = []
    for message in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = message.metadata.src_node_id
        if message.has_error():
            excluded[str(node)] = f"client failed: {_reason(message)}"
            continue
        try:
            grads = message.content["arrays"].to_torch_state_dict()
        except (KeyError, TypeError, ValueError) as err:
            excluded[str(node)] = f"malformed reply: {type(err).__name__}: {err}"
            continue
        state.ledger.add(INIT_ROUND, node, up=payload_bytes(grads), what="gradient sum")
        reason = validate.check_update(grads, reference)
        if reason is not None:
            excluded[str(node)] = reason
            continue
        sums.append(grads)
    for node, reason in excluded.items():
        logger.warning("shared init: excluded client %s: %s", node, reason)
    if not sums:
        reasons = "; ".join(f"client {node}: {reason}" for node, reason in excluded.items()) or "no client sampled"
        raise FedError(f"Fed-SB's shared init received no usable gradient sum from any of {len(nodes)} clients "
                       f"({reasons})")
    init = fedsb_shared_init(sums, api.get_state(ws.model).config)
    state.frozen = {k: v for k, v in init.items() if ws.strategy.is_frozen(k)}
    state.tensors.update({k: v for k, v in init.items() if ws.strategy.is_trainable(k)})
    logger.info("Fed-SB shared init from %d of %d clients' gradient sums", len(sums), len(nodes))
    return excluded


def evaluate_global(ws: local.Workspace, state: ServerState) -> dict[str, float]:
    """The global model (frozen factors, base offsets and global tensors) on the server's evaluation split."""
    local.load_tensors(ws, state.frozen)
    local.set_base_offsets(ws, state.offsets)
    local.load_tensors(ws, state.tensors)
    return local.evaluate(ws, local.eval_features(ws.config))


def run_server(grid: Grid, config: FedConfig) -> dict[str, Any]:
    """All rounds (resuming after the last completed one if ``config.resume``); returns and writes the result."""
    start = time.perf_counter()
    out = Path(config.output_dir)
    ws = local.workspace(config)
    state = checkpoint.load(out, config) if config.resume else None
    if state is None:
        state = ServerState(tensors=local.select(ws, "trainable"))
    else:
        logger.info("resuming from %s after round %d", out / checkpoint.DIRNAME, state.round)
    strategy = LowRankStrategy(config, state, ws.scale)
    init_excluded: dict[str, str] = {}
    if ws.strategy.server_init and not state.frozen:
        init_excluded = shared_init(grid, config, ws, state)
    if not state.history:
        state.history.append({"round": 0, **evaluate_global(ws, state), "bytes": state.ledger.totals(),
                              "excluded": init_excluded})
        checkpoint.save(out, state, config)
    for round_ in range(state.round + 1, config.rounds + 1):
        random.seed(config.seed * 100_003 + round_)  # FedAvg samples nodes with `random`
        train_config = ConfigRecord({**config.to_record(), OFFSETS_VERSION: state.offsets_version})
        messages = strategy.configure_train(round_, ArrayRecord(state.tensors), train_config, grid)
        replies = grid.send_and_receive(messages, timeout=config.round_timeout)
        arrays, metrics = strategy.aggregate_train(round_, replies)
        if arrays is not None:
            state.tensors = arrays.to_torch_state_dict()
        if strategy.residuals:
            for layer, residual in strategy.residuals.items():
                state.offsets[layer] = state.offsets.get(layer, torch.zeros_like(residual)) + residual
            state.offsets_version += 1
        state.round = round_
        state.history.append({"round": round_, **evaluate_global(ws, state), **dict(metrics or {}),
                              "excluded": strategy.excluded.get(round_, {}),
                              "bytes": state.ledger.per_round().get(round_, {"up": 0, "down": 0}),
                              "bytes_per_client": state.ledger.per_client(round_)})
        checkpoint.save(out, state, config)
        logger.info("round %d: %s", round_, {k: v for k, v in state.history[-1].items() if k != "bytes_per_client"})
    result = {"config": config.to_record(), "history": state.history, "comm": state.ledger.per_round(),
              "totals": state.ledger.totals(), "seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result, indent=1) + "\n")
    return result


def build_server_app(config: FedConfig | None = None, results: list[dict[str, Any]] | None = None) -> ServerApp:
    """A `ServerApp` running ``config`` (default: the Flower run config); each result is appended to ``results``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        result = run_server(grid, config or FedConfig.from_record(context.run_config))
        if results is not None:
            results.append(result)

    return app


app = build_server_app()
