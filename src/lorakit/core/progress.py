"""Progress bars for the phases that can take minutes on a busy machine: evaluation, data-driven inits (the
gradient passes and the per-layer factorisations), attach of a W0-moving init, export and merge.

The library stays quiet by default (it logs, as the design notes ask); the ``lorakit`` command switches the bars
on (`enable`).  Bars go to stderr through tqdm (a dependency of transformers), so stdout keeps only results.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_ENABLED = False


def enable(on: bool = True) -> None:
    """Show progress bars (``on``) or not; the ``lorakit`` command switches them on."""
    global _ENABLED
    _ENABLED = on


@contextlib.contextmanager
def enabled(on: bool = True) -> Iterator[None]:
    """Bars on (or off) inside the block only."""
    previous = _ENABLED
    enable(on)
    try:
        yield
    finally:
        enable(previous)


def track(items: Iterable[T], total: int | None, desc: str) -> Iterable[T]:
    """``items``, with a progress bar named ``desc`` on stderr while bars are on (else ``items`` unchanged)."""
    if not _ENABLED:
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:  # transformers depends on tqdm, so only a stripped environment lacks it
        return items
    return tqdm(items, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=False, disable=False)
