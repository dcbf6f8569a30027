"""ALoRA (Liu, Lyn, Zhu, Tian & Graham 2024, arXiv 2403.16187, NAACL 2024): allocating low-rank adaptation.

``ΔW = (α/r) · B G A`` with ``G = diag(α_1..α_k)`` a gate per rank (paper Fig. 1): every gate is 1 at init, pruning a
rank sets its gate to 0.  A is Kaiming-uniform and B = 0 as in LoRA, so the output starts unchanged.

* AB-LoRA importance (§3.2), ablation-based: with S(M) = −(validation loss of the network M), the score of rank i of
  module m is ``IS(i) = S(M) − S(M without rank i)`` (the same validation batches, eval mode, no gradients): how
  much the network loses when the rank is switched off; IS < 0 means the rank hurts.  Choice: the paper's exact
  combination could not be checked; the form recalled in the spec, ``S(M with only rank i in m) − S(M without i)``,
  is antisymmetric in a module with two active ranks (IS(i) = −IS(j)), so "prune every negative rank" would prune
  one of any two ranks whatever they do; the core ablation term above has no such artefact.
* Schedule (§3.3): after ``warmup_steps`` of training the super-network, every ``prune_interval`` steps, for
  ``prune_rounds`` rounds: score every active rank; prune the ``prune_per_round`` lowest-scoring ranks and, in
  addition, every rank with negative IS (it hurts); give the freed budget to modules that lost no rank in this
  round, as new LoRA ranks (A row Kaiming-uniform, B column 0, so the output does not jump).  The total number of
  active ranks stays the initial ``r × #modules``.  Training continues after the last round.

Each matrix holds ``max_rank`` slots (``lora_A``, ``lora_B``) and a ``lora_gate`` buffer (1 = active), so ranks can
move between modules without reshaping tensors; the forward uses all slots (inactive ones are multiplied by 0 and
get zero gradients) and `as_lora` / the export keep only the active ones.  The scale divides by the initial r.

Choices where the paper could not be checked ([unconfirmed]; no official code was found): ``max_rank = 2r``;
``warmup_steps = None`` means a quarter of the training and ``prune_interval = None`` spreads the rounds over the
following half (a training too short for one warmup step and one step between rounds is not pruned);
``prune_per_round = None`` means 10 % of the budget; the freed ranks go round-robin to the eligible modules in
order of their mean IS (highest first); if those have no free slot left, to any module with one (same order).
A re-activated slot is re-initialised.  Validation batches come from `AloraHooks.set_validation_data`; without
them the most recent training batch (handed to ``after_forward``) is used.  Under data parallelism every rank must
score on the same batches.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.loss import model_loss
from ..core.registry import Method, register
from ..errors import ConfigError, TrainingError
from .adaptive import keep_ranks, rank_metrics
from .lora import kaiming_uniform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AloraConfig(AdapterConfig):
    """ALoRA.  ``r``: initial rank per matrix (the budget is r × #matrices); ``max_rank``: slots per matrix
    (``None``: 2r); ``warmup_steps``/``prune_interval``/``prune_rounds``: the prune schedule (``None``: derived from
    the number of training steps); ``prune_per_round``: n_A, ranks pruned per round besides the negative ones."""

    method: ClassVar[str] = "alora"
    max_rank: int | None = None
    warmup_steps: int | None = None
    prune_interval: int | None = None
    prune_rounds: int = 3
    prune_per_round: int | None = None

    @property
    def capacity(self) -> int:
        return self.max_rank if self.max_rank is not None else 2 * self.r

    def validate(self) -> None:
        if self.capacity < self.r:
            raise ConfigError(f"max_rank={self.max_rank} is smaller than the initial rank r={self.r}")
        if self.prune_rounds < 1:
            raise ConfigError(f"prune_rounds must be >= 1, got {self.prune_rounds}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.prune_interval is not None and self.prune_interval < 1:
            raise ConfigError(f"prune_interval must be >= 1, got {self.prune_interval}")
        if self.prune_per_round is not None and self.prune_per_round < 1:
            raise ConfigError(f"prune_per_round must be >= 1, got {self.prune_per_round}")


class AloraLayer(AdapterLayer):
    """``lora_A`` (k×d_in), ``lora_B`` (d_out×k), ``lora_gate`` (k) buffer; k = max_rank slots, the first r active."""

    def __init__(self, base: nn.Module, config: AloraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.scale = config.scale
        slots = max(config.r, min(config.capacity, self.in_features, self.out_features))
        device, dtype = self.adapter_device_dtype()
        gen = seeded_generator(config.seed, name)
        if init_skipped():
            A, B = torch.zeros(slots, self.in_features), torch.zeros(self.out_features, slots)
        else:
            A = kaiming_uniform(slots, self.in_features, gen)
            B = (torch.zeros(self.out_features, slots) if config.init_weights
                 else kaiming_uniform(self.out_features, slots, gen))
        self.lora_A = nn.Parameter(A.to(device, dtype))
        self.lora_B = nn.Parameter(B.to(device, dtype))
        gate = torch.zeros(slots, device=device, dtype=dtype)
        gate[:config.r] = 1
        self.register_buffer("lora_gate", gate)

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h * (self.lora_gate * self.scale), self.lora_B)

    def delta_weight(self) -> Tensor:
        return (self.lora_B * (self.lora_gate * self.scale)) @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        """Only the active ranks (gate 1)."""
        return keep_ranks(self.lora_B * (self.lora_gate * self.scale), self.lora_A, self.lora_gate > 0)

    @property
    def rank(self) -> int:
        return int(self.lora_gate.sum())

    def active_slots(self) -> list[int]:
        return torch.nonzero(self.lora_gate > 0).flatten().tolist()

    def free_slots(self) -> list[int]:
        return torch.nonzero(self.lora_gate == 0).flatten().tolist()

    @torch.no_grad()
    def activate(self, slot: int, generator: torch.Generator) -> None:
        """A new LoRA rank in ``slot``: A row Kaiming-uniform, B column 0, gate 1."""
        self.lora_A[slot] = kaiming_uniform(1, self.in_features, generator)[0].to(self.lora_A)
        self.lora_B[:, slot] = 0
        self.lora_gate[slot] = 1


class AloraHooks(TrainingHooks):
    """AB-LoRA scoring, pruning and re-allocation on the prune schedule."""

    state_attrs = ("prune_steps", "rounds_done")

    def __init__(self, model: nn.Module, layers: dict[str, AdapterLayer], config: AloraConfig) -> None:
        super().__init__(model, layers, config)
        self.prune_steps: list[int] = []
        self.rounds_done = 0
        self._data: list[Any] | None = None
        self._loss_fn: Callable[[nn.Module, Any], Tensor] = model_loss
        self._captured: Mapping[str, Any] | None = None

    @property
    def alora_layers(self) -> dict[str, AloraLayer]:
        return {n: layer for n, layer in self.layers.items() if isinstance(layer, AloraLayer)}

    @property
    def budget(self) -> int:
        return sum(layer.rank for layer in self.alora_layers.values())

    def set_validation_data(self, batches: Iterable[Any],
                            loss_fn: Callable[[nn.Module, Any], Tensor] | None = None) -> None:
        """The batches AB-LoRA scores on (``loss_fn(model, batch)``, default the model's own loss)."""
        self._data = list(batches)
        if not self._data:
            raise ConfigError("set_validation_data got no batches")
        if loss_fn is not None:
            self._loss_fn = loss_fn

    def schedule(self, total_steps: int) -> list[int]:
        """The 0-based steps after which a prune round runs.  A derived schedule (``None`` fields) needs at least one
        warmup step and one step between rounds (scores of an untrained super-network are all 0); a training too
        short for that runs without pruning, with a warning."""
        cfg = self.config
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else total_steps // 4
        interval = cfg.prune_interval if cfg.prune_interval is not None else total_steps // (2 * cfg.prune_rounds)
        if (warmup < 1 and cfg.warmup_steps is None) or interval < 1:
            logger.warning("ALoRA: %d training steps are too few for %d prune rounds; training without pruning",
                           total_steps, cfg.prune_rounds)
            return []
        return [warmup + k * interval for k in range(cfg.prune_rounds)]

    def on_train_begin(self, total_steps: int) -> None:
        steps = self.schedule(total_steps)
        if steps and steps[-1] >= total_steps:
            raise TrainingError(f"ALoRA's prune schedule (last round after step {steps[-1] + 1}) is longer than the "
                                f"{total_steps} training steps; lower warmup_steps, prune_interval or prune_rounds")
        if steps and self.prune_per_round() >= self.budget:
            raise TrainingError(f"prune_per_round={self.prune_per_round()} would prune the whole budget of "
                                f"{self.budget} ranks; lower it")
        super().on_train_begin(total_steps)
        self.prune_steps = steps

    def prune_per_round(self) -> int:
        n = self.config.prune_per_round
        return n if n is not None else max(1, math.ceil(0.1 * self.budget))

    def after_forward(self, batch: Any, loss: Tensor, logits: Tensor | None) -> None:
        """Keep the latest training batch: the validation batch when none was set."""
        if self.prune_steps and isinstance(batch, Mapping):
            self._captured = {k: v.detach() if isinstance(v, Tensor) else v for k, v in batch.items()}

    def validation_batches(self) -> list[Any]:
        if self._data is not None:
            return self._data
        if self._captured is not None:
            return [self._captured]
        raise TrainingError("ALoRA scores ranks on validation batches and has none: call "
                            "lorakit.hooks(model).set_validation_data(batches) before training")

    @torch.no_grad()
    def evaluate(self, batches: list[Any]) -> float:
        """S(M) = −(mean loss over ``batches``)."""
        return -sum(float(self._loss_fn(self.model, b)) for b in batches) / len(batches)

    @torch.no_grad()
    def importance(self) -> dict[str, dict[int, float]]:
        """AB-LoRA's ``IS = S(M) − S(M without this rank)`` for every active rank of every module."""
        batches = self.validation_batches()
        was_training = self.model.training
        self.model.eval()
        scores: dict[str, dict[int, float]] = {}
        try:
            full = self.evaluate(batches)
            for name, layer in self.alora_layers.items():
                scores[name] = {}
                for slot in layer.active_slots():
                    layer.lora_gate[slot] = 0
                    scores[name][slot] = full - self.evaluate(batches)
                    layer.lora_gate[slot] = 1
        finally:
            self.model.train(was_training)
        return scores

    @torch.no_grad()
    def prune_and_reallocate(self) -> dict[str, list[int]]:
        """One round: prune the lowest and the negative ranks, give their budget to modules that lost none.
        Returns the pruned slots per module."""
        scores = self.importance()
        budget = self.budget
        ranked = sorted((s, name, slot) for name, per in scores.items() for slot, s in per.items())
        n_prune = self.prune_per_round()
        pruned: dict[str, list[int]] = {}
        for i, (s, name, slot) in enumerate(ranked):
            if i < n_prune or s < 0:
                pruned.setdefault(name, []).append(slot)
        layers = self.alora_layers
        for name, slots in pruned.items():
            for slot in slots:
                layers[name].lora_gate[slot] = 0
        freed = sum(len(s) for s in pruned.values())

        def mean_score(name: str) -> float:
            return sum(scores[name].values()) / max(1, len(scores[name]))

        order = sorted(layers, key=lambda n: (-mean_score(n), n))
        eligible = [n for n in order if n not in pruned]
        for candidates in (eligible, order):
            freed = self._allocate(freed, candidates, pruned)
        if freed or self.budget != budget:
            raise TrainingError(f"ALoRA could not re-allocate {freed} ranks (no free slots): raise max_rank")
        self.rounds_done += 1
        return pruned

    def _allocate(self, count: int, names: list[str], pruned: dict[str, list[int]]) -> int:
        """Round-robin ``count`` new ranks over ``names`` (free slots not pruned this round first); returns the rest."""
        layers = self.alora_layers
        while count:
            progress = False
            for name in names:
                if not count:
                    break
                free = layers[name].free_slots()
                if not free:
                    continue
                fresh = [s for s in free if s not in pruned.get(name, [])]
                slot = (fresh or free)[0]
                gen = seeded_generator(self.config.seed, f"{name}#round{self.rounds_done}#slot{slot}")
                layers[name].activate(slot, gen)
                count -= 1
                progress = True
            if not progress:
                break
        return count

    def after_step(self, step: int) -> None:
        if self.rounds_done < len(self.prune_steps) and step == self.prune_steps[self.rounds_done]:
            self.prune_and_reallocate()

    def metrics(self) -> dict[str, float]:
        return {"prune_rounds_done": float(self.rounds_done), **rank_metrics(self.layers)}


def alora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    """Stored (trainable) slots; r·(d_in + d_out) of them are active at any time."""
    return config.capacity * (d_in + d_out)


register(Method(
    name="alora", paper="Liu, Lyn, Zhu, Tian & Graham 2024, ALoRA: Allocating Low-Rank Adaptation for Fine-tuning "
    "Large Language Models, arXiv 2403.16187", config_class=AloraConfig, layer_class=AloraLayer,
    trainable="A, B (per-rank gates pruned and re-allocated)", params_per_matrix=alora_params, hooks_class=AloraHooks))
