"""RankAdaptor (Zhou et al. 2024, arXiv 2406.15734): per-layer LoRA ranks for the recovery fine-tune of a
structurally pruned LLM, chosen by a search guided by a learned performance model.

The adapter: LoRA (``ΔW = s·B A``, A Kaiming-uniform, B = 0) whose rank depends on the transformer block,
``block_ranks[l]`` for every adapted matrix of block ``l`` (the paper allocates per decoder layer); an empty
``block_ranks`` is uniform rank ``r``, and ``r`` must be at least every block rank.  Each layer stores factors of
exactly its rank, so the saved adapter, `load` and the PEFT export (``rank_pattern`` or zero-padded to ``r``) follow
from the shapes.  Modules outside a numbered block (none in a decoder-only LLM) get rank ``r``.

The search (`search_ranks`, pure: it only calls the ``score`` function it is given):

1. Sample per-block configurations from the paper's action space ``{2, 4, …, 16}`` (the official code's
   ``action_space``) within the trainable-parameter budget of uniform LoRA at rank ``r_uniform``:
   ``Σ_l c_l r_l ≤ r_uniform Σ_l c_l`` with ``c_l`` the parameters per unit of rank of block ``l`` (`block_costs`;
   pruned blocks are narrower, so this is the exact parameter count, where the official code caps the rank sum).
   Blocks left unpruned (LLM-Pruner's first and last layers) keep ``r_uniform``, as in the official configurations.
2. ``score`` each: a short fine-tune of the pruned model with those ranks and an evaluation (higher is better).
3. Fit the performance model, an MLP ``ranks/max_rank -> standardized score`` (2 hidden layers of 64, SiLU,
   Adam 300 steps, MSE), on every (configuration, score) seen so far.
4. Propose the next configurations: the best-predicted of ``pool`` fresh budget-feasible samples.
5. Repeat for ``rounds``; return the best *measured* configuration (uniform LoRA is always scored first, so the
   search never returns something it measured worse than the baseline).

Where we differ or choose (checked against the official code, not the PDF): the official code trains its
predictor offline on a corpus of (pruned model, rank configuration, benchmark scores) and explores with an RL policy
network over it; we fit the predictor online from the search's own measurements and propose by ranking random
feasible samples (no offline corpus exists for a new model).  The
predictor's input is the normalized rank vector only (no per-layer SVD features); the pick is the best measured
configuration, not the best predicted; proposals exclude configurations already scored; infeasible samples are
repaired by lowering a random free block one step until the budget holds.  ``alpha=None`` means scale 1 in every
layer (α = r_l); a set ``alpha`` gives ``α / r_l`` per layer, as PEFT with ``rank_pattern`` does.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from ..config import AdapterConfig
from ..core.registry import Method, register
from ..errors import ConfigError
from .adaptive import block_index
from .lora import LoraConfig, LoraLayer, lora_params

RANK_CHOICES = (2, 4, 6, 8, 10, 12, 14, 16)  # the official code's action_space


@dataclass(frozen=True)
class RankAdaptorConfig(LoraConfig):
    """RankAdaptor.  ``block_ranks``: the LoRA rank of every transformer block, in block order (empty: uniform
    ``r``); ``r``: the largest rank (the padded PEFT export's rank), at least every entry of ``block_ranks``."""

    method: ClassVar[str] = "rankadaptor"
    block_ranks: tuple[int, ...] = ()

    def validate(self) -> None:
        for i, k in enumerate(self.block_ranks):
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.r:
                raise ConfigError(f"rankadaptor block_ranks[{i}] must be an integer in [1, r={self.r}], got {k!r}")

    def rank_of(self, name: str) -> int:
        """The rank of the adapted module ``name`` (its block's entry; ``r`` outside numbered blocks)."""
        block = block_index(name)
        if block is None or not self.block_ranks:
            return self.r
        if block >= len(self.block_ranks):
            raise ConfigError(f"rankadaptor block_ranks has {len(self.block_ranks)} entries but module '{name}' is "
                              f"in block {block}; give one rank per transformer block")
        return self.block_ranks[block]


class RankAdaptorLayer(LoraLayer):
    """A LoRA layer whose factors have its block's rank (``rank``)."""

    def __init__(self, base: nn.Module, config: RankAdaptorConfig, name: str = "") -> None:
        # factors, seed and scale at the block's rank r_l; the layer keeps the whole config
        super().__init__(base, config.replace(r=config.rank_of(name), block_ranks=()), name)
        self.config = config

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def rankadaptor_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    """At most ``r (d_in + d_out)`` (the largest block rank); the per-block count is `block_costs` × rank."""
    return lora_params(d_out, d_in, config)


register(Method(
    name="rankadaptor", paper="Zhou et al. 2024, RankAdaptor: Hierarchical Rank Allocation for Efficient "
    "Fine-Tuning Pruned LLMs via Performance Model, arXiv 2406.15734", config_class=RankAdaptorConfig,
    layer_class=RankAdaptorLayer, trainable="A, B (per-block ranks from a performance-model search)",
    params_per_matrix=rankadaptor_params))


# -- the search ---------------------------------------------------------------------------------------------------
def block_costs(shapes: Iterable[tuple[str, int, int]]) -> list[int]:
    """``c_l = Σ (d_in + d_out)`` over the adapted matrices ``(name, d_out, d_in)`` of each block ``l``:
    LoRA parameters per unit of rank."""
    costs: dict[int, int] = {}
    for name, d_out, d_in in shapes:
        block = block_index(name)
        if block is None:
            raise ConfigError(f"module '{name}' is in no numbered transformer block; RankAdaptor ranks blocks")
        costs[block] = costs.get(block, 0) + d_in + d_out
    if sorted(costs) != list(range(len(costs))):
        raise ConfigError(f"adapted blocks must be 0..n-1, got {sorted(costs)}")
    return [costs[b] for b in range(len(costs))]


@dataclass
class SearchResult:
    """The chosen ``block_ranks`` and every measured ``(configuration, score)`` in order (uniform first)."""

    best: tuple[int, ...]
    best_score: float
    history: list[tuple[tuple[int, ...], float]] = field(default_factory=list)
    predictor_fit: list[float] = field(default_factory=list)  # training MSE of the predictor, per round


def _feasible(ranks: list[int], costs: Sequence[int], budget: int, free: list[int], rng: random.Random,
              choices: Sequence[int]) -> tuple[int, ...]:
    """``ranks`` lowered one step at a random free block (above the smallest choice) until within ``budget``."""
    while sum(c * k for c, k in zip(costs, ranks)) > budget:
        movable = [b for b in free if ranks[b] > choices[0]]
        b = rng.choice(movable)
        ranks[b] = max(k for k in choices if k < ranks[b])
    return tuple(ranks)


def sample_configurations(n: int, costs: Sequence[int], r_uniform: int, fixed: Mapping[int, int],
                          rng: random.Random, choices: Sequence[int] = RANK_CHOICES) -> list[tuple[int, ...]]:
    """``n`` random per-block configurations within the uniform-LoRA parameter budget (step 1)."""
    budget = r_uniform * sum(costs)
    free = [b for b in range(len(costs)) if b not in fixed]
    if not free or sum(costs[b] * fixed.get(b, choices[0]) for b in range(len(costs))) > budget:
        raise ConfigError(f"no configuration fits the budget of uniform rank {r_uniform} with ranks from {choices}")
    out = []
    for _ in range(n):
        ranks = [fixed[b] if b in fixed else rng.choice(choices) for b in range(len(costs))]
        out.append(_feasible(ranks, costs, budget, free, rng, choices))
    return out


def fit_predictor(configs: Sequence[tuple[int, ...]], scores: Sequence[float], max_rank: int,
                  seed: int = 0, steps: int = 300) -> tuple[Callable[[Sequence[tuple[int, ...]]], list[float]], float]:
    """The performance model (step 3): an MLP fitted to standardized scores; returns ``(predict, train MSE)``."""
    x = torch.tensor(configs, dtype=torch.float32) / max_rank
    y = torch.tensor(scores, dtype=torch.float32)
    y = (y - y.mean()) / (y.std() + 1e-8) if len(scores) > 1 else y - y.mean()
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        mlp = nn.Sequential(nn.Linear(x.shape[1], 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(mlp.parameters(), lr=1e-2, weight_decay=1e-4)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(mlp(x).squeeze(-1), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(candidates: Sequence[tuple[int, ...]]) -> list[float]:
        return mlp(torch.tensor(candidates, dtype=torch.float32) / max_rank).squeeze(-1).tolist()

    return predict, loss.item()


def search_ranks(score: Callable[[tuple[int, ...]], float], costs: Sequence[int], r_uniform: int,
                 fixed_blocks: Iterable[int] = (), rounds: int = 3, per_round: int = 4, pool: int = 2000,
                 seed: int = 0, choices: Sequence[int] = RANK_CHOICES) -> SearchResult:
    """The RankAdaptor search (steps 1-5 of the module docstring).  ``score(block_ranks)`` fine-tunes briefly and
    evaluates (higher is better); it is called ``1 + rounds × per_round`` times (uniform first, then ``per_round``
    random configurations, then ``rounds − 1`` rounds proposed by the performance model)."""
    if rounds < 1 or per_round < 1:
        raise ConfigError(f"rounds and per_round must be >= 1, got {rounds} and {per_round}")
    rng = random.Random(seed)
    fixed = {b: r_uniform for b in fixed_blocks}
    uniform = tuple(r_uniform for _ in costs)
    history = [(uniform, float(score(uniform)))]
    fits: list[float] = []
    seen = {uniform}
    for round_ in range(rounds):
        candidates = [c for c in dict.fromkeys(sample_configurations(pool, costs, r_uniform, fixed, rng, choices))
                      if c not in seen]
        if round_ == 0:
            proposed = candidates[:per_round]
        else:
            predict, mse = fit_predictor([c for c, _ in history], [s for _, s in history], max(choices), seed)
            fits.append(mse)
            predicted = predict(candidates)
            order = sorted(range(len(candidates)), key=lambda i: -predicted[i])
            proposed = [candidates[i] for i in order[:per_round]]
        for config in proposed:
            seen.add(config)
            history.append((config, float(score(config))))
    best, best_score = max(history, key=lambda item: item[1])
    return SearchResult(best, best_score, history, fits)
