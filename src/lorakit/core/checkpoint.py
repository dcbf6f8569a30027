"""Atomic checkpoint directories, shared by the lorakit trainer and the federated server.

`write_atomically` writes a checkpoint into a sibling ``.<name>-tmp`` directory, flushes it to disk, then swaps it
in with two renames (the previous checkpoint goes to ``.<name>-old`` in between, and is removed last), so a crash
at any point leaves one complete checkpoint: `find_latest` returns it (``<name>``, or ``.<name>-old`` when the crash
came between the two renames).  The trainer's ends with ``checksums.json`` (`write_manifest`: the SHA-256 and size
of every other file), so `read_verified` detects a torn copy or an edited file before anything in it is trusted.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import AdapterFileError, LorakitError, OutputError
from .files import file_mode, fsync_path, read_regular, sha256, write_text

MANIFEST = "checksums.json"
MANIFEST_LIMIT = 1 << 20  # bytes; a manifest lists a handful of files


def fsync_tree(directory: Path, files: bool = True) -> None:
    """Flush ``directory``'s files (with ``files``) and the directory entry itself to disk."""
    if files:
        for path in directory.rglob("*"):
            if path.is_file():
                fsync_path(path)
    fsync_path(directory)


def refuse_links(out: Path, name: str) -> None:
    """The checkpoint's three paths must not be symlinks: lorakit renames and deletes them, never through a link."""
    for path in (out / name, out / f".{name}-tmp", out / f".{name}-old"):
        if path.is_symlink():
            raise OutputError(f"{path} is a symlink; lorakit keeps its checkpoints in the output directory itself and "
                              f"does not follow links there: remove the link (or pass another output directory)")


def write_manifest(directory: Path) -> None:
    """Write ``directory/checksums.json`` (SHA-256 and size of every other file); call it last, at the end of
    `write_atomically`'s ``write``."""
    files = {}
    for path in sorted(directory.iterdir()):
        data = read_regular(path, follow_symlinks=False)
        files[path.name] = {"sha256": sha256(data), "bytes": len(data)}
    write_text(directory / MANIFEST, json.dumps({"files": files}, indent=1) + "\n")


def read_verified(directory: Path) -> dict[str, bytes]:
    """Every file of the checkpoint ``directory`` (regular files only), checked against its manifest: a missing,
    extra, truncated or edited file is an `AdapterFileError` naming it, before any byte is used."""
    advice = f"the checkpoint in {directory} is torn or was edited; delete it to start over"
    try:
        manifest = json.loads(read_regular(directory / MANIFEST, follow_symlinks=False, limit=MANIFEST_LIMIT))
    except (ValueError, RecursionError) as err:
        raise AdapterFileError(f"{directory / MANIFEST} is not valid JSON ({err}); {advice}") from None
    except LorakitError as err:  # missing (a checkpoint torn, or older than manifests), a FIFO, ...
        raise AdapterFileError(f"{err}; {advice}") from None
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(listed, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) and type(v.get("bytes")) is int
            for v in listed.values()):
        raise AdapterFileError(f"{directory / MANIFEST} is not a checksum manifest ({{'files': {{name: {{'sha256', "
                               f"'bytes'}}}}}}); {advice}")
    present = {p.name for p in directory.iterdir()} - {MANIFEST}
    if present != set(listed):
        extra, missing = sorted(present - set(listed)), sorted(set(listed) - present)
        raise AdapterFileError(f"{directory} does not hold the files its manifest lists (missing {missing}, "
                               f"unlisted {extra}); {advice}")
    contents = {}
    for name, entry in listed.items():
        data = read_regular(directory / name, follow_symlinks=False)
        if len(data) != entry["bytes"] or sha256(data) != entry["sha256"]:
            raise AdapterFileError(f"{directory / name} does not match its checksum in {MANIFEST} ({len(data)} "
                                   f"bytes, {entry['bytes']} listed); {advice}")
        contents[name] = data
    return contents


def write_atomically(out: Path, name: str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a fresh sibling directory, flush it, and swap it in as ``out/name``.

    If ``write`` raises, the sibling is removed and the previous checkpoint stays untouched (the error propagates).
    """
    refuse_links(out, name)
    final, tmp, old = out / name, out / f".{name}-tmp", out / f".{name}-old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for path in tmp.iterdir():  # safetensors writes 0600: give every file the umask's mode, as `open` would
            os.chmod(path, file_mode())
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
    refuse_links(out, name)
    for candidate in (out / name, out / f".{name}-old"):
        if (candidate / marker).is_file():
            return candidate
    return None
