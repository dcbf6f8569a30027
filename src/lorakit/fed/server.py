"""The Flower `ServerApp`: rounds of sampling, local training, screening and exact low-rank aggregation.

`LowRankStrategy` is Flower's `FedAvg` (its node sampling and message flow) with lorakit's pieces in the
two places a strategy decides: `configure_train` adds, per node, what that node still lacks (Fed-SB's
shared B, A once; FedEx-LoRA's base offsets when they changed) and counts the bytes sent;
`aggregate_train` excludes failed, late and malformed replies, and replies whose metrics cannot be
trusted (`validate.check_metrics`: a sample count not finite, not positive, above the largest partition or
``max_client_examples``; a training loss or DP ε missing, not a number, not finite or out of range), each with
a logged reason, and aggregates the rest with `strategies.aggregate` (unweighted by default, as the
official Fed-SB code; ``weighting = examples`` for FedAvg's sample weights).  `run_server` drives the
rounds: Fed-SB's shared init first, then train, aggregate, evaluate the global model on the server and
checkpoint, round after round, resuming after the last completed round when asked.
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
from ..core.files import write_text
from ..io.persistence import adapter_tensors
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
FEDSB_INIT = "query.fedsb_init"
SB_FACTORS = ("lora_B", "lora_R", "lora_A")


def _reason(message: Message) -> str:
    lines = [line.strip() for line in str(message.error.reason).splitlines() if line.strip()]
    tail = [line for line in lines if "Error" in line or "Exception" in line]
    return (tail[-1] if tail else lines[-1] if lines else "unknown error")[:300]


class LowRankStrategy(FedAvg):
    """FedAvg's sampling and message flow with Fed-SB / FedIT / FFA-LoRA / FedEx-LoRA aggregation."""

    def __init__(self, config: FedConfig, state: ServerState, scale: float, max_count: int) -> None:
        super().__init__(fraction_train=config.fraction, fraction_evaluate=0.0,
                         min_train_nodes=config.min_train_clients, min_available_nodes=config.clients)
        self.config, self.state, self.scale, self.max_count = config, state, scale, max_count
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
        budget = cfg.dp_epsilon
        for message in replies:
            node = message.metadata.src_node_id
            if message.has_error():
                excluded[str(node)] = f"client failed: {_reason(message)}"
                continue
            try:
                tensors = message.content[self.arrayrecord_key].to_torch_state_dict()
                record = dict(message.content["metrics"])
            except (KeyError, TypeError, ValueError) as err:
                excluded[str(node)] = f"malformed reply: {type(err).__name__}: {err}"
                continue
            self.state.ledger.add(server_round, node, up=payload_bytes(tensors), what="trainable")
            frozen_done, version = self.pending.pop(node, (False, None))
            if frozen_done:
                self.has_frozen.add(node)
            if version is not None:
                self.offsets_seen[node] = version
            reason = validate.check_metrics(record, self.max_count, budget)
            if reason is not None:
                excluded[str(node)] = reason
                continue
            updates[str(node)], counts[str(node)], metrics[str(node)] = tensors, float(record["num-examples"]), record
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
        weights = [counts[n] if cfg.weighting == "examples" else 1.0 for n in nodes]
        result = aggregate(self.spec, [updates[n] for n in nodes], weights, self.scale)
        self.residuals = result.residuals
        total = sum(counts[n] for n in nodes)
        train_loss = sum(counts[n] * float(metrics[n]["train-loss"]) for n in nodes) / total
        summary: dict[str, Any] = {"clients": len(nodes), "num-examples": total, "train-loss": train_loss}
        if budget is not None:  # the budget the federation spent: the largest client's ε (each was checked)
            summary["epsilon"] = max(float(metrics[n]["epsilon"]) for n in nodes)
        return ArrayRecord(result.tensors), MetricRecord(summary)


def _init_keys(ws: local.Workspace) -> dict[str, Tensor]:
    """Shapes and dtypes of B, R, A per layer (what a designated client's init must hold)."""
    return {k: v for k, v in adapter_tensors(ws.model).items() if k.rsplit(".", 1)[-1] in SB_FACTORS}


def _client_init(grid: Grid, config: FedConfig, ws: local.Workspace, state: ServerState,
                 ) -> tuple[list[dict[str, Tensor]], dict[str, str], int]:
    """Ask the designated client (``client``) or every client (``clients``) for its part of Fed-SB's init.

    Waits up to ``init_timeout`` (not the per-round ``round_timeout``): these are the federation's first
    messages, so their replies also wait for the simulation engine to start and for each client to load its
    model and shard.  Returns the usable replies, ``client -> reason`` for every client left out (each is
    logged) and how many clients were asked.
    """
    nodes, _ = sample_nodes(grid, config.clients, config.clients)
    if config.init_source == "client":
        nodes = sorted(nodes)[:1]  # the designated client: the lowest node id
        kind, what = FEDSB_INIT, "B, R, A"
        reference = _init_keys(ws)
    else:
        kind, what = GRADSUM, "gradient sum"
        reference = {name: torch.empty(layer.out_features, layer.in_features, dtype=torch.float32, device="meta")
                     for name, layer in ws.layers.items()}
    record = ConfigRecord(config.to_record())
    messages = [Message(RecordDict({"config": record}), message_type=kind, dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=config.init_timeout))
    excluded: dict[str, str] = {}
    answered = {m.metadata.src_node_id for m in replies}
    for node in nodes:
        if node not in answered:
            excluded[str(node)] = (f"no {what} within init_timeout ({config.init_timeout:g} s), which covers "
                                   "the clients starting and loading their model and data; raise it on a slow machine")
    usable = []
    for message in sorted(replies, key=lambda m: m.metadata.src_node_id):
        node = message.metadata.src_node_id
        if message.has_error():
            excluded[str(node)] = f"client failed: {_reason(message)}"
            continue
        try:
            arrays = message.content["arrays"].to_torch_state_dict()
        except (KeyError, TypeError, ValueError) as err:
            excluded[str(node)] = f"malformed reply: {type(err).__name__}: {err}"
            continue
        state.ledger.add(INIT_ROUND, node, up=payload_bytes(arrays), what=what)
        reason = validate.check_update(arrays, reference)
        if reason is not None:
            excluded[str(node)] = reason
            continue
        usable.append(arrays)
    for node, reason in excluded.items():
        logger.warning("shared init: excluded client %s: %s", node, reason)
    return usable, excluded, len(nodes)


def shared_init(grid: Grid, config: FedConfig, ws: local.Workspace, state: ServerState) -> dict[str, str]:
    """Fed-SB's shared init, once, by ``config.init_source`` (see `FedConfig`); B, A become ``state.frozen``
    (broadcast with each client's first training message, counted as download) and R the first global R.

    ``server``: LoRA-SB's init from the server's own sample (``init_data``): nothing is uploaded.
    ``client``: the designated client's B, R, A (one upload).  ``clients``: the sum of every client's
    gradient sum (sign(Σᵢ Gᵢ) is the sign of the pooled gradient).  Returns ``client -> reason`` for every
    client left out; raises `FedError`, naming every reason, if no usable reply arrived.
    """
    excluded: dict[str, str] = {}
    if config.init_source == "server":
        init = local.shared_init(ws, local.init_features(config))
        source = init_note(config)[0]
    else:
        usable, excluded, asked = _client_init(grid, config, ws, state)
        if not usable:
            reasons = "; ".join(f"client {n}: {r}" for n, r in excluded.items()) or "no client sampled"
            raise FedError(f"Fed-SB's shared init received no usable reply from any of {asked} clients ({reasons})")
        if config.init_source == "client":
            init = usable[0]
        else:
            init = fedsb_shared_init(usable, api.get_state(ws.model).config)
        source = f"{len(usable)} of {asked} clients' {'B, R, A' if config.init_source == 'client' else 'gradient sums'}"
    state.frozen = {k: v for k, v in init.items() if ws.strategy.is_frozen(k)}
    state.tensors.update({k: v for k, v in init.items() if ws.strategy.is_trainable(k)})
    logger.info("Fed-SB shared init from %s (η = %g)", source, config.sb_init_lr)
    return excluded


def init_note(config: FedConfig) -> tuple[str, bool]:
    """Where Fed-SB's init came from, and whether it used rows a client also holds (``None`` source: no init)."""
    n = config.init_samples
    if config.init_source == "client":
        return f"the designated client's upload at round 0, from its own first {n} examples", True
    if config.init_source == "clients":
        return f"every client's gradient-sum upload at round 0, each from its own first {n} examples", True
    if config.init_data == "train":
        if local.held_out(config):
            return f"the server's first {n} examples of the train split, held out of every client's shard", False
        return f"the server's first {n} examples of the train split, which the clients' shards also hold", True
    if config.init_data.endswith((".jsonl", ".csv")):
        return f"the server's first {n} examples of {config.init_data} (not checked against the clients' data)", False
    return f"the server's first {n} examples of the {config.init_data} split, which no client holds", False


def privacy_note(config: FedConfig) -> str:
    """What the run's DP guarantee covers and where Fed-SB's init came from, stated in the result (and logged as
    a warning when the init used rows a client holds)."""
    if config.dp_epsilon is None:
        note = "no differential privacy (dp_epsilon unset)"
    else:
        note = (f"each client's local training is DP-SGD at (ε = {config.dp_epsilon:g}, δ = "
                f"{config.dp_delta if config.dp_delta is not None else '1/n'}) over all rounds")
    if not STRATEGIES[config.strategy].server_init:
        return note
    source, shared = init_note(config)
    note += f"; Fed-SB's init: {source}"
    if shared and config.dp_epsilon is not None:
        note += (" (computed without noise: OUTSIDE this guarantee; the default, the server's init from the train "
                 "split, holds its rows out of the clients' shards)")
    return note


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
        local.reset(ws)
        state = ServerState(tensors=local.select(ws, "trainable"))
    else:
        logger.info("resuming from %s after round %d", out / checkpoint.DIRNAME, state.round)
    max_count = config.max_client_examples or max(local.shard_sizes(config))
    strategy = LowRankStrategy(config, state, ws.scale, max_count)
    privacy = privacy_note(config)
    if config.dp_epsilon is not None and ws.strategy.server_init and init_note(config)[1]:
        logger.warning("%s", privacy)
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
    init_source = init_note(config)[0] if ws.strategy.server_init else None
    result = {"config": config.to_record(), "privacy": privacy, "init_source": init_source, "history": state.history,
              "comm": state.ledger.per_round(),
              "totals": state.ledger.totals(), "seconds": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / RESULT_FILE, json.dumps(result, indent=1) + "\n")
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
