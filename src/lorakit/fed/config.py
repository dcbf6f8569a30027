"""`FedConfig`: one federated run, as flat values that travel in Flower config records and run configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from .errors import FedConfigError

STRATEGY_NAMES = ("fed-sb", "fedit", "ffa-lora", "fedex-lora")
PARTITIONS = ("iid", "dirichlet")
MODES = ("simulation", "deployment")
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
    the clients (None: all).  init_samples: examples per client whose gradient sum builds Fed-SB's shared init.
    round_timeout: seconds the server waits for a round's replies (a client not answering by then is excluded
    from the round); the clients of a simulation share its actors, so this covers their work one after the
    other, and the first round after a (re)start also covers each client loading its model and shard.
    init_timeout: seconds the server waits for Fed-SB's gradient sums; a separate, longer limit, because it
    runs first: it covers the simulation engine starting and every client loading its model and data.
    max_update_norm / norm_factor: an update farther than this (absolute) from the broadcast tensors,
    or more than ``norm_factor`` times the round's median distance, is rejected as implausible.
    dp_epsilon/dp_delta/dp_max_grad_norm: DP-SGD per client (Opacus) over all rounds; None: no DP
    (dp_delta None means 1/n of the client's examples).  output_dir: checkpoints and results.
    """

    strategy: str = "fed-sb"
    clients: int = 10
    rounds: int = 5
    model: str = "minilm-l6"
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
    init_samples: int = 32
    init_lr: float = 1e-3
    fraction: float = 1.0
    round_timeout: float = 600.0
    init_timeout: float = 1800.0
    max_update_norm: float = 1e3
    norm_factor: float = 10.0
    dp_epsilon: float | None = None
    dp_delta: float | None = None
    dp_max_grad_norm: float = 1.0
    seed: int = 0
    output_dir: str = "lorakit-runs/fed"
    resume: bool = False
    mode: str = "simulation"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGY_NAMES:
            raise FedConfigError(f"strategy must be one of {', '.join(STRATEGY_NAMES)}, got {self.strategy!r}")
        if self.partition not in PARTITIONS:
            raise FedConfigError(f"partition must be one of {', '.join(PARTITIONS)}, got {self.partition!r}")
        if self.mode not in MODES:
            raise FedConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("clients", "rounds", "r", "local_steps", "batch_size", "max_length", "init_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise FedConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("train_limit", "eval_limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise FedConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.alpha <= 0:
            raise FedConfigError(f"alpha (Dirichlet concentration) must be positive, got {self.alpha}")
        if not 0.0 < self.fraction <= 1.0:
            raise FedConfigError(f"fraction must be in (0, 1], got {self.fraction}")
        for name in ("init_lr", "round_timeout", "init_timeout", "max_update_norm", "norm_factor", "dp_max_grad_norm"):
            if getattr(self, name) <= 0:
                raise FedConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise FedConfigError(f"lora_alpha must be positive (or None for alpha = r), got {self.lora_alpha}")
        if self.lr is not None and self.lr <= 0:
            raise FedConfigError(f"lr must be positive, got {self.lr}")
        if self.dp_epsilon is not None and self.dp_epsilon <= 0:
            raise FedConfigError(f"dp_epsilon must be positive (or None for no DP), got {self.dp_epsilon}")
        if self.dp_delta is not None and not 0.0 < self.dp_delta < 1.0:
            raise FedConfigError(f"dp_delta must be in (0, 1), got {self.dp_delta}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.strategy]

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
