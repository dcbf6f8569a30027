"""RankAdaptor (Zhou et al. 2024, arXiv 2406.15734): per-layer LoRA ranks for the recovery fine-tune of a
structurally pruned LLM, chosen by a search guided by a learned performance model.

The adapter: LoRA (``ΔW = s·B A``, A Kaiming-uniform, B = 0) whose rank depends on the transformer block,
``block_ranks[l]`` for every adapted matrix of block ``l`` (the paper allocates per decoder layer); an empty
``block_ranks`` is uniform rank ``r``, and ``r`` must be at least every block rank.  Each layer stores factors of
exactly its rank, so the saved adapter, `load` and the PEFT export (``rank_pattern`` or zero-padded to ``r``) follow
from the shapes.  Modules outside a numbered block (none in a decoder-only LLM) get rank ``r``.

The search (`search_ranks`, pure: it only calls the ``score`` function it is given), after the official code
(``yuhua-zhou/LaRA@1fee996``: ``model/performance/performance_preditor.py``, ``model/nas/nas_model.py``,
``infer_nas.py``, ``utils/profiler.py``):

1. Sample per-block configurations from the paper's action space ``{2, 4, …, 16}`` (the official ``action_space``)
   within the trainable-parameter budget of uniform LoRA at rank ``r_uniform``:
   ``Σ_l c_l r_l ≤ r_uniform Σ_l c_l`` with ``c_l`` the parameters per unit of rank of block ``l`` (`block_costs`;
   pruned blocks are narrower, so this is the exact parameter count).  Blocks left unpruned (LLM-Pruner's first
   and last layers) keep ``r_uniform``, as the official ``NASAgent.select_action`` forces (``[3, 3, 3, 3] +
   action[4:-2] + [3, 3]``, action 3 = rank 8).
2. ``score`` each: a short fine-tune of the pruned model with those ranks and an evaluation (higher is better).
3. Fit the performance model on every (configuration, score) seen so far.  ``predictor="mlp"`` (the default): a
   2x64 SiLU MLP on ``ranks / 16``.  ``predictor="lstm"``, the official inputs: per block ``[(r_l − 2)/14, p_l,
   f_l]`` (the official ``LayerRankEncoder`` scaling, the block's pruning rate ``p_l`` and its SVD features
   ``f_l``, `layer_features`), an LSTM over the blocks (hidden 32) whose last output a linear head maps to the
   score.  Both fit standardized scores (Adam, 300 steps, MSE).  The MLP stays the default because it measured
   better in the benchmark's leave-one-out comparison of the two (``benchmarks/results/rankadaptor.md``).
4. Propose the next configurations: of ``pool`` fresh budget-feasible samples, the ``per_round`` of highest official
   reward (`reward`, ``infer_nas.py``'s ``NASEnvironment(alpha=100, beta=1.2)`` with budget 256 on 32 layers, here
   ``r_uniform · L``): ``100 · predicted score − 1.2 · log(1 + d')``, where ``d = n(Σ r) − n(r_uniform · L)``,
   ``n(x) = 10 (x − 2L)/(16L − 2L)`` and ``d' = |d|`` under the budget, ``(d + 1)²`` at or over it.
5. Repeat for ``rounds``; return the best *measured* configuration (uniform LoRA is always scored first, so the
   search never returns something it measured worse than the baseline).

What differs from the official search, and why:

* The official performance model is trained offline on a corpus of (pruned LLaMA/Vicuna, rank configuration, 7
  commonsense accuracies) and frozen; a REINFORCE policy network (attention + 2-layer LSTM,
  ``train_nas_model.py``) is trained against it and sampled 10,000 times, keeping the highest reward.  No such
  corpus exists for a new model, so we fit the predictor online on the search's own measurements and rank random
  feasible samples by the same reward instead of training a policy.
* The official predictor embeds rank, pruning rate and SVD features to 128 dimensions each and fuses them by
  multi-head attention (``FeatureFusion``) before a 1-layer LSTM (hidden 128), a BatchNorm neck and 7 task heads;
  ``predictor="lstm"`` concatenates the three per block into a hidden-32 LSTM with one linear head (one score, a
  few points); the default MLP sees the ranks only (pruning rates and SVD features are constant within one model's
  search, so only a model shared across blocks can use them).
* SVD features (`layer_features`): the official ``Profiler`` takes the singular values of q, k, v, o, up and down,
  zero-pads each to 4096, averages the six, pools to 128 bins (``AdaptiveAvgPool1d``) and normalizes with LLaMA-7B
  constants (mean 3.276, std 1.371); we pad to the largest of the six, pool to ``bins`` (8) and standardize over the
  model's own blocks.
* "Performance" is the official predicted mean accuracy in [0, 1]; ours is the caller's score (the benchmark's
  minus answer NLL in nats), so the 100 : 1.2 weighting trades a different unit.
* The reward's rank-sum penalty comes on top of the exact parameter budget (the official code has only the
  penalty); the pick is the best measured configuration, not the best predicted; proposals exclude configurations
  already scored; infeasible samples are repaired by lowering a random free block one step until the budget holds.

``alpha=None`` means scale 1 in every layer (α = r_l); a set ``alpha`` gives ``α / r_l`` per layer, as PEFT with
``rank_pattern`` does.
"""

from __future__ import annotations

import math
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


SVD_WEIGHTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.up_proj",
               "mlp.down_proj")  # the official Profiler's six matrices (gate_proj is not among them)
REWARD_ALPHA, REWARD_BETA = 100.0, 1.2  # infer_nas.py: NASEnvironment(alpha=100, beta=1.2)


@torch.no_grad()
def layer_features(blocks: Sequence[nn.Module], bins: int = 8) -> list[list[float]]:
    """Per block, its singular-value profile (the official ``Profiler`` + ``LayerInfoEncoder``): the singular values
    of q, k, v, o, up and down, zero-padded to the longest, averaged over the six, average-pooled to ``bins`` and
    standardized over all blocks."""
    profiles = []
    for block in blocks:
        modules = dict(block.named_modules())
        values = [torch.linalg.svdvals(modules[name].weight.detach().float()) for name in SVD_WEIGHTS]
        width = max(len(v) for v in values)
        mean = torch.stack([nn.functional.pad(v, (0, width - len(v))) for v in values]).mean(0)
        profiles.append(nn.functional.adaptive_avg_pool1d(mean[None, None], bins)[0, 0])
    x = torch.stack(profiles)
    return ((x - x.mean()) / (x.std() + 1e-8)).tolist()


def pruning_rates(blocks: Sequence[nn.Module], full_width: int) -> list[float]:
    """Per block, the share of MLP channels pruning removed (the official ``pruning_rate_list``: LLM-Pruner's
    per-block ratio, 0 on unpruned blocks)."""
    return [1 - block.mlp.up_proj.out_features / full_width for block in blocks]


def rank_penalty(ranks: Sequence[int], r_uniform: int = 8, choices: Sequence[int] = RANK_CHOICES) -> float:
    """The official ``NASEnvironment.step`` penalty on the rank sum against the budget ``r_uniform · L`` (256 for
    LLaMA-7B's 32 layers): ``log(1 + d')``, ``d = n(Σ r) − n(budget)``, ``n(x) = 10 (x − L·min)/(L·max − L·min)``,
    ``d' = |d|`` if ``d < 0`` else ``(d + 1)²``."""
    n = len(ranks)

    def norm(x: float) -> float:
        return 10 * (x - n * choices[0]) / (n * choices[-1] - n * choices[0])

    d = norm(sum(ranks)) - norm(r_uniform * n)
    return math.log1p(abs(d) if d < 0 else (d + 1) ** 2)


def reward(performance: float, ranks: Sequence[int], r_uniform: int = 8,
           choices: Sequence[int] = RANK_CHOICES) -> float:
    """The official reward ``100 · performance − 1.2 · rank_penalty`` (``infer_nas.py``)."""
    return REWARD_ALPHA * performance - REWARD_BETA * rank_penalty(ranks, r_uniform, choices)


def block_inputs(configs: Sequence[tuple[int, ...]], features: Sequence[Sequence[float]] | None,
                 rates: Sequence[float] | None) -> torch.Tensor:
    """``[configs, L, 2 + bins]``: per block ``(r_l − 2)/14`` (the official ``LayerRankEncoder``), the pruning rate
    and the SVD features."""
    n = len(configs[0])
    ranks = (torch.tensor(configs, dtype=torch.float32) - 2.0) / 14.0
    rate = torch.tensor(rates if rates is not None else [0.0] * n, dtype=torch.float32)
    feats = torch.tensor(features if features is not None else [[] for _ in range(n)], dtype=torch.float32)
    if rate.shape != (n,) or feats.shape[0] != n:
        raise ConfigError(f"RankAdaptor's predictor needs one pruning rate and one feature row per block ({n}), got "
                          f"{tuple(rate.shape)} and {tuple(feats.shape)}")
    static = torch.cat([rate[:, None], feats.reshape(n, -1)], 1).expand(len(configs), n, -1)
    return torch.cat([ranks[..., None], static], 2)


class _LstmPredictor(nn.Module):
    """An LSTM over the blocks' inputs, its last output mapped to one score (the official predictor, smaller)."""

    def __init__(self, d_in: int, hidden: int = 32) -> None:
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1]).squeeze(-1)


class _MlpPredictor(nn.Module):
    """The earlier 2x64 SiLU MLP on the rank vector alone (``ranks / 16``)."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(blocks, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp((x[..., 0] * 14.0 + 2.0) / 16.0).squeeze(-1)


PREDICTORS = ("mlp", "lstm")


def fit_predictor(configs: Sequence[tuple[int, ...]], scores: Sequence[float],
                  features: Sequence[Sequence[float]] | None = None, rates: Sequence[float] | None = None,
                  predictor: str = "mlp", seed: int = 0,
                  steps: int = 300) -> tuple[Callable[[Sequence[tuple[int, ...]]], list[float]], float]:
    """The performance model (step 3) fitted to standardized scores; returns ``(predict, train MSE)``, ``predict``
    in the scores' own units."""
    if predictor not in PREDICTORS:
        raise ConfigError(f"RankAdaptor predictor must be one of {PREDICTORS}, got {predictor!r}")
    x = block_inputs(configs, features, rates)
    y = torch.tensor(scores, dtype=torch.float32)
    mean, std = y.mean(), (y.std() if len(scores) > 1 else torch.ones(())) + 1e-8
    y = (y - mean) / std
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(seed)
        model: nn.Module = _LstmPredictor(x.shape[2]) if predictor == "lstm" else _MlpPredictor(x.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()

    @torch.no_grad()
    def predict(candidates: Sequence[tuple[int, ...]]) -> list[float]:
        return (model(block_inputs(candidates, features, rates)) * std + mean).tolist()

    return predict, loss.item()


def search_ranks(score: Callable[[tuple[int, ...]], float], costs: Sequence[int], r_uniform: int,
                 fixed_blocks: Iterable[int] = (), rounds: int = 3, per_round: int = 4, pool: int = 2000,
                 seed: int = 0, choices: Sequence[int] = RANK_CHOICES,
                 features: Sequence[Sequence[float]] | None = None, rates: Sequence[float] | None = None,
                 predictor: str = "mlp") -> SearchResult:
    """The RankAdaptor search (steps 1-5 of the module docstring).  ``score(block_ranks)`` fine-tunes briefly and
    evaluates (higher is better); it is called ``1 + rounds × per_round`` times (uniform first, then ``per_round``
    random configurations, then ``rounds − 1`` rounds proposed by the performance model and the reward).
    ``features``/``rates``: `layer_features` and `pruning_rates` of the pruned model (None: zeros)."""
    if rounds < 1 or per_round < 1:
        raise ConfigError(f"rounds and per_round must be >= 1, got {rounds} and {per_round}")
    if predictor not in PREDICTORS:
        raise ConfigError(f"RankAdaptor predictor must be one of {PREDICTORS}, got {predictor!r}")
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
            predict, mse = fit_predictor([c for c, _ in history], [s for _, s in history], features, rates,
                                         predictor, seed)
            fits.append(mse)
            rewards = [reward(p, c, r_uniform, choices) for p, c in zip(predict(candidates), candidates)]
            order = sorted(range(len(candidates)), key=lambda i: -rewards[i])
            proposed = [candidates[i] for i in order[:per_round]]
        for config in proposed:
            seen.add(config)
            history.append((config, float(score(config))))
    best, best_score = max(history, key=lambda item: item[1])
    return SearchResult(best, best_score, history, fits)
