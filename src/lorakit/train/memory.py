"""Memory in `lorakit.train.trainer.train`: activation checkpointing of transformers models
(`enable_gradient_checkpointing`) and the peak that a run reports (`peak_memory_mib`)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable

import torch
from torch import nn

from ..errors import ConfigError


def enable_gradient_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Turn on transformers' activation checkpointing of ``model`` (non-reentrant, RNG state preserved, so dropout
    draws the same masks in the recomputation); returns the function that restores the previous setting."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5; older: gradient_...
    supported = getattr(model, "supports_gradient_checkpointing", False)
    if not (supported and hasattr(model, "gradient_checkpointing_enable")):
        raise ConfigError(f"gradient_checkpointing=True needs a transformers model that supports it; "
                          f"{type(model).__name__} does not (checkpoint its blocks in its own forward instead)")
    was_on = (model.is_activation_checkpointing if enable is not None else model.is_gradient_checkpointing)
    had_input_hooks = bool(getattr(model, "_require_grads_hooks", None) or hasattr(model, "_require_grads_hook"))
    kwargs = {"use_reentrant": False}
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def restore() -> None:
        if was_on:
            return
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()
        if not had_input_hooks:
            model.disable_input_require_grads()

    return restore


def peak_memory_mib(device: torch.device) -> float:
    """Peak allocated GPU memory on ``device`` (CUDA), else the process's peak resident set size, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10
