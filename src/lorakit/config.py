"""The configuration every method shares, as a frozen dataclass that validates itself and round-trips JSON."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from .errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterConfig:
    """Fields common to all methods (PEFT's names where PEFT has one).

    r: adapter rank.  alpha: scale numerator (``None`` means ``alpha = r``, i.e. scale 1).
    target_modules: ``"all-linear"`` (every Linear/Conv1D but the output head), a list of module-name
    suffixes, or a regular expression matched against the full module name.
    modules_to_save: extra modules (e.g. a classifier head) trained in full and saved with the adapter.
    dropout: dropout on the adapter's input.  seed: seeds every random init of the adapter.
    init_weights: ``False`` replaces zero-initialised factors by random ones (tests, as in PEFT).
    """

    method: ClassVar[str] = ""

    r: int = 8
    alpha: float | None = None
    target_modules: str | tuple[str, ...] = "all-linear"
    modules_to_save: tuple[str, ...] = ()
    dropout: float = 0.0
    seed: int = 0
    init_weights: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if isinstance(self.modules_to_save, (list, str)):
            mts = (self.modules_to_save,) if isinstance(self.modules_to_save, str) else self.modules_to_save
            object.__setattr__(self, "modules_to_save", tuple(mts))
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"{type(self).__name__}.r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"alpha must be positive (or None for alpha = r), got {self.alpha}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty: give 'all-linear', a list of names, or a regex")
        self.validate()

    def validate(self) -> None:
        """Method-specific checks; raise `ConfigError`."""

    @property
    def scale(self) -> float:
        """LoRA's ``alpha / r`` (Hu et al. 2021, eq. 3)."""
        return (self.alpha if self.alpha is not None else self.r) / self.r

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build from JSON: unknown keys are ignored with a warning (as PEFT does)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning("ignoring unknown %s config keys: %s", cls.method or cls.__name__, unknown)
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


def required_fields(cls: type[AdapterConfig]) -> list[str]:
    return [f.name for f in fields(cls) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


__all__ = ["AdapterConfig", "field", "required_fields"]
