"""What a key may do: its rate limits and quotas, its own where it set them at creation,
the configured defaults otherwise."""

from __future__ import annotations

from dataclasses import dataclass, field

from berthd.events.readmodels import KeyRecord, KeysView
from berthd.http.ratelimit import UNLIMITED_KEYS, Budget

__all__ = ["KeyDefaults", "KeyPolicy", "QuotaKind"]

QuotaKind = str  # "containers" | "kernels" | "sessions"


@dataclass(frozen=True, slots=True)
class KeyDefaults:
    """Per-minute budgets and live-entity quotas for keys that set none (config)."""

    rate_limits: dict[Budget, int] = field(
        default_factory=lambda: {"general": 100, "executions": 50, "sessions": 20})
    quotas: dict[QuotaKind, int] = field(
        default_factory=lambda: {"containers": 50, "kernels": 20, "sessions": 20})


class KeyPolicy:
    def __init__(self, keys: KeysView, defaults: KeyDefaults) -> None:
        self.keys = keys
        self.defaults = defaults

    def limits_of(self, key_id: str) -> dict[Budget, int] | None:
        """The key's budgets per minute; None for the unlimited (bootstrap admin, socket)."""
        record = self.keys.get(key_id)
        if key_id in UNLIMITED_KEYS or record is None:
            return None
        return rate_limits(record, self.defaults)

    def quotas_of(self, key_id: str) -> dict[QuotaKind, int] | None:
        """The key's live-entity quotas; None for admin keys (they act for everyone)."""
        record = self.keys.get(key_id)
        if key_id in UNLIMITED_KEYS or record is None or record.role == "admin":
            return None
        return quotas(record, self.defaults)


def rate_limits(record: KeyRecord, defaults: KeyDefaults) -> dict[Budget, int]:
    d = defaults.rate_limits
    return {
        "general": record.rate_limit or d["general"],
        "executions": record.executions_rate_limit or d["executions"],
        "sessions": record.sessions_rate_limit or d["sessions"],
    }


def quotas(record: KeyRecord, defaults: KeyDefaults) -> dict[QuotaKind, int]:
    d = defaults.quotas
    return {
        "containers": d["containers"] if record.max_containers is None else record.max_containers,
        "kernels": d["kernels"] if record.max_kernels is None else record.max_kernels,
        "sessions": d["sessions"] if record.max_sessions is None else record.max_sessions,
    }
