"""Target matching ("all-linear", name suffixes, regex), module replacement and restoration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import regex
import torch
from torch import nn

from ..errors import TargetError
from .layer import SUPPORTED_BASES

# Output heads that "all-linear" leaves alone (as PEFT does): they are trained in full through
# `modules_to_save` when a task needs them.
HEAD_NAMES = frozenset({"lm_head", "classifier", "score", "qa_outputs", "embed_out", "output"})
# A target_modules regex may come from a hostile adapter file: it is matched with the `regex` module's
# timeout, against every module name within one time budget, so catastrophic backtracking cannot hang `load`.
# Counted repeats are expanded when compiled (``a{10000000}`` takes seconds): the product of their bounds is capped.
MAX_PATTERN_LENGTH = 1000
PEFT_PREFIX = "base_model.model."  # PEFT's name for the wrapped model in its tensor names
MAX_REPEAT_PRODUCT = 10_000
MATCH_BUDGET_S = 1.0
_COUNTED_REPEAT = regex.compile(r"\{(\d*)(?:,(\d*))?\}")


def _suffix_match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BASES)]


def _packed_linear(module: nn.Module) -> bool:
    """A GPTQ/AWQ-style quantized linear (packed ``qweight``, not an ``nn.Linear``) that lorakit cannot wrap."""
    return not isinstance(module, SUPPORTED_BASES) and isinstance(getattr(module, "qweight", None), torch.Tensor)


def _hint(model: nn.Module) -> str:
    names = _linear_names(model)
    shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    return f"linear layers in this model: {shown or 'none'}"


def find_targets(model: nn.Module, target_modules: str | Iterable[str],
                 exclude: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs to wrap.

    ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the output embedding and heads.
    A list: modules whose name equals an entry or ends with ``"." + entry``.
    Any other string: a regular expression that must match the whole module name.
    """
    excluded = set(exclude)
    if isinstance(target_modules, str) and target_modules == "all-linear":
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        found = [(n, m) for n, m in model.named_modules()
                 if isinstance(m, SUPPORTED_BASES) and m is not head
                 and n.rsplit(".", 1)[-1] not in HEAD_NAMES]
        packed = [n for n, m in model.named_modules() if _packed_linear(m) and not any(
            _suffix_match(n, e) for e in excluded)]
        if packed:
            raise TargetError(f"'all-linear' would skip {len(packed)} packed quantized layers (e.g. "
                              f"'{packed[0]}', a {type(model.get_submodule(packed[0])).__name__}): lorakit adapts "
                              "nn.Linear bases, bitsandbytes 4/8-bit and torchao weight-only ones, not GPTQ/AWQ "
                              "kernels; load the model unquantized or with --quantize nf4|int8")
    else:
        if isinstance(target_modules, str):
            matches = regex_matcher(target_modules)
        else:
            suffixes = list(target_modules)

            def matches(n: str) -> bool:
                return any(_suffix_match(n, s) for s in suffixes)
        found = []
        for n, m in model.named_modules():
            if not n or not matches(n):
                continue
            if not isinstance(m, SUPPORTED_BASES):
                if any(True for _ in m.children()):
                    continue  # a container whose name matches (e.g. "...attention"); its children may match
                raise TargetError(
                    f"module '{n}' matches target_modules but is a {type(m).__name__}; lorakit wraps "
                    f"nn.Linear and transformers' Conv1D. Narrow target_modules; {_hint(model)}")
            found.append((n, m))
    found = [(n, m) for n, m in found if not any(_suffix_match(n, e) for e in excluded)]
    if not found:
        raise TargetError(f"target_modules={target_modules!r} matched no module; {_hint(model)}")
    return found


def compile_regex(pattern: str, what: str = "target_modules") -> regex.Pattern[str]:
    """``pattern`` compiled, once its length and counted repeats are within bounds; ``what`` names it in errors."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise TargetError(f"{what} regex is {len(pattern)} characters long; at most "
                          f"{MAX_PATTERN_LENGTH} are accepted: {pattern[:60]!r}...")
    product = 1
    for low, high in _COUNTED_REPEAT.findall(pattern):
        product *= max(int(low or 0), int(high or 0), 1)
    if product > MAX_REPEAT_PRODUCT:
        raise TargetError(f"{what} regex {pattern!r:.120} has counted repeats ({{n}}) whose bounds multiply "
                          f"to {product}; at most {MAX_REPEAT_PRODUCT} are accepted")
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError, ValueError) as err:
        raise TargetError(f"{what} {pattern!r} is not a valid regular expression: {err}") from err


def regex_matcher(pattern: str | regex.Pattern[str], budget_s: float = MATCH_BUDGET_S) -> Callable[[str], bool]:
    """``name -> bool``: ``pattern`` (a string, or one `compile_regex` already compiled) must match the whole
    name; all calls together may take ``budget_s``."""
    compiled = compile_regex(pattern) if isinstance(pattern, str) else pattern
    deadline = time.monotonic() + budget_s

    def matches(name: str) -> bool:
        try:
            return compiled.fullmatch(name, timeout=max(deadline - time.monotonic(), 1e-3)) is not None
        except TimeoutError as err:
            raise TargetError(f"target_modules regex {compiled.pattern!r:.120} took over {budget_s} s to match the "
                              "module names (catastrophic backtracking); simplify it or list the module "
                              "names instead") from err
    return matches


def target_names(model: nn.Module, adapted: list[str]) -> list[str]:
    """Short names (``q_proj``) where they select exactly the adapted layers, else full names (PEFT's
    ``target_modules`` of an exported adapter)."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = [n for n, _ in model.named_modules() if n and n.rsplit(".", 1)[-1] in short]
    return short if sorted(selected) == sorted(adapted) else sorted(adapted)


def get_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_parent(model, name)
    setattr(parent, child, new)


def find_modules_to_save(model: nn.Module, names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Modules trained in full and saved with the adapter (e.g. a classifier head)."""
    found = []
    for wanted in names:
        hits = [(n, m) for n, m in model.named_modules() if n and _suffix_match(n, wanted)]
        if not hits:
            some = [n for n, _ in model.named_children()]
            raise TargetError(f"modules_to_save entry {wanted!r} matched no module; "
                              f"top-level modules: {', '.join(some)}")
        found.extend(hits)
    return found
