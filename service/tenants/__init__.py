"""Tenants, scoped tokens and quotas: who may do what to which task, and how much of the server each
team may use (docs/multi-team.md).

A tenant owns the tasks whose name starts with ``<tenant>.`` (``team.task``). Tokens are random, stored
only as an HMAC-SHA256 under ``SSF_TOKEN_SECRET``, and carry an id, a tenant, a role and an optional expiry.
Tenants and tokens live in the shared store (Redis keys beside the registry's, or files in the store
directory), so every replica sees a change within ``SSF_TENANT_REFRESH_S``. Nothing here imports torch,
the engine or the HTTP layer.
"""

from service.tenants.model import (
    OPERATOR,
    Principal,
    Role,
    Tenant,
    TenantError,
    TokenRecord,
    tenant_of,
    validate_tenant,
)

__all__ = [
    "OPERATOR",
    "Principal",
    "Role",
    "Tenant",
    "TenantError",
    "TokenRecord",
    "tenant_of",
    "validate_tenant",
]
