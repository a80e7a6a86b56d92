"""Host paths under configured roots, resolved without ever leaving them.

Used for host mounts (``ContainerSpec.mounts``) and host-directory browsing. A path is
accepted only if it lies under one of the roots *after* every symlink on it has been
resolved, and the resolution itself never trusts the path string: it walks one component
at a time with ``openat(O_PATH | O_NOFOLLOW)`` from a descriptor of the root, reads each
symlink it meets (``readlinkat``) and follows it only while the target stays inside the
same root (``..`` pops the walk's own stack, so it can never climb above the root, and a
directory renamed mid-walk does not matter: the walk holds descriptors, not names). The
answer is a descriptor of the object found plus its canonical path (no symlink left in
it). Host control paths (the Docker socket, ``/run``, ``/proc``, ``/sys``, ``/dev``,
``/etc``, the daemon's data directory, ...) are refused when the canonical path is one of
them, inside one, or contains one, whatever the roots say; so are sockets, devices and
FIFOs.

Stdlib only: the local runtime's shim may import it.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from berthd.runtime.base import HostPathNotFound, InvalidPath, PathForbidden

__all__ = ["CONTROL_PATHS", "HostEntry", "HostJail", "Resolved"]

CONTROL_PATHS: tuple[str, ...] = (
    "/var/run/docker.sock",
    "/run",
    "/var/run",
    "/proc",
    "/sys",
    "/dev",
    "/etc",
    "/boot",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/berthd",
)
"""Never mountable or browsable, even under a root (nor anything inside or above them)."""

_MAX_HOPS = 40  # symlinks followed in one resolution, as the kernel's own limit
_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def _within(path: str, base: str) -> bool:
    """``path`` is ``base`` or below it (both canonical, absolute)."""
    return path == base or base == "/" or path.startswith(base.rstrip("/") + "/")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A host path found under a root: its canonical path, root and file type."""

    path: str
    root: str
    is_dir: bool


@dataclass(frozen=True, slots=True)
class HostEntry:
    name: str
    path: str
    type: str  # directory | file | symlink | other
    size: int
    modified: float  # seconds since the epoch


class HostJail:
    """Resolves host paths under ``roots`` (canonicalised once here: the roots are trusted
    configuration), never into ``forbidden`` (``CONTROL_PATHS`` plus what the daemon adds:
    its data and sandbox directories)."""

    def __init__(self, roots: Iterable[str], forbidden: Iterable[str] = ()) -> None:
        self.roots: tuple[str, ...] = tuple(
            dict.fromkeys(os.path.realpath(r) for r in roots if r)
        )
        blocked: set[str] = set()
        for path in (*CONTROL_PATHS, *forbidden):
            if path:
                blocked.add(os.path.normpath(path))
                blocked.add(os.path.realpath(path))
        self.forbidden: tuple[str, ...] = tuple(sorted(blocked))

    # ------------------------------------------------------------------ resolution

    def _root_for(self, parts: Sequence[str]) -> tuple[str, int]:
        best: tuple[str, int] | None = None
        for root in self.roots:
            root_parts = _parts(root)
            if list(parts[: len(root_parts)]) == root_parts and (
                best is None or len(root_parts) > best[1]
            ):
                best = (root, len(root_parts))
        if best is None:
            raise PathForbidden(
                "path is outside the configured host roots"
                + (f" ({', '.join(self.roots)})" if self.roots else " (none are configured)")
            )
        return best

    def _refuse_control(self, candidate: str, path: str) -> None:
        for blocked in self.forbidden:
            if _within(candidate, blocked):
                raise PathForbidden(
                    f"host path {path!r} is a host control path or inside one ({blocked}); "
                    "it can never be mounted or browsed"
                )

    @contextlib.contextmanager
    def open(self, path: str, *, containing_ok: bool = False) -> Iterator[tuple[int, Resolved]]:
        """An ``O_PATH`` descriptor of ``path`` (closed on exit) and what it resolved to.
        ``containing_ok``: a directory that merely contains a control path is fine (a
        listing, which never names the control path itself; never for a mount).

        ``InvalidPath`` (not absolute, NUL, too long), ``PathForbidden`` (outside the
        roots, a symlink leaving its root, a control path, a socket or device),
        ``HostPathNotFound`` (a component does not exist or is not a directory)."""
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 4096:
            raise InvalidPath(f"host path must be an absolute path: {path!r}")
        parts = _parts(path)
        self._refuse_control(os.path.normpath(path), path)  # even if it does not exist
        root, skip = self._root_for(parts)
        root_parts = _parts(root)
        try:
            stack = [os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
        except OSError as exc:
            raise HostPathNotFound(f"host root {root} is not usable: {exc.strerror}") from None
        names: list[str] = []
        try:
            pending = list(reversed(parts[skip:]))
            hops = 0
            while pending:
                name = pending.pop()
                if name in ("", "."):
                    continue
                if name == "..":
                    if not names:
                        raise PathForbidden(f"{path!r} climbs above its root {root}")
                    os.close(stack.pop())
                    names.pop()
                    continue
                try:
                    fd = os.open(name, _PATH_FLAGS, dir_fd=stack[-1])
                except FileNotFoundError:
                    raise HostPathNotFound(f"host path {path!r} does not exist") from None
                except NotADirectoryError:
                    raise HostPathNotFound(f"host path {path!r}: a component is not a directory") from None
                except PermissionError:
                    raise PathForbidden(f"host path {path!r}: permission denied") from None
                except OSError as exc:
                    raise InvalidPath(f"host path {path!r}: {exc.strerror}") from None
                mode = os.fstat(fd).st_mode
                if stat.S_ISLNK(mode):
                    try:
                        target = os.readlink(name, dir_fd=stack[-1])
                    except OSError as exc:
                        raise HostPathNotFound(f"host path {path!r}: {exc.strerror}") from None
                    finally:
                        os.close(fd)
                    hops += 1
                    if hops > _MAX_HOPS:
                        raise PathForbidden(f"host path {path!r}: too many levels of symbolic links")
                    target_parts = target.split("/")
                    if target.startswith("/"):
                        absolute = _parts(target)
                        if absolute[: len(root_parts)] != root_parts:
                            raise PathForbidden(
                                f"host path {path!r}: a symlink points outside its root {root}"
                            )
                        while len(stack) > 1:
                            os.close(stack.pop())
                        names.clear()
                        target_parts = absolute[len(root_parts) :]
                    pending.extend(reversed(target_parts))
                    continue
                if pending and not stat.S_ISDIR(mode):
                    os.close(fd)
                    raise HostPathNotFound(f"host path {path!r}: a component is not a directory")
                stack.append(fd)
                names.append(name)
                self._refuse_control("/".join([root.rstrip("/"), *names]), path)
            canonical = "/".join([root.rstrip("/"), *names]) if names else root
            for blocked in self.forbidden:
                if _within(canonical, blocked) or (not containing_ok and _within(blocked, canonical)):
                    raise PathForbidden(
                        f"host path {path!r} is or contains a host control path ({blocked}); "
                        "it can never be mounted or browsed"
                    )
            mode = os.fstat(stack[-1]).st_mode
            if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise PathForbidden(f"host path {path!r} is not a directory or a regular file")
            yield stack[-1], Resolved(canonical, root, stat.S_ISDIR(mode))
        finally:
            for fd in stack:
                os.close(fd)

    def open_fd(self, path: str) -> tuple[int, Resolved]:
        """``open`` keeping a (non-inheritable) ``O_PATH`` descriptor: the caller closes it."""
        with self.open(path) as (fd, resolved):
            return os.dup(fd), resolved

    def resolve(self, path: str) -> Resolved:
        """``open`` without keeping the descriptor: the canonical path, checked."""
        with self.open(path) as (_fd, resolved):
            return resolved

    # ------------------------------------------------------------------ browsing

    def list_directory(self, path: str | None, limit: int = 10000) -> tuple[Resolved, list[HostEntry], bool]:
        """The entries of a directory under a root (the first root when ``path`` is None),
        read through the resolved descriptor; ``True`` when cut at ``limit``."""
        if path is None:
            if not self.roots:
                raise PathForbidden("no host roots are configured")
            path = self.roots[0]
        with self.open(path, containing_ok=True) as (fd, resolved):
            if not resolved.is_dir:
                raise InvalidPath(f"host path {path!r} is not a directory")
            try:
                dir_fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except PermissionError:
                raise PathForbidden(f"host path {path!r}: permission denied") from None
            except OSError as exc:
                raise InvalidPath(f"host path {path!r}: {exc.strerror}") from None
            entries: list[HostEntry] = []
            truncated = False
            try:
                with os.scandir(dir_fd) as it:
                    for entry in it:
                        if len(entries) >= limit:
                            truncated = True
                            break
                        try:
                            info = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue  # vanished meanwhile
                        full = resolved.path.rstrip("/") + "/" + entry.name
                        if stat.S_ISLNK(info.st_mode):
                            kind = "symlink"
                        elif stat.S_ISDIR(info.st_mode):
                            kind = "directory"
                        elif stat.S_ISREG(info.st_mode):
                            kind = "file"
                        else:
                            kind = "other"
                        if any(_within(full, b) for b in self.forbidden):
                            continue  # a control path is not even named
                        entries.append(HostEntry(entry.name, full, kind, info.st_size, info.st_mtime))
            finally:
                os.close(dir_fd)
        entries.sort(key=lambda e: e.name)
        return resolved, entries, truncated
