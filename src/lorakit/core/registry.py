"""The method registry: name -> `Method`.  Every method module registers itself on import."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from torch import nn

from ..config import AdapterConfig
from ..errors import UnknownMethodError
from .hooks import TrainingHooks
from .layer import AdapterLayer

# initialize(model, layers, config, data, loss_fn): a whole-model init run after the layers exist
# (data-driven inits such as LoRA-GA and LoRA-SB).  ``data`` is an iterable of batches.
Initializer = Callable[[nn.Module, dict[str, AdapterLayer], AdapterConfig, Iterable[Any] | None,
                        Callable[..., Any] | None], None]


@dataclass(frozen=True)
class Method:
    """What a method contributes to the core.

    name: lower case, hyphenated, as the paper writes it (``lora-sb``).  paper: citation with arXiv id.
    trainable: which tensors train.  params_per_matrix: count for a ``d_out x d_in`` matrix at rank r.
    initialize: a whole-model init (data-driven inits), or ``None`` when layers init themselves.
    needs_data: ``attach`` requires ``data=`` batches.  low_rank: the update exports as a PEFT LoRA.
    keeps_output: the default init leaves the output unchanged.
    base_offsets: which layers carry low-rank base offsets (``base_offset_B``/``base_offset_A``) in a saved
    adapter: ``"none"``, ``"every-layer"`` (inits that move W0) or ``"merged-rounds"`` (the layers whose
    boosting rounds were merged, listed in the adapter's JSON); `load` refuses any other set.
    """

    name: str
    paper: str
    config_class: type[AdapterConfig]
    layer_class: type[AdapterLayer]
    trainable: str
    params_per_matrix: Callable[[int, int, AdapterConfig], int]
    hooks_class: type[TrainingHooks] = TrainingHooks
    initialize: Initializer | None = None
    needs_data: bool = False
    low_rank: bool = True
    keeps_output: bool = True  # attach with the default init leaves the model's output unchanged
    set_rank: Callable[[nn.Module, int], None] | None = None  # serve at rank b (methods trained for all ranks)
    base_offsets: Literal["none", "every-layer", "merged-rounds"] = "none"

    @property
    def moves_base(self) -> bool:
        """The init rewrites W0 (its offset factors are saved with the adapter)."""
        return self.base_offsets == "every-layer"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    if method.config_class.method != method.name:
        raise ValueError(f"{method.config_class.__name__}.method must be {method.name!r}")
    _REGISTRY[method.name] = method
    return method


def methods() -> dict[str, Method]:
    """The registry, name -> `Method`, in registration order."""
    from .. import methods as _load_all  # noqa: F401  (importing registers every method)
    return dict(_REGISTRY)


def get_method(name: str) -> Method:
    registry = methods()
    if name not in registry:
        raise UnknownMethodError(f"unknown method {name!r}; available: {', '.join(registry)}")
    return registry[name]
