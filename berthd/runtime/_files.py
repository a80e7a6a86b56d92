"""Reading and writing files inside a container's private directories without ever
following a symlink out of them.

The sandboxed process owns those directories and can plant symlinks (``ln -s /etc
/workspace/x``) while the daemon, running as root, writes or reads on its behalf. So
paths are resolved one component at a time with ``O_NOFOLLOW`` relative to a directory
file descriptor, ``..`` is refused outright, and the final file is opened with
``O_NOFOLLOW`` too (and must be a regular file). A symlink anywhere on the path is a
``RuntimeFailure``, never a hop.
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from collections.abc import Mapping

from berthd.runtime.base import RuntimeFailure

__all__ = ["read_file", "split_container_path", "write_file"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split_container_path(path: str, roots: Mapping[str, str]) -> tuple[str, list[str]]:
    """Map an absolute container path to (host directory, components below it).

    ``roots`` maps a top-level container directory ("workspace", "tmp") to the host
    directory that backs it; anything outside them is refused."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise RuntimeFailure(f"file path must be absolute: {path!r}")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise RuntimeFailure(f"file path must not contain '..': {path!r}")
    if not parts or parts[0] not in roots:
        allowed = ", ".join(f"/{r}" for r in roots)
        raise RuntimeFailure(f"this runtime only reaches files under {allowed}: {path!r}")
    if len(parts) == 1:
        raise RuntimeFailure(f"{path!r} is a directory")
    return roots[parts[0]], parts[1:]


def _open_parent(base: str, parts: list[str], path: str) -> int:
    """A file descriptor of the directory holding the last component (caller closes)."""
    fd = os.open(base, _DIR_FLAGS)
    try:
        for name in parts[:-1]:
            try:
                next_fd = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _path_error(exc, path) from None
            os.close(fd)
            fd = next_fd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _path_error(exc: OSError, path: str) -> RuntimeFailure:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
        return RuntimeFailure(f"{path!r}: a path component is a symlink or not a directory")
    if exc.errno == errno.ENOENT:
        return RuntimeFailure(f"{path!r}: no such file or directory")
    if exc.errno == errno.EISDIR:
        return RuntimeFailure(f"{path!r} is a directory")
    return RuntimeFailure(f"{path!r}: {exc.strerror}")


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


def read_file(base: str, parts: list[str], path: str) -> bytes:
    """The bytes of regular file ``parts`` under ``base`` (no symlink, FIFO or device)."""
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
            raise RuntimeFailure(f"{path!r} is a directory")
        if not stat.S_ISREG(info.st_mode):
            raise RuntimeFailure(f"{path!r} is not a regular file")
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
