"""Atomic file writes: a file the package writes is either its old self or complete.

Every writer in napari-zoomin (checkpoints, results, GeoJSON, pyramids, the batch
CSV, fetched data) writes into a hidden sibling of the target,
``.<name>.<pid>-<token>.partial``, syncs it to disk and moves it onto the target
with ``os.replace``, which is atomic within a folder.  An interrupted or failed
write leaves the previous target untouched and no partial file behind; concurrent
writers of the same target each use their own partial file, and the last rename
wins with a complete file.

The partial file is created with ``os.open(..., 0o666)``, so the operating system
applies the user's umask exactly as ``open(path, "w")`` does for a new file
(``tempfile.mkstemp`` would give ``0o600``).  The umask is never read or changed
here: ``os.umask`` is process-wide and not thread-safe.

Standard library only; no napari, no Qt.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

PARTIAL_SUFFIX = ".partial"

_BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation on the raw fd


def partial_path(target: str | os.PathLike) -> Path:
    """A hidden sibling of ``target`` unique to this process and call (pid + random token)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def _create_partial(target: Path) -> Path:
    """Create (exclusively) an empty partial file for ``target``, mode ``0o666 & ~umask``."""
    for _ in range(100):
        tmp = partial_path(target)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666)
        except FileExistsError:  # another writer drew the same token: draw again
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a unique temporary file beside {target}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR | _BINARY)  # Windows' fsync needs a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable where the OS lets a folder be synced (POSIX)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename has happened
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a path to write ``target``'s new content to; it becomes ``target`` on success.

    For writers that take a path (tifffile, safetensors).  The yielded file already
    exists (empty, mode ``0o666 & ~umask``); write it, truncate it or replace it.  On
    leaving the block without an error the file is synced and moved onto ``target``
    (and the folder synced); on an error (including ``KeyboardInterrupt``) it is
    removed and ``target`` is left as it was.  The folder must exist.
    """
    target = Path(target)
    tmp = _create_partial(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """``open(target, mode, **kwargs)`` for writing, atomically (see :func:`atomic_path`).

    ``mode`` is ``"w"`` or ``"wb"`` (optionally with ``"+"``); ``kwargs`` go to
    :func:`open` (``encoding``, ``newline``).  ``target`` changes only when the block
    ends without an error.
    """
    if "w" not in mode or any(c in mode for c in "axr"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', not {mode!r}")
    with atomic_path(target) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh


def write_bytes_atomic(target: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically; return ``target`` as a :class:`Path`."""
    with atomic_open(target, "wb") as fh:
        fh.write(data)
    return Path(target)


def write_text_atomic(
    target: str | os.PathLike, text: str, *, encoding: str = "utf-8", newline: str | None = None
) -> Path:
    """Write ``text`` to ``target`` atomically (UTF-8 by default); return it as a :class:`Path`."""
    with atomic_open(target, "w", encoding=encoding, newline=newline) as fh:
        fh.write(text)
    return Path(target)
