"""Security profiles and the host-path policy every runtime applies when it creates a
sandbox.

A profile is the ceiling an administrator sets for a sandbox: capabilities are always
all dropped and no-new-privileges always set (no profile can grant either back); the
profile decides the network, the pids/memory/CPU limits, a read-only root and the size
of the private ``/tmp``. Limits asked for at create time can only tighten the profile's
(``SecurityProfile.limits``): a tenant cannot lift a ceiling by asking. Built in:
``default`` (no network, pids 256, 1 GiB memory and no swap, 1 CPU, read-only root,
``/tmp`` private and writable), ``networked`` (the same with a network) and
``restricted`` (no network, pids 64, 256 MiB, half a CPU). More come from the config
(``[profiles.NAME]``; a name may also redefine a built-in one).

How each runtime enforces them is in its module docstring and in ``Runtime.enforcement``
(served under ``/v1/info``); what is not enforced is in ``docs/security.md``.

Host paths: mounts are allowed only under ``mount_roots`` (none by default) and
host-directory browsing only under ``host_roots`` (default: the mount roots, else the
daemon user's home); both go through ``hostpath.HostJail``.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from berthd.runtime.base import (
    SANDBOX_BERTH_DIR,
    InvalidPath,
    Limits,
    Mount,
    MountForbidden,
    PathForbidden,
    UnknownProfile,
)
from berthd.runtime.hostpath import HostJail

if TYPE_CHECKING:
    from berthd.runtime.base import Runtime

__all__ = [
    "BUILTIN_PROFILES",
    "SecurityPolicy",
    "SecurityProfile",
    "configure_security",
]

PROFILE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
# Sandbox paths no mount may cover: the sandbox's own kernel interfaces and the shared dir.
_NO_MOUNT_TARGETS = ("/", "/proc", "/sys", "/dev", "/tmp", "/workspace")


@dataclass(frozen=True, slots=True)
class SecurityProfile:
    """One profile (see the module docstring). ``None`` limits mean no limit."""

    name: str
    network: bool = False
    memory_mb: int | None = 1024
    cpus: float | None = 1.0
    pids: int | None = 256
    read_only_root: bool = True
    tmp_size_mb: int = 256  # the private /tmp (Docker: a tmpfs; local: not bounded)

    def limits(self, asked: Limits) -> Limits:
        """The tighter of the profile's ceiling and what the create asked for."""

        def tighter(a: Any, b: Any) -> Any:
            values = [v for v in (a, b) if v]
            return min(values) if values else None

        return Limits(
            memory_mb=tighter(self.memory_mb, asked.memory_mb),
            cpus=tighter(self.cpus, asked.cpus),
            pids=tighter(self.pids, asked.pids),
        )

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_DEFAULT = SecurityProfile("default")
BUILTIN_PROFILES: Mapping[str, SecurityProfile] = {
    "default": _DEFAULT,
    "networked": dataclasses.replace(_DEFAULT, name="networked", network=True),
    "restricted": SecurityProfile(
        "restricted", memory_mb=256, cpus=0.5, pids=64, tmp_size_mb=64
    ),
}


def _no_jail() -> HostJail:
    return HostJail(())


@dataclass(frozen=True, slots=True)
class SecurityPolicy:
    """The profiles by name and the two host-path jails; one per daemon, shared by its
    runtimes (``Runtime.security``)."""

    profiles: Mapping[str, SecurityProfile] = field(default_factory=lambda: dict(BUILTIN_PROFILES))
    mounts: HostJail = field(default_factory=_no_jail)
    browse: HostJail = field(default_factory=_no_jail)

    def profile(self, name: str) -> SecurityProfile:
        found = self.profiles.get(name)
        if found is None:
            known = ", ".join(sorted(self.profiles))
            raise UnknownProfile(f"no security profile {name!r} (known: {known})", field="profile")
        return found

    def check_target(self, container_path: str) -> None:
        """Where a mount may go inside the sandbox."""
        target = container_path
        if not isinstance(target, str) or not target.startswith("/") or "\0" in target:
            raise InvalidPath(f"mount target must be an absolute path: {target!r}", field="mounts")
        if ".." in target.split("/"):
            raise InvalidPath(f"mount target must not contain '..': {target!r}", field="mounts")
        norm = posixpath.normpath(target)
        if norm in _NO_MOUNT_TARGETS:
            raise InvalidPath(f"cannot mount over {norm}", field="mounts")
        if norm == SANDBOX_BERTH_DIR or norm.startswith(SANDBOX_BERTH_DIR + "/"):
            raise InvalidPath(f"{SANDBOX_BERTH_DIR} is reserved for the shared directory", field="mounts")
        for kernel_dir in ("/proc", "/sys", "/dev"):
            if norm.startswith(kernel_dir + "/"):
                raise InvalidPath(f"cannot mount inside {kernel_dir}", field="mounts")

    def resolve_mount(self, mount: Mount) -> Mount:
        """The mount with its host path canonical and checked against the mount roots;
        ``MountForbidden`` (403), ``HostPathNotFound`` (404) or ``InvalidPath`` (400)."""
        if mount.mode not in ("ro", "rw"):
            raise InvalidPath(f"mount mode must be 'ro' or 'rw', not {mount.mode!r}", field="mounts")
        self.check_target(mount.container_path)
        try:
            resolved = self.mounts.resolve(mount.host_path)
        except MountForbidden:
            raise
        except PathForbidden as exc:
            raise MountForbidden(f"cannot mount {mount.host_path!r}: {exc}", field="mounts") from None
        return Mount(resolved.path, posixpath.normpath(mount.container_path), mount.mode)

    def recheck_mount(self, host_path: str) -> str:
        """A mount's canonical source, resolved again right before the runtime binds it:
        a symlink swapped in since create is refused (``MountForbidden``), not followed."""
        try:
            resolved = self.mounts.resolve(host_path)
        except PathForbidden as exc:
            raise MountForbidden(f"cannot mount {host_path!r} any more: {exc}", field="mounts") from None
        if resolved.path != host_path:
            raise MountForbidden(
                f"mount source {host_path!r} now resolves to {resolved.path!r} (a symlink was "
                "swapped in since the container was created); refused",
                field="mounts",
            )
        return host_path

    def open_mount(self, host_path: str) -> int:
        """``recheck_mount``, answering with an ``O_PATH`` descriptor of what was checked
        (the caller closes it): bound by descriptor, a later swap cannot redirect it."""
        try:
            fd, resolved = self.mounts.open_fd(host_path)
        except PathForbidden as exc:
            raise MountForbidden(f"cannot mount {host_path!r} any more: {exc}", field="mounts") from None
        if resolved.path != host_path:
            os.close(fd)
            raise MountForbidden(
                f"mount source {host_path!r} now resolves to {resolved.path!r} (a symlink was "
                "swapped in since the container was created); refused",
                field="mounts",
            )
        return fd

    def resolve_mounts(self, mounts: Iterable[Mount]) -> tuple[Mount, ...]:
        return tuple(self.resolve_mount(m) for m in mounts)

    def describe(self) -> dict[str, Any]:
        """For ``/v1/info``: the profiles and the roots (paths only)."""
        return {
            "profiles": {name: p.as_dict() for name, p in sorted(self.profiles.items())},
            "mount_roots": list(self.mounts.roots),
            "host_roots": list(self.browse.roots),
        }


def build_policy(
    profiles: Mapping[str, Mapping[str, Any]] | None = None,
    mount_roots: Iterable[str] = (),
    host_roots: Iterable[str] | None = None,
    forbidden: Iterable[str] = (),
) -> SecurityPolicy:
    """A policy from configuration values: ``profiles`` maps a name to the fields it sets
    (the rest from ``default``; a limit of 0 means none), ``host_roots`` None = the mount
    roots if any, else the home directory of the daemon's user."""
    table = dict(BUILTIN_PROFILES)
    base = table["default"]
    for name, values in (profiles or {}).items():
        if not PROFILE_NAME_RE.match(name):
            raise ValueError(f"profile name {name!r} must match {PROFILE_NAME_RE.pattern}")
        known = {f.name for f in dataclasses.fields(SecurityProfile)} - {"name"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"profile {name!r}: unknown field {unknown[0]!r} (known fields: {', '.join(sorted(known))})"
            )
        start = table.get(name, base)
        changes: dict[str, Any] = {
            k: (v or None) if k in ("memory_mb", "cpus", "pids") else v for k, v in values.items()
        }
        table[name] = dataclasses.replace(start, name=name, **changes)
    blocked = list(forbidden)
    mount_roots = [r for r in mount_roots if r]
    browse = list(host_roots) if host_roots is not None else (mount_roots or [os.path.expanduser("~")])
    return SecurityPolicy(
        profiles=table, mounts=HostJail(mount_roots, blocked), browse=HostJail(browse, blocked)
    )


def configure_security(runtimes: Mapping[str, Runtime], config: Any, data_dir: str) -> SecurityPolicy:
    """Build the daemon's policy from its ``Config`` (``profiles``, ``mount_roots``,
    ``host_roots``) and give it to every runtime. The data directory, the sandbox
    directory and every runtime's private directories are never mountable."""
    forbidden = [data_dir, getattr(config, "sandbox_dir", "")]
    for runtime in runtimes.values():
        forbidden.extend(runtime.private_dirs())
    profiles = {
        name: {k: v for k, v in _fields_of(value).items() if v is not None}
        for name, value in (getattr(config, "profiles", None) or {}).items()
    }
    policy = build_policy(
        profiles, getattr(config, "mount_roots", ()) or (), getattr(config, "host_roots", None), forbidden
    )
    for runtime in runtimes.values():
        runtime.security = policy
    return policy


def _fields_of(value: Any) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return dict(value)
    names = getattr(value, "__struct_fields__", None)
    if names is not None:
        return {n: getattr(value, n) for n in names}
    return dict(vars(value))
