"""`FedConfig`: one federated run, as flat values that travel in Flower config records and run configs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from ..core.quant import QUANT_KINDS
from .errors import FedConfigError

STRATEGY_NAMES = ("fed-sb", "fedit", "ffa-lora", "fedex-lora")
PARTITIONS = ("iid", "dirichlet")
MODES = ("simulation", "deployment")
INIT_SOURCES = ("server", "client", "clients")
WEIGHTINGS = ("uniform", "examples")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# LoRA-SB trains r×r cores and wants a larger step than LoRA (lorakit.train.run.DEFAULT_LR).
DEFAULT_LR = {"fed-sb": 1e-2, "fedit": 1e-3, "ffa-lora": 1e-3, "fedex-lora": 1e-3}


@dataclass(frozen=True)
class FedConfig:
    """A federated fine-tuning run.

    strategy: fed-sb, fedit, ffa-lora or fedex-lora.  clients: simulated SuperNodes (or expected nodes).
    rounds: server rounds.  r: adapter rank.  lora_alpha: LoRA's α for fedit / ffa-lora / fedex-lora (None:
    α = r, scale 1; Fed-SB's LoRA-SB fixes its scale to 1).  lr: None picks `DEFAULT_LR`.  local_steps:
    optimizer steps per client per round.  fraction: share of the clients sampled each round.
    partition/alpha: IID or Dirichlet(alpha) by label.  train_limit: first N training examples split across
    the clients (None: all).  quantize: load the frozen base quantized (``nf4``, ``fp4``, ``int8``,
    ``torchao-int8``, ``torchao-int4``, as ``lorakit train --quantize``; every party loads it the same way, so
    the adapter is trained and evaluated on the same quantized W0); not with FedEx-LoRA, whose residuals are
    folded into W0, which a quantized weight cannot hold exactly.

    Fed-SB's shared init (B, R, A of LoRA-SB, built once): ``init_source`` ``server`` (default, the official
    protocol: the server computes it from a sample it holds, ``init_data``, and no client uploads anything),
    ``client`` (one designated client computes it from its own first ``init_samples`` examples and uploads
    B, R, A once) or ``clients`` (every client uploads the dense gradient sum of its first ``init_samples``
    examples; costly, and outside the DP guarantee).  init_data: a split name of the task (``train``, ``dev``,
    ``test``) or a ``.jsonl`` / ``.csv`` file; its first ``init_samples`` examples are used.  With the server's
    init from ``train`` (the default), those examples are taken out of the pool before it is split across the
    clients, so no client trains on an init row (`local.client_pool`); ``init_overlap`` leaves them in the pool,
    as the official code does (its init reads the first 550 SNLI training rows, which its first client also
    trains on): the init then uses rows a client holds, computed without noise, outside the DP guarantee
    (``privacy`` in the result says so).  init_lr: LoRA-SB's η; None is the official Fed-SB DP script's
    ``lr / (len(pooled train loader) × local_epochs)`` (``DP/SNLI/fed_trainer.py``: the steps every client
    together takes in its one round), here ``lr / (clients sampled per round × local_steps × rounds)``
    (`sb_init_lr`): the local steps all sampled clients take over the run.

    weighting: ``uniform`` (default; the official Fed-SB code averages R, the heads and every baseline's
    factors with an unweighted mean, and a client's reported sample count then cannot buy weight) or
    ``examples`` (FedAvg's sample-weighted mean).  max_client_examples: the most examples a client may
    report (None: the largest shard of the partition, which the server computes from the same split).
    round_timeout: seconds the server waits for a round's replies (a client not answering by then is excluded
    from the round); the clients of a simulation share its actors, so this covers their work one after the
    other, and the first round after a (re)start also covers each client loading its model and shard.
    init_timeout: seconds the server waits for the clients' part of Fed-SB's init (``client`` / ``clients``);
    a separate, longer limit, because it runs first: it covers the simulation engine starting and every
    client loading its model and data.
    max_update_norm / norm_factor: an update farther than this (absolute) from the broadcast tensors,
    or more than ``norm_factor`` times the round's median distance, is rejected as implausible.
    dp_epsilon/dp_delta/dp_max_grad_norm: DP-SGD per client (Opacus) over all rounds; None: no DP
    (dp_delta None means 1/n of the client's examples, stricter than the official script's 1/batches;
    the clip norm 0.1 is the official script's).  output_dir: checkpoints and results.
    host / tls / supernode_auth (deployment): the interface the SuperLink binds (Fleet and Control API);
    TLS and SuperNode authentication are always on when ``host`` is not loopback, and optional on loopback
    (`lorakit.fed.security` says what each protects).
    """

    strategy: str = "fed-sb"
    clients: int = 10
    rounds: int = 5
    model: str = "minilm-l6"
    quantize: str | None = None
    task: str = "sst2"
    data_dir: str | None = None
    partition: str = "iid"
    alpha: float = 0.5
    r: int = 16
    lora_alpha: float | None = None
    lr: float | None = None
    local_steps: int = 10
    batch_size: int = 16
    max_length: int = 64
    train_limit: int | None = None
    eval_split: str = "test"
    eval_limit: int | None = 500
    init_source: str = "server"
    init_data: str = "train"
    init_samples: int = 128
    init_overlap: bool = False
    init_lr: float | None = None
    weighting: str = "uniform"
    max_client_examples: int | None = None
    fraction: float = 1.0
    round_timeout: float = 600.0
    init_timeout: float = 1800.0
    max_update_norm: float = 1e3
    norm_factor: float = 10.0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float = 0.1
    seed: int = 0
    output_dir: str = "lorakit-runs/fed"
    resume: bool = False
    mode: str = "simulation"
    host: str = "127.0.0.1"
    tls: bool = False
    supernode_auth: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise FedConfigError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}, got {self.strategy!r}")
        if self.partition not in PARTITIONS:
            raise FedConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.mode not in MODES:
            raise FedConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.init_source not in INIT_SOURCES:
            raise FedConfigError(f"init_source must be one of {', '.join(INIT_SOURCES)}, got {self.init_source!r}")
        if self.weighting not in WEIGHTINGS:
            raise FedConfigError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {self.weighting!r}")
        if self.quantize is not None and self.quantize not in QUANT_KINDS:
            raise FedConfigError(f"quantize must be one of {', '.join(QUANT_KINDS)} (or None for a float base), "
                                 f"got {self.quantize!r}")
        if self.quantize is not None and self.strategy == "fedex-lora":
            raise FedConfigError(f"fedex-lora folds each round's residual into the base weights, which a "
                                 f"{self.quantize} base cannot hold exactly; use fed-sb, fedit or ffa-lora on a "
                                 "quantized base, or fedex-lora without quantize")
        if not self.host:
            raise FedConfigError("host must name the interface the SuperLink binds, e.g. 127.0.0.1")
        for name in ("clients", "rounds", "r", "local_steps", "batch_size", "max_length", "init_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FedConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_limit", "eval_limit", "max_client_examples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FedConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.alpha <= 0:
            raise FedConfigError(f"alpha (Dirichlet concentration) must be positive, got {self.alpha}")
        if not 0.0 < self.fraction <= 1.0:
            raise FedConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        for name in ("round_timeout", "init_timeout", "max_update_norm", "norm_factor", "dp_max_grad_norm"):
            if getattr(self, name) <= 0:
                raise FedConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise FedConfigError(f"lora_alpha must be positive (or None for alpha = r), got {self.lora_alpha}")
        for name in ("lr", "init_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise FedConfigError(f"{name} must be positive and finite (or None for the default), got {value}")
        if self.dp_epsilon is not None and self.dp_epsilon <= 0:
            raise FedConfigError(f"dp_epsilon must be positive (or None for no DP), got {self.dp_epsilon}")
        if self.dp_delta is not None and not 0.0 < self.dp_delta < 1.0:
            raise FedConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

    @property
    def sb_init_lr(self) -> float:
        """LoRA-SB's η for Fed-SB: ``init_lr``, else ``lr / (sampled clients × local_steps × rounds)`` (the class
        docstring)."""
        if self.init_lr is not None:
            return self.init_lr
        return self.learning_rate / (self.min_train_clients * self.local_steps * self.rounds)

    @property
    def use_supernode_auth(self) -> bool:
        """SuperNode authentication in deployment: asked for, or forced by a non-loopback ``host``."""
        return self.supernode_auth or self.host not in LOOPBACK_HOSTS

    @property
    def use_tls(self) -> bool:
        """TLS in deployment: asked for, needed by SuperNode authentication, or forced by a non-loopback host."""
        return self.tls or self.use_supernode_auth

    @property
    def min_train_clients(self) -> int:
        return max(1, round(self.fraction * self.clients))

    def to_record(self) -> dict[str, Any]:
        """Flat ``name -> value`` for a Flower ``ConfigRecord`` or run config (None values left out)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_record(cls, record: Any) -> FedConfig:
        """Rebuild from `to_record`'s values (keys unknown to this version are ignored)."""
        values = dict(record)
        out: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in values:
                continue
            value = values[f.name]
            default = f.default
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, float) and isinstance(value, int):
                value = float(value)
            out[f.name] = value
        return cls(**out)

    def replace(self, **changes: Any) -> FedConfig:
        return dataclasses.replace(self, **changes)
