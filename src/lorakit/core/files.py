"""Files that lorakit writes and reads back: atomic writes that never follow a planted symlink, reads of regular files
only (a FIFO must not block), checksums, and the lock that gives an output directory to one run at a time.

Every writer in lorakit goes through `atomic_write` (one file) or `write_files` (a set of files that must match, such
as an adapter's weights and config): the data goes to a fresh temporary file (or directory) beside the target, is
flushed to disk, then ``os.replace`` puts it in place.  ``os.replace`` replaces a symlink at the target instead of
writing through it, so a link planted in an output directory cannot redirect a write elsewhere.  Written files get the
mode a plain ``open(path, "w")`` would give (0666 less the umask), not the temporary file's 0600.

This module imports nothing of lorakit but `lorakit.errors`, so that every layer may use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import LorakitError, OutputError

LOCK_NAME = ".lorakit.lock"
_held: dict[tuple[int, str], int] = {}  # (thread, directory) -> depth: `locked_dir` is re-entrant per thread
_held_guard = threading.Lock()


def _umask() -> int:
    mask = os.umask(0o22)  # the only way to read it: set, then put back
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: 0666 less the process umask."""
    return 0o666 & ~_umask()


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def check_writable_target(path: Path) -> None:
    """Refuse an output path that holds a directory, FIFO, socket or device (writing there would fail or hang).
    A regular file or a symlink is fine: `atomic_write` replaces it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise OutputError(f"cannot write {path} ({err.strerror or err})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        raise OutputError(f"cannot write {path}: it is {_kind(mode)}, not a regular file; remove it or choose another "
                          "output path")


def write_error(path: Path, err: OSError) -> OutputError:
    """One clear error for a failed write, saying what to do."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "the disk (or quota) is full: free disk space and retry"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        advice = f"{path.parent} is not writable: fix its permissions or choose another output path"
    else:
        advice = "check the path and retry"
    return OutputError(f"could not write {path} ({err.strerror or err}); {advice}")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a directory entry) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], mode: int | None = None) -> Path:
    """Call ``write(tmp)`` on a fresh temporary file beside ``path``, flush it, and replace ``path`` with it.

    A symlink at ``path`` is replaced, never followed; a directory, FIFO or device there is refused; the file gets
    ``mode`` (default: the umask's, as a plain write).  Any failure (an `OutputError` for a disk or permission error)
    leaves ``path`` as it was."""
    path = Path(path)
    check_writable_target(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        os.fchmod(fd, file_mode() if mode is None else mode)
        os.close(fd)
        write(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError):
            raise write_error(path, err) from None
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """`atomic_write` of ``data`` (``mode``: e.g. 0o600 for a private key, which the temporary file has already)."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode)


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append ``text`` to the log file ``path`` (created with the umask's mode), never through a symlink and never
    blocking on a FIFO: either is an `OutputError`."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     file_mode())
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(f"cannot append to {path}: it is a symlink; remove it") from None
        raise write_error(Path(path), err) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OutputError(f"cannot append to {path}: it is {_kind(mode)}, not a regular file; remove it")
        os.write(fd, text.encode())
    except OSError as err:
        raise write_error(Path(path), err) from None
    finally:
        os.close(fd)


def write_files(out: str | os.PathLike, write: Callable[[Path], None], last: str) -> Path:
    """Write a set of files that belong together (an adapter's weights and config) into ``out``, all or nothing.

    ``write(tmp)`` fills a fresh temporary directory beside ``out``.  A new ``out`` is that directory renamed (one
    atomic step).  Into an existing ``out``, the marker file ``last`` (the one that makes the set loadable, such as
    the config) is removed first, the other files are moved in, and ``last`` is moved in at the end: a crash in
    between leaves no loadable mix of old and new files.  Each move is an ``os.replace`` (symlinks replaced, never
    followed); a directory or FIFO in the place of an output file is refused before anything changes."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write into {out}: it is a file, not a directory; choose another output path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    except OSError as err:
        raise write_error(out, err) from None
    try:
        write(tmp)
        names = sorted(p.name for p in tmp.iterdir())
        for name in names:
            if (tmp / name).is_file():  # HF's writers, safetensors: 0600 or 0644 whatever the umask; a plain write's
                os.chmod(tmp / name, file_mode())
            fsync_path(tmp / name)
        if out.is_dir() and not out.is_symlink() and not any(out.iterdir()) and out != Path.cwd():
            out.rmdir()  # an empty directory (made by a check of the output path): replace it in one rename
        if not out.exists():
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 -> what mkdir would give
            fsync_path(tmp)
            os.replace(tmp, out)
            fsync_path(out.parent)
            return out
        for name in names:
            check_writable_target(out / name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out / last)
        for name in sorted(names, key=lambda n: n == last):
            os.replace(tmp / name, out / name)
        fsync_path(out)
    except OSError as err:
        raise write_error(out, err) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_regular(path: str | os.PathLike, follow_symlinks: bool = True, limit: int | None = None) -> bytes:
    """The bytes of the regular file ``path``; a FIFO, device or directory (and, without ``follow_symlinks``, a
    symlink) is a `LorakitError` at once, never a blocked read.  ``limit``: refuse a larger file."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LorakitError(f"{path} is a symlink; expected a regular file") from None
        raise LorakitError(f"cannot read {path} ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LorakitError(f"{path} is {_kind(info.st_mode)}; expected a regular file")
        if limit is not None and info.st_size > limit:
            raise LorakitError(f"{path} is {info.st_size} bytes, more than the {limit} expected")
        os.set_blocking(fd, True)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError as err:
        raise LorakitError(f"cannot read {path} ({err.strerror or err})") from None
    finally:
        os.close(fd)


def read_json_object(path: str | os.PathLike, limit: int,
                     error: type[LorakitError] = LorakitError) -> dict[str, Any]:
    """The JSON object in the regular file ``path`` (`read_regular`, at most ``limit`` bytes).  A FIFO, a larger
    file, malformed or too deeply nested JSON, or a value that is not an object is one ``error`` naming the file."""
    try:
        raw = read_regular(path, limit=limit)
    except LorakitError as err:
        raise error(str(err)) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError; nesting too deep
        raise error(f"{path} is not valid JSON (or nests too deeply): {type(err).__name__}: {str(err)[:200]}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def sha256(data: bytes) -> str:
    """The hex SHA-256 of ``data`` (checkpoint manifests)."""
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def locked_dir(directory: str | os.PathLike) -> Iterator[None]:
    """Hold ``directory``'s advisory lock (``fcntl.flock`` on ``directory/.lorakit.lock``) for the block.

    One run per output directory: a second process (or thread) asking for it gets an `OutputError` at once naming
    the directory and the holder's pid.  The kernel drops the lock when the holder exits, however it exits, so a
    killed run never leaves the directory locked.  Re-entrant within a thread (`run_training` holds it around
    `train`, which takes it too)."""
    directory = Path(directory)
    key = (threading.get_ident(), os.path.realpath(directory))
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    fd = _acquire(directory)
    with _held_guard:
        _held[key] = 1
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        os.close(fd)


def _acquire(directory: Path) -> int:
    path = directory / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, file_mode())
    except OSError as err:
        reason = "it is a symlink" if err.errno == errno.ELOOP else (err.strerror or str(err))
        raise OutputError(f"cannot lock the output directory {directory} ({path}: {reason}); remove {path} or "
                          "choose another output directory") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OutputError(f"cannot lock the output directory {directory}: {path} is {_kind(mode)}; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise OutputError(f"the output directory {directory} is in use by another lorakit run (pid {holder}); "
                              "wait for it to finish or choose another output directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd
