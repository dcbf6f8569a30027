"""The configuration every method shares, as a frozen dataclass that validates itself and round-trips JSON."""

from __future__ import annotations

import dataclasses
import logging
import math
import reprlib
import types
import typing
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
        if self.alpha is not None and not 0 < self.alpha < math.inf:
            raise ConfigError(f"alpha must be positive and finite (or None for alpha = r), got {self.alpha}")
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
        """Build from JSON, every value checked against the field's type first (`check_schema`);
        unknown keys are ignored with a warning (as PEFT does)."""
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.method or cls.__name__} config must be a JSON object, "
                              f"got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(data) - known)
        if unknown:
            logger.warning("ignoring unknown %s config keys: %s", cls.method or cls.__name__, unknown[:20])
        return cls(**check_schema(cls, {k: v for k, v in data.items() if k in known}))

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)


def check_schema(cls: type[AdapterConfig], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` checked against ``cls``'s field types (JSON lists become tuples).

    bool must be a real bool, int a real int (not a bool), float an int or a finite float, str a str;
    ``X | None``, ``tuple[X, ...]``, ``tuple[X, Y]`` and ``dict[str, X]`` are checked element by element.
    Ranges are left to ``__post_init__``/`validate`, which then see well-typed values only.
    """
    hints = typing.get_type_hints(cls)
    return {name: check_value(f"{cls.method or cls.__name__} config '{name}'", value, hints[name])
            for name, value in values.items()}


def _show(value: Any) -> str:
    """A short repr, safe on deeply nested or huge values."""
    return reprlib.repr(value)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def check_value(where: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` (JSON lists become tuples); ``where`` names it in the error.
    One checker for adapter files, run configs and method options."""
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [t for t in args if t is not type(None)]
        if len(options) == 1:
            return check_value(where, value, options[0])
        for option in options:
            try:
                return check_value(where, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {_show(value)}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where} must be null, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {_show(value)}")
        if abs(value) > 1e308 or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {_show(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {_show(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_value(f"{where}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where} must be a list of {len(args)} items, got {len(value)}")
        return tuple(check_value(f"{where}[{i}]", v, t) for i, (v, t) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {_show(value)}")
        return {check_value(f"{where} key", k, args[0]): check_value(f"{where}[{k!r}]", v, args[1])
                for k, v in value.items()}
    raise TypeError(f"{where}: check_schema does not know the type {tp!r}")  # a lorakit bug, not bad input


def required_fields(cls: type[AdapterConfig]) -> list[str]:
    return [f.name for f in fields(cls) if f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING]


__all__ = ["AdapterConfig", "check_schema", "field", "required_fields"]
