"""Reading and writing files inside a container's private directories without ever
following a symlink out of them.

The sandboxed process owns those directories and can plant symlinks (``ln -s /etc
/workspace/x``) while the daemon, running as root, writes or reads on its behalf. So
paths are resolved one component at a time with ``O_NOFOLLOW`` relative to a directory
file descriptor, ``..`` is refused outright, and the final file is opened with
``O_NOFOLLOW`` too (and must be a regular file). A symlink anywhere on the path is a
``PathForbidden`` (403), never a hop; a missing file or parent is ``FileNotFound`` (404);
a path that is relative, has ``..``, names a directory or leaves the reachable roots is
``InvalidPath`` (400). A read may be capped (``max_bytes``): a bigger file is
``FileTooLarge`` (413), told by its size before any of it is read, and never more than
``max_bytes + 1`` bytes are held (a file growing while it is read is caught too).
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Mapping

from berthd.runtime.base import (
    FileNotFound,
    FileTooLarge,
    InvalidPath,
    PathForbidden,
    RuntimeFailure,
)

__all__ = ["is_dir", "read_file", "split_container_path", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_container_path(path: str, roots: Mapping[str, str]) -> tuple[str, list[str]]:
    """Map an absolute container path to (host directory, components below it).

    ``roots`` maps a top-level container directory ("workspace", "tmp") to the host
    directory that backs it; anything outside them is refused."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise InvalidPath(f"file path must be absolute: {path!r}", field="path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidPath(f"file path must not contain '..': {path!r}", field="path")
    if not parts or parts[0] not in roots:
        allowed = ", ".join(f"/{r}" for r in roots)
        raise InvalidPath(f"this runtime only reaches files under {allowed}: {path!r}", field="path")
    if len(parts) == 1:
        raise InvalidPath(f"{path!r} is a directory", field="path")
    return roots[parts[0]], parts[1:]


def _open_parent(base: str, parts: list[str], path: str) -> int:
    """A file descriptor of the directory holding the last component (caller closes)."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _path_error(exc, path, _is_link(name, fd)) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _is_link(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _path_error(exc: OSError, path: str, link: bool = False) -> RuntimeFailure:
    if exc.errno in (errno.ELOOP, errno.EMLINK) or link:
        return PathForbidden(f"{path!r}: a path component is a symlink (never followed)", field="path")
    if exc.errno == errno.ENOTDIR:
        return FileNotFound(f"{path!r}: a path component is not a directory", field="path")
    if exc.errno == errno.ENOENT:
        return FileNotFound(f"{path!r}: no such file or directory", field="path")
    if exc.errno == errno.EISDIR:
        return InvalidPath(f"{path!r} is a directory", field="path")
    if exc.errno == errno.ENAMETOOLONG:
        return InvalidPath(f"{path!r}: a name is too long", field="path")
    return RuntimeFailure(f"{path!r}: {exc.strerror}")


def is_dir(base: str, parts: list[str]) -> bool:
    """Whether ``parts`` under ``base`` is a directory, reached without a symlink."""
    try:
        fd = _open_parent(base, [*parts, "."], "/".join(parts))
    except RuntimeFailure:
        return False
    os.close(fd)
    return True


def write_file(
    base: str, parts: list[str], data: bytes, path: str, owner: tuple[int, int] | None = None
) -> None:
    """Atomically replace ``parts`` under ``base`` with ``data`` (parent must exist).

    Written to a temporary name and renamed over the target: rename replaces a planted
    symlink itself instead of writing through it."""
    dir_fd = _open_parent(base, parts, path)
    name = parts[-1]
    tmp = f".{name}.berth-{uuid.uuid4().hex[:8]}"
    try:
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o644,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise _path_error(exc, path) from None
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None:
                os.fchown(fd, *owner)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            os.unlink(tmp, dir_fd=dir_fd)
            raise _path_error(exc, path) from None
    finally:
        os.close(dir_fd)


def read_file(base: str, parts: list[str], path: str, max_bytes: int | None = None) -> bytes:
    """The bytes of regular file ``parts`` under ``base`` (no symlink, FIFO or device);
    ``FileTooLarge`` beyond ``max_bytes`` (None: no cap)."""
    dir_fd = _open_parent(base, parts, path)
    try:
        try:
            # O_NONBLOCK: opening a FIFO planted by the sandbox must not hang the daemon.
            fd = os.open(
                parts[-1],
                os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                dir_fd=dir_fd,
            )
        except OSError as exc:
            raise _path_error(exc, path) from None
    finally:
        os.close(dir_fd)
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise InvalidPath(f"{path!r} is a directory", field="path")
        if not stat.S_ISREG(info.st_mode):
            raise InvalidPath(f"{path!r} is not a regular file", field="path")
        if max_bytes is not None and info.st_size > max_bytes:
            raise _too_large(path, info.st_size, max_bytes)
        os.set_blocking(fd, True)
        budget = None if max_bytes is None else max_bytes + 1  # +1: growth past the cap shows
        chunks: list[bytes] = []
        got = 0
        while budget is None or got < budget:
            chunk = os.read(fd, 1 << 20 if budget is None else min(1 << 20, budget - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        if max_bytes is not None and got > max_bytes:
            raise _too_large(path, max(got, os.fstat(fd).st_size), max_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_large(path: str, size: int, limit: int) -> FileTooLarge:
    return FileTooLarge(
        f"{path!r} is {size} bytes; downloads are limited to {limit} bytes", size=size, limit=limit
    )
