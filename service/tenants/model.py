"""The records: tenants, tokens, and the principal a request authenticates as."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# A tenant name is a task name without dots: the dot separates the tenant from the task ("team.task").
TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
SEPARATOR = "."


class TenantError(ValueError):
    """A tenant or token request the caller got wrong (422, the message names it)."""


class Role(StrEnum):
    OPERATOR = "operator"  # everything (SSF_ADMIN_TOKEN is one)
    ADMIN = "admin"  # a tenant's admin: upload, replace, delete, stage, promote its own tasks; predict
    CLIENT = "client"  # a tenant's client: predict its own tasks and tasks shared with it


OPERATOR = Role.OPERATOR


def validate_tenant(name: object) -> str:
    if not isinstance(name, str) or not TENANT_NAME.fullmatch(name):
        raise TenantError(f"invalid tenant name {str(name)[:40]!r}: it must match {TENANT_NAME.pattern}")
    return name


def tenant_of(task: str) -> str | None:
    """The tenant a task name belongs to by its prefix (``team.cats`` -> ``team``); None without a dot.
    Whether that tenant exists is the registry's business: a prefix nobody registered owns nothing."""
    prefix, sep, _ = task.partition(SEPARATOR)
    return prefix if sep and TENANT_NAME.fullmatch(prefix) else None


@dataclass(frozen=True)
class Quotas:
    """Per-tenant limits; None means unlimited."""

    requests_per_s: float | None = None
    images_per_s: float | None = None
    max_tasks: int | None = None
    max_bytes: int | None = None


@dataclass(frozen=True)
class Tenant:
    name: str
    weight: float = 1.0
    quotas: Quotas = field(default_factory=Quotas)
    # own task name -> the other tenants whose clients may predict with it
    shares: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weight": self.weight,
            "quotas": self.quotas.__dict__.copy(),
            "shares": {k: list(v) for k, v in self.shares.items()},
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Tenant:
        return cls(
            name=raw["name"],
            weight=float(raw.get("weight", 1.0)),
            quotas=Quotas(**raw.get("quotas", {})),
            shares={k: list(v) for k, v in raw.get("shares", {}).items()},
        )

    def shared_with(self, task: str, tenant: str) -> bool:
        return tenant in self.shares.get(task, ())


@dataclass(frozen=True)
class TokenRecord:
    """What is stored about a token: never the token itself, only its HMAC (``digest``)."""

    id: str
    tenant: str | None  # None for operator tokens
    role: Role
    digest: str
    created_at: float
    expires_at: float | None = None
    description: str = ""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "tenant": self.tenant,
            "role": self.role.value,
            "digest": self.digest,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "description": self.description,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TokenRecord:
        return cls(
            id=raw["id"],
            tenant=raw.get("tenant"),
            role=Role(raw["role"]),
            digest=raw["digest"],
            created_at=float(raw["created_at"]),
            expires_at=None if raw.get("expires_at") is None else float(raw["expires_at"]),
            description=str(raw.get("description", "")),
        )


@dataclass(frozen=True)
class Principal:
    """Who a request is: ``kind`` is operator, admin, client (a tenant's) or global_client
    (``SSF_CLIENT_TOKENS``) or anonymous; ``token_id`` names a stored token ("admin-token" and
    "client-token" stand for the configured ones) for the audit log, never the token itself."""

    kind: str
    tenant: str | None = None
    token_id: str | None = None

    @property
    def is_operator(self) -> bool:
        return self.kind == Role.OPERATOR


ANONYMOUS = Principal("anonymous")
