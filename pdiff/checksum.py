"""sha256 checksums beside the files pdiff writes (a checkpoint's state.pt, EMA snapshots), checked
when they are read back, so a damaged file is named and refused instead of loaded.

The checksum of FILE is FILE.sha256, one line in sha256sum's format (``<hex>  <name>``), so
``sha256sum -c FILE.sha256`` checks it by hand as well. ``save_verified`` is the one writer: every
file that gets a checksum is written through it (snapshot writers included).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import UserError

SUFFIX = ".sha256"
_CHUNK = 1 << 22


class ChecksumError(UserError):
    """A file whose bytes do not match the checksum written with it."""


class WriteFailed(UserError):
    """A file that could not be written (a full disk, a file size limit, a read-only folder): the
    temporary file is gone, the previous file is untouched."""

    def __init__(self, message: str, path: Path, written: int):
        super().__init__(message)
        self.path, self.written = path, written


def os_error_behind(e: BaseException) -> OSError | None:
    """The OSError ``e`` is or was raised while handling (torch.save reports a failed write of its
    file object as "unexpected pos" RuntimeError, with the OSError as its context)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def sidecar(path: str | os.PathLike) -> Path:
    """Where the checksum of ``path`` lives: ``path`` + ".sha256"."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


class _HashingWriter:
    """A file object that hashes what passes through it, so the checksum costs no second read."""

    def __init__(self, f: BinaryIO):
        self.f, self.hash, self.written = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.hash.update(data)
        n = self.f.write(data)
        self.written += len(data)
        return n

    def flush(self) -> None:
        self.f.flush()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write: Callable[[BinaryIO], None]) -> str:
    """Write ``path`` with ``write(f)`` and flush it to disk; the sha256 of what was written.
    WriteFailed when the file system refuses the bytes (ENOSPC, EFBIG, EACCES, ...)."""
    w = None
    try:
        with open(path, "wb") as f:
            w = _HashingWriter(f)
            write(w)
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:
        cause = os_error_behind(e)
        if cause is None:
            raise
        written = w.written if w is not None else 0
        raise WriteFailed(f"cannot write {path}: {cause.strerror or cause} after {written / 2**20:.1f} MiB",
                          path, written) from None
    return w.hash.hexdigest()


def save_verified(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Write ``path`` atomically with its checksum beside it; returns the sha256.

    ``write(f)`` fills a temporary file in the same folder (hashed as it is written; ``f`` has
    ``write`` and ``flush``), which is flushed and renamed into place; then the checksum is written
    the same way. An older checksum of ``path`` is removed first, so a crash leaves the old file, or
    the new one without a checksum (read as unverified), never a file its checksum calls damaged."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp_sum = sidecar(tmp)
    try:
        digest = _write_durably(tmp, write)
        _write_durably(tmp_sum, lambda f: f.write(f"{digest}  {path.name}\n".encode()))
        sidecar(path).unlink(missing_ok=True)
        os.replace(tmp, path)
        os.replace(tmp_sum, sidecar(path))
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
        tmp_sum.unlink(missing_ok=True)
    return digest


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def recorded(path: str | os.PathLike) -> str | None:
    """The sha256 written for ``path``, or None when it has no checksum file."""
    try:
        text = sidecar(path).read_text()
    except FileNotFoundError:
        return None
    digest = text.split()[0].lower() if text.split() else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ChecksumError(f"{sidecar(path)}: not a sha256 checksum line; delete it to load {Path(path).name} "
                            f"unverified")
    return digest


def verify(path: str | os.PathLike) -> bool:
    """True when ``path`` matches its checksum; False when it has none (written by a pdiff before
    checksums, or a crash came between the file and its checksum). ChecksumError naming the file
    when the bytes differ from what was written."""
    want = recorded(path)
    if want is None:
        return False
    got = file_sha256(path)
    if got != want:
        raise ChecksumError(f"{path} is damaged: its sha256 is {got[:16]}... but {sidecar(path).name} "
                            f"recorded {want[:16]}... when it was written")
    return True
