"""Traversal and symlink attempts, generated: a host tree with a jail root full of hostile
symlinks and a secret outside it, and as many path payloads as asked for.

``HostTree.make(base)`` builds::

    base/root/                      the jail root (a mount root, a host root)
        sub/inner.txt               a file that may be reached
        inside -> sub               a symlink that stays inside: allowed
        to_slash -> /               out, absolute
        to_etc -> /etc              out, to a control path
        to_outside -> ../outside    out, relative
        abs_outside -> base/outside out, absolute
        dotdot -> ..                out, one level up
        c1 -> c2 -> c3 -> to_outside   a chain that ends outside
        loop1 -> loop2 -> loop1     a loop
        to_sock -> /var/run/docker.sock
        to_proc -> /proc/self/root
    base/outside/SECRET             what no attempt may read, list or overwrite
    base/outside/<sentinel>/        what no listing may name

``payloads(tree, count)`` cycles through every combination of a prefix (the root, a
subdirectory, ``//`` and ``/./`` spellings) and a hostile suffix, then absolute paths
and random mixes (seeded: the same run every time), until ``count`` are made.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["HostTree", "payloads", "ESCAPE_SUFFIXES"]

ESCAPE_SUFFIXES = (
    "..", "../..", "../../..", "../outside", "../outside/SECRET", "sub/../..", "sub/../../outside",
    "./../outside", "sub/./../../outside/SECRET", "to_slash", "to_slash/etc", "to_slash/etc/passwd",
    "to_etc", "to_etc/passwd", "to_outside", "to_outside/SECRET", "abs_outside", "abs_outside/SECRET",
    "dotdot", "dotdot/outside", "dotdot/outside/SECRET", "c1", "c1/SECRET", "c2/SECRET", "c3",
    "loop1", "loop1/x", "to_sock", "to_proc", "to_proc/etc", "inside/../../outside",
    "inside/../dotdot/outside", "sub/../to_outside/SECRET", "to_slash/proc/self/root",
    "..%2f..", "sub/..\\..", "%2e%2e/outside",
)
"""Suffixes that must never resolve outside the root (the last three are literal names:
a path is never URL-decoded, so they simply do not exist)."""


@dataclass(frozen=True)
class HostTree:
    base: str
    root: str
    outside: str
    secret: bytes
    sentinel: str  # the name of a directory in ``outside`` no listing may show

    @classmethod
    def make(cls, base: str) -> HostTree:
        root, outside = os.path.join(base, "root"), os.path.join(base, "outside")
        os.makedirs(os.path.join(root, "sub"))
        os.makedirs(outside)
        os.chmod(base, 0o755)
        os.chmod(root, 0o755)
        with open(os.path.join(root, "sub", "inner.txt"), "w") as f:
            f.write("inner\n")
        secret = secrets.token_hex(16).encode()
        with open(os.path.join(outside, "SECRET"), "wb") as f:
            f.write(secret)
        sentinel = "sentinel-" + secrets.token_hex(4)
        os.mkdir(os.path.join(outside, sentinel))
        links = {
            "inside": "sub",
            "to_slash": "/",
            "to_etc": "/etc",
            "to_outside": "../outside",
            "abs_outside": outside,
            "dotdot": "..",
            "c1": "c2",
            "c2": "c3",
            "c3": "to_outside",
            "loop1": "loop2",
            "loop2": "loop1",
            "to_sock": "/var/run/docker.sock",
            "to_proc": "/proc/self/root",
        }
        for name, target in links.items():
            os.symlink(target, os.path.join(root, name))
        return cls(base, root, outside, secret, sentinel)

    def escaped(self, path: str) -> bool:
        """A resolved path outside the root is an escape."""
        return not (path == self.root or path.startswith(self.root + "/"))


def payloads(tree: HostTree, count: int, seed: int = 4) -> Iterator[str]:
    """``count`` hostile host paths (see the module docstring)."""
    prefixes = (tree.root, tree.root + "/sub/..", tree.root + "//", tree.root + "/.", tree.root + "/inside/..")
    absolutes = (
        "/", "/etc", "/etc/passwd", "/etc/shadow", "/proc/self/root", "/proc/1/root", "/sys",
        "/dev", "/run", "/var/run/docker.sock", "/var/run", tree.outside, tree.outside + "/SECRET",
        tree.base, tree.root + "/../outside", tree.root + "/../../", tree.root + "x",
        tree.root + "-evil", os.path.dirname(tree.root), "relative/path", "", "\x00/etc",
    )
    rng = random.Random(seed)
    made = 0
    combos = itertools.chain(
        (f"{p}/{s}" for p, s in itertools.product(prefixes, ESCAPE_SUFFIXES)), absolutes
    )
    for path in combos:
        if made >= count:
            return
        yield path
        made += 1
    pieces = ("..", ".", "sub", "inside", "to_outside", "dotdot", "c1", "to_slash", "abs_outside", "")
    while made < count:
        depth = rng.randint(1, 6)
        tail = "/".join(rng.choice(pieces) for _ in range(depth))
        yield f"{rng.choice(prefixes)}/{tail}/{rng.choice(('SECRET', '', tree.sentinel))}"
        made += 1
