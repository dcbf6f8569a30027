"""``TrainConfig.compile`` / ``lorakit train --compile``: the training forward under `torch.compile`.

The trainer compiles the module that the step's forward runs through: the decoder (``model.base_model``) when
`lorakit.core.loss.model_loss` takes its supervised-positions path (the output head then runs on a data-dependent
number of positions, eager), else the whole model.  Its ``forward`` is compiled once and routed through only
during the training forward (`CompiledForward.active`), so evaluation and generation between steps run eagerly and
the model leaves `train` exactly as it came.  The step's backward runs the compiled graph's backward (AOT autograd).

Every adapter layer compiles without a graph break but Flat-LoRA's (``tests/test_compile.py`` counts them).
Refused: methods whose hooks change the traced structure every step (`COMPILE_REFUSED`), where each step would
recompile until torch gives up and falls back to eager.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..core.loss import supports_fast_loss
from ..errors import ConfigError

# method -> why `torch.compile` cannot train it (the trainer refuses ``compile=True`` with this reason).
COMPILE_REFUSED: dict[str, str] = {
    "dylora": "DyLoRA samples a new rank b every step and slices its factors to it, so every distinct b is a new "
              "graph (up to r recompiles of the whole model)",
    "flat-lora": "Flat-LoRA draws its weight noise from a torch.Generator seeded anew every noise window inside a "
                 "custom autograd function: each new seed is a recompile, and the generator a graph break",
}
BACKENDS = ("inductor", "aot_eager", "eager")


def check_compile(method: str | None, compile: bool | str, device: torch.device | None = None) -> str | None:
    """The `torch.compile` backend that ``compile`` asks for (``True``: inductor; a name in `BACKENDS`), or ``None``;
    raises `ConfigError` for an unknown backend, a method in `COMPILE_REFUSED`, or inductor on a CPU ``device``
    without the C++ compiler it builds its kernels with."""
    if compile is False:
        return None
    backend = "inductor" if compile is True else compile
    if backend not in BACKENDS:
        raise ConfigError(f"compile must be True, False or a torch.compile backend in {BACKENDS}, got {compile!r}")
    if method in COMPILE_REFUSED:
        raise ConfigError(f"compile=True cannot train {method}: {COMPILE_REFUSED[method]}; train it without compile")
    if backend == "inductor" and device is not None and device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler  # inductor's own compiler search (CXX, g++, ...)
        try:
            get_cpp_compiler()
        except Exception as err:  # torch raises several kinds for "no compiler"
            raise ConfigError(f"compile=True on CPU needs a C++ compiler for inductor's kernels ({err}); install "
                              "g++ (or set CXX), or train without compile") from None
    return backend


class CompiledForward:
    """``model``'s training forward compiled with ``backend`` (see the module docstring for which module)."""

    def __init__(self, model: nn.Module, backend: str) -> None:
        self.module = model.base_model if supports_fast_loss(model) else model
        self.forward = torch.compile(self.module.forward, backend=backend)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Inside the block the module's forward is the compiled one (an instance attribute, removed after)."""
        self.module.forward = self.forward
        try:
            yield
        finally:
            del self.module.forward
