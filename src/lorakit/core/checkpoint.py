"""Atomic checkpoint directories, shared by the lorakit trainer and the federated server.

`write_atomically` writes a checkpoint into a sibling ``.<name>-tmp`` directory, flushes it to disk, then swaps it
in with two renames (the previous checkpoint goes to ``.<name>-old`` in between, and is removed last), so a crash
at any point leaves one complete checkpoint: `find_latest` returns it (``<name>``, or ``.<name>-old`` when the crash
came between the two renames).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def fsync_tree(directory: Path, files: bool = True) -> None:
    """Flush ``directory``'s files (with ``files``) and the directory entry itself to disk."""
    if files:
        for path in directory.rglob("*"):
            if path.is_file():
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(out: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh sibling directory, flush it, and swap it in as ``out/name``.

    If ``write`` raises, the sibling is removed and the previous checkpoint stays untouched (the error propagates).
    """
    final, tmp, old = out / name, out / f".{name}-tmp", out / f".{name}-old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_tree(out, files=False)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_latest(out: Path, name: str, marker: str) -> Path | None:
    """The last complete checkpoint ``out/name`` (one holding ``marker``), else ``.<name>-old``, else None."""
    for candidate in (out / name, out / f".{name}-old"):
        if (candidate / marker).is_file():
            return candidate
    return None
