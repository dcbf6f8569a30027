"""GLoRA (Chavan et al. 2023, arXiv 2306.07967, "One-for-All: Generalized LoRA"): a generalised weight, bias and
prompt adapter, a one-shot super-network over per-layer supports, and an evolutionary search.

The adapted layer (official code Arnav0400/ViT-Slim ``GLoRA/layer.py``)::

    W' = W0 + W0 ⊙ A + B,    b' = b0 + b0 ⊙ D + E + W0 C,    y = W' x + b'

Each of A..E has a support chosen per layer: A, B ∈ {lora, vector, constant, none} (d_out×d_in, broadcast),
C ∈ {lora, vector, none} (d_in×1), D, E ∈ {vector, constant, none} (d_out).  As in the official super-network the
supports share one set of tensors: ``lora`` = ``X_d X_u`` (``X_d`` zero-initialised, ``X_u`` Xavier-uniform),
``vector`` = the first column of ``X_d`` (or the vector itself for D, E), ``constant`` = its first entry.  So the
initial output is unchanged for every choice, and the searched adapter re-parameterises into W and b exactly
(`merge`; unmerge inverts it: ``W0 = (W' − B) / (1 + A)``, ``b0 = (b' − E − W0 C) / (1 + D)``, as PEFT).

Layers without a bias adapt W only (no C, D, E): re-parameterising a bias-free layer would add a bias the base
model does not have (PEFT does the same; the official code adds one).  Where the bias is all zeros, ``b0 ⊙ D``
is identically 0, so D is kept frozen (it would get zero gradients).

Training: ``supernet=True`` trains the one-shot super-network, every layer sampling a support uniformly at each
step (seeded by ``seed``, step and layer; official: a new sample per forward).  `search` then runs the official
evolutionary search (population 50, top 10, 25 mutations with p = 0.2, 25 crossovers, 20 generations, a
parameter budget) on a validation split, scoring candidates by ``score_fn(model)`` (default: minus the mean loss),
and fixes the winner in every layer and in the config (so `save` keeps it).  With ``supernet=False`` (default)
every layer trains its configured support, ``default_support`` (all paths at their largest) unless ``supports``
names one for it: a fixed GLoRA adapter, as PEFT's ``glora`` tuner.  ``r`` keeps lorakit's common default 8 (the
official ``--rank`` is 4 in ``evolution.py`` and ``supernet.py``), so the lora supports compare with the other
methods at the same rank.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.hooks import TrainingHooks
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..core.state import get_state
from ..errors import ConfigError, LorakitError

logger = logging.getLogger(__name__)
PATHS = "ABCDE"
OPTIONS = {"A": ("lora", "vector", "constant", "none"), "B": ("lora", "vector", "constant", "none"),
           "C": ("lora", "vector", "none"), "D": ("vector", "constant", "none"), "E": ("vector", "constant", "none")}


def parse_support(text: str) -> dict[str, str]:
    """``"A=lora,B=vector,C=none,D=constant,E=none"`` -> ``{"A": "lora", ...}`` (all five paths, validated)."""
    try:
        support = dict(item.split("=") for item in text.replace(" ", "").split(","))
    except ValueError as err:
        raise ConfigError(f"a GLoRA support looks like 'A=lora,B=vector,C=none,D=constant,E=none'; got {text!r}") \
            from err
    if sorted(support) != list(PATHS):
        raise ConfigError(f"a GLoRA support names each of A, B, C, D, E once; got {text!r}")
    for path, choice in support.items():
        if choice not in OPTIONS[path]:
            raise ConfigError(f"GLoRA path {path} takes one of {OPTIONS[path]}, got {choice!r} in {text!r}")
    return support


def format_support(support: dict[str, str]) -> str:
    return ",".join(f"{p}={support[p]}" for p in PATHS)


@dataclass(frozen=True)
class GloraConfig(AdapterConfig):
    """GLoRA.  ``r``: rank of the ``lora`` supports.  ``supernet``: train the one-shot super-network (random
    supports per step) for `search`.  ``default_support``/``supports``: the support of every layer / of named
    layers (``{"model.layers.0.self_attn.q_proj": "A=lora,B=none,C=none,D=none,E=none"}``); `search` fills
    ``supports``."""

    method: ClassVar[str] = "glora"
    supernet: bool = False
    default_support: str = "A=lora,B=lora,C=lora,D=vector,E=vector"
    supports: dict[str, str] | None = None

    def validate(self) -> None:
        parse_support(self.default_support)
        for text in (self.supports or {}).values():
            parse_support(text)


def _xavier(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``nn.init.xavier_uniform_``: U(±√(6 / (rows + cols)))."""
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * math.sqrt(6.0 / (rows + cols))


class GloraLayer(AdapterLayer):
    """The super-network tensors of one layer (``glora_Ad``/``glora_Au``, B, C likewise, ``glora_D``, ``glora_E``)
    and its current support (``support``; ``sampled`` overrides it during super-network training)."""

    def __init__(self, base: nn.Module, config: GloraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        r, d_out, d_in = config.r, self.out_features, self.in_features
        self.has_bias = getattr(base, "bias", None) is not None
        gen = seeded_generator(config.seed, name)
        random_init = not (config.init_weights or init_skipped())  # test switch: non-zero X_d, D, E
        device, dtype = self.adapter_device_dtype()

        def param(t: Tensor) -> nn.Parameter:
            return nn.Parameter(t.to(device, dtype).contiguous())

        def down(rows: int) -> Tensor:
            return _xavier(rows, r, gen) if random_init else torch.zeros(rows, r)

        def vector() -> Tensor:
            return (torch.rand(d_out, generator=gen) * 2 - 1) * 0.1 if random_init else torch.zeros(d_out)

        self.glora_Ad, self.glora_Au = param(down(d_out)), param(_xavier(r, d_in, gen))
        self.glora_Bd, self.glora_Bu = param(down(d_out)), param(_xavier(r, d_in, gen))
        if self.has_bias:
            self.glora_Cd, self.glora_Cu = param(down(d_in)), param(_xavier(r, 1, gen))
            self.glora_D, self.glora_E = param(vector()), param(vector())
            self.glora_D.requires_grad_(bool(base.bias.detach().any()))  # b0 ⊙ D is 0 for a zero bias: frozen
        self.support = self.own_support(config)
        self.sampled: dict[str, str] | None = None
        self.merged_support: dict[str, str] | None = None

    def own_support(self, config: GloraConfig) -> dict[str, str]:
        support = parse_support((config.supports or {}).get(self.name, config.default_support))
        if not self.has_bias:
            support.update(C="none", D="none", E="none")
        return support

    def current_support(self) -> dict[str, str]:
        if self.merged_support is not None:
            return self.merged_support
        return self.sampled if (self.training and self.sampled is not None) else self.support

    def _matrix(self, choice: str, down: Tensor, up: Tensor) -> Tensor | float:
        if choice == "lora":
            return down @ up
        if choice == "vector":
            return down[:, :1]
        return down[0, 0] if choice == "constant" else 0.0

    def _vector(self, choice: str, v: Tensor) -> Tensor | float:
        if choice == "vector":
            return v
        return v[0] if choice == "constant" else 0.0

    def updates(self, w0: Tensor, b0: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """``(W0 ⊙ A + B, b0 ⊙ D + E + W0 C)`` for the current support (float32)."""
        s = self.current_support()
        a, b = self._matrix(s["A"], self.glora_Ad, self.glora_Au), self._matrix(s["B"], self.glora_Bd, self.glora_Bu)
        dw = w0 * a + b
        if b0 is None:
            return dw, None
        db = b0 * self._vector(s["D"], self.glora_D) + self._vector(s["E"], self.glora_E)
        c = self._matrix(s["C"], self.glora_Cd, self.glora_Cu)
        if torch.is_tensor(c):
            db = db + (w0 @ c).squeeze(-1)
        return dw, db

    def _base_bias(self) -> Tensor | None:
        return self.base.bias.to(self.glora_Ad.dtype) if self.has_bias else None

    def delta(self, x: Tensor) -> Tensor:
        dw, db = self.updates(self.weight.to(self.glora_Ad.dtype), self._base_bias())
        return F.linear(self.dropout(x.to(dw.dtype)), dw, db)

    def unmerged(self) -> tuple[Tensor, Tensor | None]:
        """``(W0, b0)`` in float32, recovered exactly from the merged weights when merged."""
        w, b = self.weight.to(self.glora_Ad.dtype), self._base_bias()
        if not self.merged:
            return w, b
        s = self.current_support()
        a = self._matrix(s["A"], self.glora_Ad, self.glora_Au)
        w0 = (w - self._matrix(s["B"], self.glora_Bd, self.glora_Bu)) / (1 + a)
        if b is None:
            return w0, None
        c = self._matrix(s["C"], self.glora_Cd, self.glora_Cu)
        b = b - self._vector(s["E"], self.glora_E) - ((w0 @ c).squeeze(-1) if torch.is_tensor(c) else 0.0)
        return w0, b / (1 + self._vector(s["D"], self.glora_D))

    def delta_weight(self) -> Tensor:
        return self.updates(*self.unmerged())[0]

    @torch.no_grad()
    def merge(self, safe: bool = False) -> None:
        if self.merged:
            logger.warning("%s is already merged; merging again changes nothing", self.name)
            return
        dw, db = self.updates(self.weight.to(self.glora_Ad.dtype), self._base_bias())
        if safe and not (torch.isfinite(dw).all() and (db is None or torch.isfinite(db).all())):
            raise LorakitError(f"refusing to merge layer '{self.name}': its update has NaN or inf values; "
                               "the base weights were left unchanged")
        self._add_to_base(dw)
        if db is not None:
            self.base.bias.add_(db.to(self.base.bias.dtype))
        self.merged_support = dict(self.current_support())
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            logger.warning("%s is not merged; unmerge changes nothing", self.name)
            return
        w0, b0 = self.unmerged()
        self._add_to_base(w0 - self.weight.to(w0.dtype))
        if b0 is not None:
            self.base.bias.copy_(b0.to(self.base.bias.dtype))
        self.merged, self.merged_support = False, None

    def support_params(self, support: dict[str, str]) -> int:
        """Parameters a support uses at this layer (the official ``get_param_tensor`` count)."""
        sizes = {"A": (self.out_features, self.in_features), "B": (self.out_features, self.in_features),
                 "C": (self.in_features, 1)}
        total = 0
        for path, choice in support.items():
            rows, cols = sizes.get(path, (self.out_features, 0))
            total += {"lora": self.config.r * (rows + cols), "vector": rows, "constant": 1, "none": 0}[choice]
        return total


def glora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    """The super-network's size (a layer with a bias)."""
    return 2 * config.r * (d_in + d_out) + config.r * (d_in + 1) + 2 * d_out


def random_support(layer: GloraLayer, rng: random.Random) -> dict[str, str]:
    paths = PATHS if layer.has_bias else "AB"
    support = {p: rng.choice(OPTIONS[p]) for p in paths}
    return {p: support.get(p, "none") for p in PATHS}


class GloraHooks(TrainingHooks):
    """With ``supernet=True``: a uniformly sampled support per layer at every training step."""

    def glora_layers(self) -> dict[str, GloraLayer]:
        return {n: layer for n, layer in self.layers.items() if isinstance(layer, GloraLayer)}

    def before_forward(self, step: int) -> None:
        if not self.config.supernet:
            return
        for name, layer in self.glora_layers().items():
            rng = random.Random(f"{self.config.seed}/{name}/{step}")
            layer.sampled = random_support(layer, rng)

    def after_step(self, step: int) -> None:
        for layer in self.glora_layers().values():
            layer.sampled = None


Candidate = tuple[str, ...]  # one formatted support per layer, in layer order


@torch.no_grad()
def search(model: nn.Module, val_data: Iterable[Any], score_fn: Callable[[nn.Module], float] | None = None,
           population: int = 50, select: int = 10, mutations: int = 25, crossovers: int = 25, m_prob: float = 0.2,
           generations: int = 20, max_params: int | None = None, seed: int = 0) -> dict[str, str]:
    """The official evolutionary search over per-layer supports of a trained super-network.

    Each generation keeps the ``select`` best candidates, breeds ``mutations`` (each path re-drawn with probability
    ``m_prob``) and ``crossovers`` (each path from one of two parents), and tops up with random candidates to
    ``population``; candidates over ``max_params`` adapter parameters are rejected.  ``score_fn(model)`` (higher is
    better) defaults to minus the mean ``model(**batch).loss`` over ``val_data``.  The best supports are set on
    every layer and stored in the config (``supports``); returns them.
    """
    state = get_state(model)
    layers = {n: layer for n, layer in state.layers.items() if isinstance(layer, GloraLayer)}
    if not layers:
        raise LorakitError("glora.search needs a model with a GLoRA adapter attached")
    if any(layer.merged for layer in layers.values()):
        raise LorakitError("the adapter is merged; unmerge(model) before searching")
    batches = list(val_data)
    if score_fn is None:
        if not batches:
            raise LorakitError("glora.search needs validation batches (val_data) or a score_fn")

        def score_fn(m: nn.Module) -> float:
            return -sum(float(m(**b).loss) for b in batches) / len(batches)

    rng = random.Random(seed)
    names = list(layers)
    scores: dict[Candidate, float] = {}
    was_training = model.training
    model.eval()

    def legal(cand: Candidate) -> bool:
        if max_params is None:
            return True
        return sum(layers[n].support_params(parse_support(s)) for n, s in zip(names, cand)) <= max_params

    def evaluate(cand: Candidate) -> None:
        for name, text in zip(names, cand):
            layers[name].support = parse_support(text)
        scores[cand] = score_fn(model)

    def fill(pool: list[Candidate], make: Callable[[], Candidate], wanted: int) -> list[Candidate]:
        out: list[Candidate] = []
        for _ in range(10 * max(wanted, 1)):
            if len(out) >= wanted:
                break
            cand = make()
            if cand in scores or cand in out or not legal(cand):
                continue
            evaluate(cand)
            out.append(cand)
        return pool + out

    def random_cand() -> Candidate:
        return tuple(format_support(random_support(layers[n], rng)) for n in names)

    def mutate() -> Candidate:
        parent = rng.choice(top)
        out = []
        for name, text in zip(names, parent):
            support = parse_support(text)
            fresh = random_support(layers[name], rng)
            out.append(format_support({p: fresh[p] if rng.random() < m_prob else support[p] for p in PATHS}))
        return tuple(out)

    def crossover() -> Candidate:
        a, b = rng.choice(top), rng.choice(top)
        return tuple(format_support({p: rng.choice([parse_support(x)[p], parse_support(y)[p]]) for p in PATHS})
                     for x, y in zip(a, b))

    try:
        candidates = fill([], random_cand, population)
        top: list[Candidate] = []
        for generation in range(generations):
            top = sorted(dict.fromkeys(top + candidates), key=scores.__getitem__, reverse=True)[:select]
            logger.info("glora search generation %d: best score %.6g", generation, scores[top[0]])
            candidates = fill([], mutate, mutations)
            candidates = fill(candidates, crossover, crossovers)
            candidates = fill(candidates, random_cand, population - len(candidates))
        best = max(scores, key=scores.__getitem__)
    finally:
        model.train(was_training)
    chosen = dict(zip(names, best))
    for name, text in chosen.items():
        layers[name].support = parse_support(text)
    state.config = state.config.replace(supports=chosen)
    return chosen


register(Method(
    name="glora", paper="Chavan, Liu, Gupta, Xing & Shen 2023, One-for-All: Generalized LoRA for Parameter-Efficient "
    "Fine-tuning, arXiv 2306.07967", config_class=GloraConfig, layer_class=GloraLayer,
    trainable="A-E paths of the super-network (the searched support per layer)", params_per_matrix=glora_params,
    hooks_class=GloraHooks, low_rank=False))
