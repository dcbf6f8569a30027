"""Federated low-rank fine-tuning on Flower (``pip install 'lorakit[fed]'``).

Fed-SB (Singhal, Ponkshe et al. 2025, arXiv 2502.15436) with FedIT, FFA-LoRA and FedEx-LoRA baselines:
`strategies` (pure aggregation), `partition` (IID / Dirichlet), `comm` (bytes up and down), `validate`
(screening client updates), `dp` (DP-SGD with Opacus), `checkpoint` (server state per round),
`client` / `server` (Flower apps) and `runner` (simulation or loopback deployment).
"""

from .config import STRATEGY_NAMES, FedConfig
from .errors import CheckpointError, FedConfigError, FedError
from .strategies import STRATEGIES, Aggregate, StrategySpec, aggregate, fedsb_shared_init

__all__ = ["STRATEGIES", "STRATEGY_NAMES", "Aggregate", "CheckpointError", "FedConfig", "FedConfigError", "FedError",
           "StrategySpec", "aggregate", "fedsb_shared_init"]
