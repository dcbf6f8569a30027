"""What a sweep will run, checked before any trial starts: `SweepConfig`, the learning-rate grid, the ranks that
match a parameter budget, and the trials (`Trial`) of each stage.

Stage 1 is every method x rate at the first seed (under ``scheduler="asha"``, successive halving on the
intermediate evaluations) or every method x rate x seed (``scheduler="grid"``); stage 2 (ASHA only) gives the
remaining seeds to each method's surviving, best rate.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.registry import get_method, methods
from ..errors import ConfigError, LorakitError
from ..train.run import DEFAULT_LR, FULL, RunConfig, check_method_options, check_metric, method_config

logger = logging.getLogger(__name__)

SCHEDULERS = ("asha", "grid")
AUTO_FACTORS = (0.3, 1.0, 3.0)  # `--lrs auto`: 0.3x / 1x / 3x each method's default rate
BUDGET_SLACK = 2.0  # a budget is unmeetable when every rank's count is more than this factor away from it


@dataclass
class SweepConfig:
    """A sweep: ``base`` (what `lorakit train` would run: model, task, steps, ...) for every method x rate x seed.

    ``lrs=None``: `AUTO_FACTORS` x the method's default rate (a dict: each method's own rates).  ``seeds``: how
    many seeds, from ``base.seed`` on.
    ``budget``: each method's rank is chosen so its trainable parameters come closest to it.  ``address``: an
    existing Ray cluster (``auto``, ``host:port`` or ``ray://host:port``); ``None`` starts one on loopback.
    ``reduction_factor``: ASHA's (keep the best 1/rf at each rung).
    """

    base: RunConfig
    methods: list[str]
    lrs: list[float] | dict[str, list[float]] | None = None
    seeds: int = 3
    scheduler: str = "asha"
    budget: int | None = None
    reference: str = "lora"
    address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 when CUDA is available and base.device allows it, else 0
    output_dir: str = "lorakit-sweep"
    resume: bool = False
    reduction_factor: int = 3
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per method, on top of base's


@dataclass(frozen=True)
class Trial:
    """One `run_training` of the sweep, in its own run directory ``dir``."""

    method: str
    lr: float
    seed: int
    options: dict[str, Any]
    dir: str

    @property
    def id(self) -> str:
        return f"{self.method}/lr{self.lr:g}-seed{self.seed}"

    def run_config(self, base: RunConfig) -> RunConfig:
        return dataclasses.replace(base, method=self.method, lr=self.lr, seed=self.seed, method_options=self.options,
                                   output_dir=self.dir, resume=True)  # an interrupted trial continues


def parse_methods(text: str) -> list[str]:
    """``a,b,...`` or ``all`` (every registered method; ``full`` only when named)."""
    names = sorted(methods()) if text.strip() == "all" else [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError("--methods is empty; name methods (comma-separated) or 'all'")
    if len(set(names)) != len(names):
        raise ConfigError(f"--methods lists a method twice: {text}")
    return names


def parse_lrs(text: str) -> list[float] | None:
    """``r1,r2,...`` or ``auto`` (None)."""
    if text.strip() == "auto":
        return None
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--lrs must be comma-separated numbers or 'auto', got {text!r}") from None
    if not rates:
        raise ConfigError("--lrs is empty: the grid has no learning rate; give rates or 'auto'")
    if any(not math.isfinite(r) or r <= 0 for r in rates):
        raise ConfigError(f"--lrs must be positive finite numbers, got {text!r}")
    return sorted(set(rates))


def rates(cfg: SweepConfig, method: str) -> list[float]:
    """The rates swept for ``method``, ordered by distance from its default rate (ASHA's first trial at a rung
    always continues, so the likeliest winner goes first)."""
    default = DEFAULT_LR.get(method, 1e-3)
    grid = cfg.lrs.get(method, []) if isinstance(cfg.lrs, dict) else cfg.lrs
    if grid is None:
        grid = [float(f"{f * default:.3g}") for f in AUTO_FACTORS]
    return sorted(grid, key=lambda r: (abs(math.log(r / default)), r))


def seeds(cfg: SweepConfig) -> list[int]:
    return [cfg.base.seed + i for i in range(cfg.seeds)]


def trial(cfg: SweepConfig, method: str, lr: float, seed: int, ranks: dict[str, int]) -> Trial:
    options = {**cfg.base.method_options, **cfg.method_options.get(method, {})}
    if method in ranks:
        options["r"] = ranks[method]
    if method == FULL:
        options = {}
    return Trial(method, lr, seed, options, str(Path(cfg.output_dir) / "trials" / method / f"lr{lr:g}-seed{seed}"))


def stage1(cfg: SweepConfig, ranks: dict[str, int]) -> list[Trial]:
    chosen = seeds(cfg)[:1] if cfg.scheduler == "asha" else seeds(cfg)
    return [trial(cfg, m, lr, s, ranks) for m in cfg.methods for lr in rates(cfg, m) for s in chosen]


def stage2(cfg: SweepConfig, best: dict[str, float], ranks: dict[str, int]) -> list[Trial]:
    """The other seeds at each method's best surviving rate (``best``: method -> rate)."""
    if cfg.scheduler != "asha":
        return []
    return [trial(cfg, m, best[m], s, ranks) for m in cfg.methods if m in best for s in seeds(cfg)[1:]]


# -- checks (before any trial) ----------------------------------------------------------------------------
def check(cfg: SweepConfig) -> dict[str, int]:
    """Every bad input as one `ConfigError`, before anything runs; returns the budget's rank per method."""
    known = set(methods()) | {FULL}
    unknown = [m for m in cfg.methods if m not in known]
    if unknown:
        raise ConfigError(f"unknown method {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if not cfg.methods or any(not rates(cfg, m) for m in cfg.methods):
        raise ConfigError("the grid is empty: give at least one method and one learning rate for each")
    if cfg.seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {cfg.seeds}")
    if cfg.scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {cfg.scheduler!r}")
    if not cfg.cpus_per_trial > 0 or not (cfg.gpus_per_trial or 0) >= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {cfg.cpus_per_trial} and "
                          f"{cfg.gpus_per_trial}")
    if cfg.reduction_factor < 2:
        raise ConfigError(f"the reduction factor must be at least 2, got {cfg.reduction_factor}")
    for m in cfg.methods:
        if m != FULL:
            check_method_options(m, {**cfg.base.method_options, **cfg.method_options.get(m, {})})
    base = cfg.base.resolved()
    if cfg.scheduler == "asha" and not 1 <= base.eval_every < base.steps:
        raise ConfigError(f"--scheduler asha needs intermediate evaluations: --eval-every ({base.eval_every}) between "
                          f"1 and --steps - 1 ({base.steps - 1}); or use --scheduler grid")
    from ..train.data import load_task
    spec, _ = load_task(base.task, "train", base.data_dir, seed=base.seed)
    check_metric(base.metric, spec)
    from ..models import load_skeleton
    model = load_skeleton(base.model, spec.type, spec.num_labels)  # shapes only: nothing is read or allocated
    ranks = budget_ranks(cfg, base, spec, model) if cfg.budget is not None else fitted_ranks(cfg, base, spec, model)
    if cfg.address is not None:
        check_address(cfg.address)
    return ranks


def check_address(address: str) -> None:
    """``auto`` (the cluster `ray start` left on this machine), ``host:port`` (its GCS) or ``ray://host:port``
    (Ray Client): a TCP connection must open within 5 s."""
    target = address.removeprefix("ray://")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address
        try:
            target = canonicalize_bootstrap_address("auto") or ""
        except (ConnectionError, ValueError) as err:
            raise ConfigError(f"--address auto: no running Ray cluster found on this machine ({err}); start one "
                              "with `ray start --head` or leave --address out") from None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--address must be auto, host:port or ray://host:port, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
            pass
    except OSError as err:
        raise ConfigError(f"--address {address}: cannot reach a Ray cluster there ({err.strerror or err})") from None


def budget_ranks(cfg: SweepConfig, base: RunConfig, spec: Any, model: Any) -> dict[str, int]:
    """For each method, the rank whose trainable-parameter count (the registry's ``params_per_matrix`` over the
    run's targets, plus the trained head) comes closest to ``cfg.budget``; ties go to the smaller rank."""
    assert cfg.budget is not None
    if cfg.budget < 1:
        raise ConfigError(f"--budget must be a positive parameter count, got {cfg.budget}")
    ranks = {}
    for method in cfg.methods:
        options = cfg.method_options.get(method, {})
        if "r" in {**base.method_options, **options}:
            raise ConfigError(f"--budget chooses {method}'s rank; do not also pass -o r=...")
        counts = rank_counts(model, base, spec, method, options)
        if not counts:
            raise ConfigError(f"--budget {cfg.budget:,}: {method} has no rank to choose")
        r, count = min(counts.items(), key=lambda rc: (abs(rc[1] - cfg.budget), rc[0]))
        if not cfg.budget / BUDGET_SLACK <= count <= cfg.budget * BUDGET_SLACK:
            raise ConfigError(f"--budget {cfg.budget:,} cannot be met by {method}: its ranks give "
                              f"{min(counts.values()):,} to {max(counts.values()):,} trainable parameters")
        ranks[method] = r
    return ranks


def fitted_ranks(cfg: SweepConfig, base: RunConfig, spec: Any, model: Any) -> dict[str, int]:
    """Without ``--budget`` each method trains at its own rank.  A method's *default* rank larger than the model
    admits (LoRA-SB's r=32 on a 32-wide toy model) is lowered to the largest rank that fits, with a warning, and
    the leaderboard's ``rank`` column shows it; a rank the user chose (``-o r=``) that does not fit is refused
    here, before any trial, since every trial would fail the same way."""
    ranks = {}
    for method in cfg.methods:
        if method == FULL:
            continue
        options = {**base.method_options, **cfg.method_options.get(method, {})}
        run = dataclasses.replace(base, method=method, method_options=options)
        default = getattr(method_config(run, spec, model), "r", None)
        counts = rank_counts(model, base, spec, method, cfg.method_options.get(method, {}))
        if not isinstance(default, int) or not counts or default in counts:
            continue
        if "r" in options:
            raise ConfigError(f"{method}: r={default} does not fit this model; its targets admit ranks "
                              f"{min(counts)} to {max(counts)}")
        ranks[method] = max(counts)
        logger.warning("%s's default rank %d does not fit %s; the sweep trains it at r=%d, the largest that fits",
                       method, default, base.model, ranks[method])
    return ranks


def rank_counts(model: Any, base: RunConfig, spec: Any, method: str, options: dict[str, Any]) -> dict[int, int]:
    """Trainable parameters of ``method`` at every rank from 1 to the smallest target's side."""
    if method == FULL:
        return {}
    from ..core.inject import find_targets
    from ..core.layer import base_shape
    run = dataclasses.replace(base, method=method, method_options={**base.method_options, **options})
    config = method_config(run, spec, model)
    registered = get_method(method)
    shapes = [base_shape(m) for _, m in find_targets(model, config.target_modules)]
    head = sum(p.numel() for name, p in model.named_parameters()
               if any(name == s or name.startswith(s + ".") or f".{s}." in name for s in config.modules_to_save))
    counts = {}
    for r in range(1, min(min(s) for s in shapes) + 1):
        try:
            at_r = dataclasses.replace(config, r=r)
            counts[r] = head + sum(registered.params_per_matrix(d_out, d_in, at_r) for d_out, d_in in shapes)
        except (LorakitError, TypeError, ValueError):
            continue
    return counts
