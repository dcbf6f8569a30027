"""LoRA (Hu et al. 2021, arXiv 2106.09685) and rsLoRA (Kalajdzievski 2023, arXiv 2312.03732).

``W = W0 + s · B A`` with ``B ∈ R^{d_out×r}`` zero-initialised and ``A ∈ R^{r×d_in}`` Kaiming-uniform
(eq. 3 of the LoRA paper; PEFT's init), ``s = α/r`` (LoRA) or ``α/√r`` (rsLoRA, eq. 5).
The forward is ``W0 x + B (s · A dropout(x))``: the scale multiplies the r-wide intermediate.
``rank_pattern`` / ``alpha_pattern`` give single layers their own r and α, matched as PEFT matches them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import regex
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AdapterConfig
from ..core.inject import MATCH_BUDGET_S, compile_regex
from ..core.layer import AdapterLayer, init_skipped
from ..core.linalg import seeded_generator
from ..core.registry import Method, register
from ..errors import ConfigError, TargetError

# Methods whose layers read the per-layer patterns; any other LoraConfig subclass refuses them.
PATTERN_METHODS = frozenset({"lora", "rslora", "dora"})


# A key without regex syntax but '.' (any character but a newline): the usual PEFT key, a module name.
_DOTTED_LITERAL = regex.compile(r"[^\\^$*+?{}\[\]|()\n]*")
Patterns = tuple[tuple[str, "regex.Pattern[str] | None"], ...]


def compile_patterns(patterns: Mapping[str, object]) -> Patterns:
    """Each key of ``patterns`` with its regex ``(.*\\.)?(key)`` compiled, in order, or ``None`` for a key
    with no regex syntax but '.' (matched by `_suffix_matches`, as fast as a string comparison): done once per
    config, since a 20k-key ``rank_pattern`` compiled per layer and call made loading take minutes."""
    compiled = []
    for key in patterns:
        if _DOTTED_LITERAL.fullmatch(key):
            compiled.append((key, None))
            continue
        try:
            compiled.append((key, compile_regex(rf"(.*\.)?({key})", "pattern key")))
        except TargetError as err:
            raise ConfigError(f"pattern key {key!r:.120} ({err})") from err
    return tuple(compiled)


def _suffix_matches(key: str, name: str) -> bool:
    """``(.*\\.)?(key)`` fully matches ``name`` for a `_DOTTED_LITERAL` key: ``name`` ends with as many characters
    as ``key`` has, equal to it where ``key`` is not '.', after nothing or a '.' (no newline: '.*' skips none)."""
    head, tail = name[:len(name) - len(key)], name[len(name) - len(key):]
    return (len(name) >= len(key) and (not head or head.endswith(".")) and "\n" not in head
            and all(k == c or (k == "." and c != "\n") for k, c in zip(key, tail)))


def pattern_key(patterns: Mapping[str, object] | Patterns, name: str) -> str | None:
    """The first key of ``patterns`` (a mapping, or `compile_patterns` of one) that matches module ``name`` as
    PEFT's ``get_pattern_key`` matches it: ``re.match(rf"(.*\\.)?({key})$", name)``, i.e. the key is a regex
    matching a dot-separated suffix.  All the keys together may take `MATCH_BUDGET_S` for one name."""
    compiled = compile_patterns(patterns) if isinstance(patterns, Mapping) else patterns
    deadline = time.monotonic() + MATCH_BUDGET_S
    for key, pattern in compiled:
        if pattern is None:
            if _suffix_matches(key, name):
                return key
            continue
        try:
            if pattern.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None:
                return key
        except TimeoutError as err:
            raise ConfigError(f"pattern key {key!r:.120} took over {MATCH_BUDGET_S} s to match {name!r:.120} "
                              "(catastrophic backtracking); simplify it") from err
    return None


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """LoRA.  ``use_rslora`` switches the scale to ``α/√r``; ``alpha=None`` means ``α = r``.

    ``rank_pattern`` / ``alpha_pattern`` (PEFT's names): module-name pattern -> that layer's r / α
    (see `pattern_key`); a layer no key matches uses ``r`` / ``alpha``.
    """

    method: ClassVar[str] = "lora"
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict, hash=False)
    alpha_pattern: dict[str, float] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.rank_pattern or self.alpha_pattern) and self.method not in PATTERN_METHODS:
            raise ConfigError(f"rank_pattern/alpha_pattern are supported by {sorted(PATTERN_METHODS)}, "
                              f"not {self.method!r}; leave them empty")
        for key, r in self.rank_pattern.items():
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise ConfigError(f"rank_pattern[{key!r:.120}] must be a positive integer, got {r!r}")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
                raise ConfigError(f"alpha_pattern[{key!r:.120}] must be positive and finite, got {alpha!r}")
        # an invalid or too costly regex fails here, not at attach; not fields: neither saved nor compared
        object.__setattr__(self, "_rank_keys", compile_patterns(self.rank_pattern))
        object.__setattr__(self, "_alpha_keys", compile_patterns(self.alpha_pattern))

    @property
    def scale(self) -> float:
        alpha = self.alpha if self.alpha is not None else self.r
        return alpha / math.sqrt(self.r) if self.use_rslora else alpha / self.r

    def rank_for(self, name: str) -> int:
        """The rank of layer ``name``: its `rank_pattern` entry, else ``r``."""
        key = pattern_key(self._rank_keys, name) if self.rank_pattern else None
        return self.r if key is None else self.rank_pattern[key]

    def scale_for(self, name: str) -> float:
        """Layer ``name``'s scale ``α/r`` (``α/√r`` with rsLoRA) from its own r and α (PEFT's rule)."""
        r = self.rank_for(name)
        key = pattern_key(self._alpha_keys, name) if self.alpha_pattern else None
        alpha = self.alpha_pattern[key] if key is not None else self.alpha if self.alpha is not None else self.r
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


@dataclass(frozen=True)
class RsLoraConfig(LoraConfig):
    """rsLoRA: LoRA with the rank-stabilised scale ``α/√r``."""

    method: ClassVar[str] = "rslora"
    use_rslora: bool = True


def kaiming_uniform(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """``nn.init.kaiming_uniform_(a=√5)`` as ``nn.Linear`` (and PEFT's ``lora_A``) use it: U(±1/√cols)."""
    bound = 1.0 / math.sqrt(cols)
    return (torch.rand(rows, cols, generator=generator) * 2 - 1) * bound


class LoraLayer(AdapterLayer):
    """Trainable ``lora_A`` (r×d_in) and ``lora_B`` (d_out×r).  Subclasses change `init_factors`."""

    def __init__(self, base: nn.Module, config: LoraConfig, name: str = "") -> None:
        super().__init__(base, config, name)
        self.r, self.scale = config.r, config.scale
        if isinstance(config, LoraConfig) and (config.rank_pattern or config.alpha_pattern):
            self.r, self.scale = config.rank_for(name), config.scale_for(name)
            if self.r > min(self.out_features, self.in_features):
                raise ConfigError(f"rank_pattern gives layer '{name}' rank {self.r}, larger than min(d_in, d_out) = "
                                  f"{min(self.out_features, self.in_features)}; lower it")
        device, dtype = self.adapter_device_dtype()
        if init_skipped():
            B, A = torch.zeros(self.out_features, self.r), torch.zeros(self.r, self.in_features)
        else:
            B, A = self.init_factors(seeded_generator(config.seed, name))
        self.lora_A = nn.Parameter(A.to(device, dtype).contiguous())
        self.lora_B = nn.Parameter(B.to(device, dtype).contiguous())

    def init_factors(self, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(B, A)``: A Kaiming-uniform, B zero (random when ``init_weights=False``)."""
        r = self.r
        A = kaiming_uniform(r, self.in_features, generator)
        if self.config.init_weights:
            B = torch.zeros(self.out_features, r)
        else:
            B = kaiming_uniform(self.out_features, r, generator)
        return B, A

    def delta(self, x: Tensor) -> Tensor:
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        return F.linear(h * self.scale, self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if type(self).delta is not LoraLayer.delta:  # a subclass changed the update: the generic path
            return super().forward(x)
        out = self.base(x)
        if self.merged or self.disabled:
            return out
        h = F.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        if out.dtype != h.dtype or not out.is_contiguous():
            return out + F.linear(h * self.scale, self.lora_B).to(out.dtype)
        flat = out.view(-1, self.out_features)
        if torch.compiler.is_compiling():  # the in-place sum below, out of place: `_is_view` would break the graph
            return torch.addmm(flat, h.reshape(-1, h.shape[-1]), self.lora_B.T.to(h.dtype), alpha=self.scale
                               ).view(out.shape)
        # bitsandbytes' 4-bit matmul with a bias returns a view, which autograd forbids modifying in place
        if out._is_view():
            return out + F.linear(h * self.scale, self.lora_B).to(out.dtype)
        # out += s · h Bᵀ in one BLAS call, in place: the base output is not needed by its own backward
        flat.addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.T.to(h.dtype), alpha=self.scale)  # autocast: h bf16
        return out

    def delta_weight(self) -> Tensor:
        return (self.lora_B * self.scale) @ self.lora_A

    def as_lora(self) -> tuple[Tensor, Tensor]:
        return self.lora_B * self.scale, self.lora_A

    def extra_repr(self) -> str:
        return f"d_in={self.in_features}, d_out={self.out_features}, r={self.r}"


def lora_params(d_out: int, d_in: int, config: AdapterConfig) -> int:
    return config.r * (d_in + d_out)


LORA = register(Method(
    name="lora", paper="Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models, arXiv 2106.09685",
    config_class=LoraConfig, layer_class=LoraLayer, trainable="A, B", params_per_matrix=lora_params))
RSLORA = register(Method(
    name="rslora", paper="Kalajdzievski 2023, A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA, "
    "arXiv 2312.03732", config_class=RsLoraConfig, layer_class=LoraLayer, trainable="A, B",
    params_per_matrix=lora_params))
