"""The data dir is private (docs/security.md): a real daemon started on a data dir that
already exists 0755 tightens it to 0700, and what it keeps there (the SQLite log and its
-wal/-shm, idempotency.db, checkpoints, admin.key, ...) is not group or world readable,
whatever the umask it was started with."""

from __future__ import annotations

import os
import pathlib
import stat
from collections.abc import Iterator

import pytest

from tests.daemon_process import DaemonProcess


def _mode(path: pathlib.Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _files(data: pathlib.Path) -> dict[str, int]:
    """Every regular file the daemon keeps in the data dir and in its checkpoints."""
    found = {}
    for directory in (data, data / "checkpoints"):
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.is_file() and not entry.is_symlink() and not entry.name.endswith("-daemon.log"):
                    found[str(entry.relative_to(data))] = _mode(entry)
    return found


@pytest.fixture
def open_data_dir(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(data, 0o755)
    # left behind world readable, as an older version could have
    (data / "node-id").write_text("0123456789ab\n")
    os.chmod(data / "node-id", 0o644)
    # the operator's own file next to ours: not berthd's to change
    (data / "notes.txt").write_text("")
    os.chmod(data / "notes.txt", 0o644)
    yield data


def test_a_0755_data_dir_is_tightened_and_its_files_are_private(open_data_dir: pathlib.Path) -> None:
    data = open_data_dir
    assert _mode(data) == 0o755
    # a permissive umask for the daemon: its files must not depend on the caller's
    old = os.umask(0o002)
    try:
        d = DaemonProcess(data, runtime="local").start()
    finally:
        os.umask(old)
    try:
        assert _mode(data) == 0o700
        # a write: the log (and its WAL) and the idempotency store both get used
        r = d.session().post(d.url("/v1/containers"), timeout=60, headers={"Idempotency-Key": "perm-1"},
                             json={"image": "host", "command": ["true"], "start": False})
        assert r.status_code == 201, r.text
        assert d.delete(f"/v1/containers/{r.json()['id']}?force=true").status_code == 200
        assert d.stop() == 0  # a clean stop saves the checkpoints
        d.start()  # and a second start on the same dir
        assert d.get("/v1/containers").status_code == 200
        files = _files(data)
    finally:
        d.stop()
    for name in ("berthd.db", "berthd.db-wal", "berthd.db-shm", "idempotency.db",
                 "admin.key", "node-id", "endpoints.json"):
        assert name in files, (name, sorted(files))
    assert any(name.startswith("checkpoints/") for name in files), sorted(files)
    assert files.pop("notes.txt") == 0o644  # only what berthd keeps is tightened
    loose = {name: oct(mode) for name, mode in files.items() if mode & 0o077}
    assert not loose, f"group/world accessible files in the data dir: {loose}"
    assert _mode(data) == 0o700
    assert _mode(data / "checkpoints") & 0o077 == 0
