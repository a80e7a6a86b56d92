"""The daemon's configuration: embedded defaults < TOML file < ``BERTHD_*`` environment <
command-line flags, validated by msgspec so that a typo is reported with its field name
instead of being silently ignored."""

from __future__ import annotations

import os
import pathlib
import tomllib
from typing import Annotated, Any, Literal

import msgspec

from berthd.domain.container import MIN_CPUS, MIN_MEMORY_MB, MIN_PIDS

__all__ = ["Config", "ConfigError", "LimitsConfig", "ProfileConfig", "QuotasConfig", "RateLimitsConfig", "ServerConfig", "load_config", "parse_listen",
           "default_data_dir", "ENV_FIELDS"]


class ConfigError(Exception):
    """The configuration cannot be used; the message names the source and the field."""


class LimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # request bodies and file uploads, and file downloads (a bigger file answers 413)
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 16 << 20
    # per exec stream; GET /logs answers the last 8x this
    output_cap_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    read_your_writes_timeout: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    command_timeout: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    ws_max_message_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    ws_queue_events: Annotated[int, msgspec.Meta(ge=1)] = 1000


class RateLimitsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Requests per minute per API key, one token bucket per budget (defaults for keys that
    set none). ``executions``: container exec, kernel and session execute, /v1/run;
    ``sessions``: session creation; ``general``: everything else."""

    general: Annotated[int, msgspec.Meta(ge=1)] = 100
    executions: Annotated[int, msgspec.Meta(ge=1)] = 50
    sessions: Annotated[int, msgspec.Meta(ge=1)] = 20


class QuotasConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Live entities one ``user`` key may hold at once (defaults for keys that set none)."""

    containers: Annotated[int, msgspec.Meta(ge=0)] = 50
    kernels: Annotated[int, msgspec.Meta(ge=0)] = 20
    sessions: Annotated[int, msgspec.Meta(ge=0)] = 20


class ServerConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    threads: Annotated[int, msgspec.Meta(ge=1, le=512)] = 16
    connection_limit: Annotated[int, msgspec.Meta(ge=1)] = 200
    channel_timeout: Annotated[int, msgspec.Meta(ge=1)] = 120
    header_timeout: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # a request's headers must arrive in this
    request_timeout: Annotated[float, msgspec.Meta(gt=0)] = 120.0  # ... and the whole request in this
    per_client_connections: Annotated[int, msgspec.Meta(ge=1)] = 100  # open TCP connections per client address


# --- security: profiles and host roots (berthd.runtime.security) -----------------------


class ProfileConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``[profiles.NAME]`` table: the fields it leaves out come from the built-in profile
    of that name, else from ``default``; a limit of 0 means no limit. Capabilities are
    always dropped and no-new-privileges always set: no profile can change that."""

    network: bool | None = None
    memory_mb: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cpus: Annotated[float, msgspec.Meta(ge=0)] | None = None
    pids: Annotated[int, msgspec.Meta(ge=0)] | None = None
    read_only_root: bool | None = None
    tmp_size_mb: Annotated[int, msgspec.Meta(ge=1)] | None = None

    def __post_init__(self) -> None:
        # below these a runtime cannot run a sandbox at all (see berthd.domain.container)
        for name, low in (("memory_mb", MIN_MEMORY_MB), ("cpus", MIN_CPUS), ("pids", MIN_PIDS)):
            value = getattr(self, name)
            if value is not None and 0 < value < low:
                raise ValueError(f"{name} must be 0 (no limit) or at least {low}, not {value}")


ProfileName = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    data_dir: str = ""
    listen: str = "127.0.0.1:8080"  # "none" disables TCP
    ws_listen: str = "127.0.0.1:8081"
    socket: bool = True  # serve HTTP and WS on unix sockets in the data dir too
    runtime: Literal["auto", "docker", "local"] = "auto"
    store: str = "sqlite"  # sqlite | memory | postgresql://user:pass@host:port/db
    node_id: str = ""  # default: generated once and kept in DATA_DIR/node-id
    sandbox_dir: str = ""  # local runtime root; default DATA_DIR/sandboxes, as root /var/lib/berthd/sandboxes/NODE
    passivate_after: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    # executions that may wait in one kernel or session (a waiting HTTP execute holds a
    # server thread); beyond it 429 QUEUE_FULL
    queue_depth: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    pool_size: Annotated[int, msgspec.Meta(ge=0, le=64)] = 2  # warm sandboxes per (runtime, image, profile)
    pool_image: str = ""  # /v1/run's default image: "" = host on local, busybox:latest on docker
    kernel_image: str = ""  # default image of a kernel's sandbox: "" = python:3.11-slim on docker, host on local
    # seconds a Docker API call may take before the engine counts as unreachable (503): below
    # 10 so that a hung engine is reported within 10 s; streams (exec, logs, pulls) are exempt
    docker_timeout: Annotated[float, msgspec.Meta(gt=0, le=600)] = 8.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    limits: LimitsConfig = msgspec.field(default_factory=LimitsConfig)
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    rate_limits: RateLimitsConfig = msgspec.field(default_factory=RateLimitsConfig)
    quotas: QuotasConfig = msgspec.field(default_factory=QuotasConfig)
    idempotency_ttl: Annotated[float, msgspec.Meta(gt=0)] = 86400.0  # seconds an Idempotency-Key is kept
    # security (berthd.runtime.security): extra or redefined profiles, the host roots
    # mounts may come from (none by default) and the ones /v1/host/directories browses
    # (default: the mount roots, else the daemon user's home)
    profiles: dict[ProfileName, ProfileConfig] = {}
    mount_roots: list[str] = []
    host_roots: list[str] | None = None


ENV_FIELDS = {
    "BERTHD_DATA_DIR": "data_dir",
    "BERTHD_LISTEN": "listen",
    "BERTHD_WS_LISTEN": "ws_listen",
    "BERTHD_SOCKET": "socket",
    "BERTHD_RUNTIME": "runtime",
    "BERTHD_STORE": "store",
    "BERTHD_NODE_ID": "node_id",
    "BERTHD_SANDBOX_DIR": "sandbox_dir",
    "BERTHD_PASSIVATE_AFTER": "passivate_after",
    "BERTHD_KERNEL_IMAGE": "kernel_image",
    "BERTHD_POOL_IMAGE": "pool_image",
    "BERTHD_POOL_SIZE": "pool_size",
    "BERTHD_LOG_LEVEL": "log_level",
}
"""``BERTHD_*`` variables that set a field (``BERTHD_HOME`` is an alias of the data dir;
``BERTHD_ADMIN_KEY`` sets the admin key)."""


def default_data_dir(env: dict[str, str]) -> str:
    if env.get("BERTHD_HOME"):
        return env["BERTHD_HOME"]
    return str(pathlib.Path(env.get("HOME", "~")).expanduser() / ".local" / "share" / "berthd")


def _convert(field: str, raw: str) -> Any:
    if field == "socket":
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"BERTHD_SOCKET must be true or false, not {raw!r}")
    if field == "pool_size":
        if not raw.isdigit():
            raise ConfigError(f"BERTHD_POOL_SIZE must be a whole number, not {raw!r}")
        return int(raw)
    if field == "passivate_after":
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"BERTHD_PASSIVATE_AFTER must be a number of seconds, not {raw!r}") from None
    return raw


def load_config(flags: dict[str, Any], env: dict[str, str] | None = None) -> Config:
    """Merge the sources; ``flags`` holds only the options given on the command line."""
    env = dict(os.environ if env is None else env)
    merged: dict[str, Any] = {}
    config_file = flags.get("config") or env.get("BERTHD_CONFIG")
    data_dir = flags.get("data_dir") or env.get("BERTHD_DATA_DIR") or default_data_dir(env)
    if not config_file and (pathlib.Path(data_dir) / "berthd.toml").is_file():
        config_file = str(pathlib.Path(data_dir) / "berthd.toml")
    if config_file:
        try:
            with open(config_file, "rb") as fh:
                merged.update(tomllib.load(fh))
        except FileNotFoundError:
            raise ConfigError(f"config file {config_file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
        _check(merged, f"config file {config_file}")
    for var, field in ENV_FIELDS.items():
        if env.get(var):
            merged[field] = _convert(field, env[var])
    for key, value in flags.items():
        if key != "config" and value is not None:
            merged[key] = value
    merged.setdefault("data_dir", data_dir)
    if not merged["data_dir"]:
        merged["data_dir"] = data_dir
    return _check(merged, "configuration")


def _check(values: dict[str, Any], source: str) -> Config:
    try:
        return msgspec.convert(values, Config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "unknown field" in text.lower():
            name = text.split("`")[1] if "`" in text else "?"
            known = ", ".join(f for f in Config.__struct_fields__)
            if "at `$.profiles[" in text:  # inside a [profiles.NAME] table
                known = ", ".join(ProfileConfig.__struct_fields__)
                raise ConfigError(f"{source}: unknown field '{name}' in a [profiles.NAME] table "
                                  f"(known fields: {known})") from None
            raise ConfigError(f"{source}: unknown field '{name}' (known fields: {known})") from None
        raise ConfigError(f"{source}: {text}") from None


def parse_listen(value: str, option: str) -> tuple[str, int] | None:
    """"HOST:PORT" or "[::1]:PORT" -> (host, port); "none" or "" -> None."""
    if value.strip().lower() in ("", "none", "off"):
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{option} must look like HOST:PORT (port 0 picks a free one), not {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)
