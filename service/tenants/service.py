"""``Tenants``: the snapshot of tenants and token records every request is checked against, refreshed
from the shared store every ``refresh_s`` (the propagation bound of a new token, a revocation, a weight or
a quota), and the operations on it. Authentication reads memory only; quotas go to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from service.store.base import StoreUnavailable
from service.tenants import tokens
from service.tenants.backends import Backend, Snapshot
from service.tenants.buckets import DEBIT, Take
from service.tenants.model import Principal, Role, Tenant, TenantError, TokenRecord, tenant_of

log = logging.getLogger("service.tenants")

BURST_S = 1.0  # a bucket holds this many seconds of its rate (at least one request's cost)


class TokenExpired(Exception):
    """A stored token past its expiry (answered 403 ``token_expired``)."""


class QuotaExceeded(Exception):
    def __init__(self, quota: str, tenant: str, retry_after_s: float) -> None:
        super().__init__(f"tenant {tenant!r} is over its {quota} quota; retry after {retry_after_s:.1f} s")
        self.quota, self.retry_after_s = quota, retry_after_s


class Tenants:
    def __init__(self, backend: Backend, secret: bytes | None, refresh_s: float = 1.0) -> None:
        self.backend, self.secret, self.refresh_s = backend, secret, refresh_s
        self.tenants: dict[str, Tenant] = {}
        self.tokens: dict[str, TokenRecord] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        """Stored tokens work only with a server secret (SSF_TOKEN_SECRET)."""
        return self.secret is not None

    # ------------------------------------------------------------------------ snapshot
    def _apply(self, snap: Snapshot) -> None:
        self.tenants, self.tokens = snap

    async def reload(self) -> None:
        self._apply(await asyncio.to_thread(self.backend.load))

    async def start(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.reload()
        self._task = asyncio.get_running_loop().create_task(self._refresh(), name="ssf-tenants")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.reload()
            except StoreUnavailable as e:  # keep the last snapshot; tokens still check against it
                log.warning("tenant refresh failed: %s", e)
            except Exception:
                log.exception("tenant refresh failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.to_thread(self.backend.close)

    # ------------------------------------------------------------------------ who is it
    def authenticate(self, token: str) -> Principal | None:
        """The principal of a stored token; None when the token is not one of ours (the caller then
        answers invalid_token, also for a deleted tenant's token). TokenExpired past its expiry."""
        token_id = tokens.token_id_of(token)
        if self.secret is None or token_id is None:
            return None
        record = self.tokens.get(token_id)
        if record is None or not tokens.matches(self.secret, token, record.digest):
            return None
        if record.expired(time.time()):
            raise TokenExpired(f"token {token_id} has expired; ask an operator for a new one")
        if record.tenant is not None and record.tenant not in self.tenants:
            return None
        return Principal(record.role.value, record.tenant, record.id)

    def owner(self, task: str) -> str | None:
        """The registered tenant that owns ``task`` by its name; None for tasks nobody owns."""
        prefix = tenant_of(task)
        return prefix if prefix is not None and prefix in self.tenants else None

    def may_predict(self, principal: Principal, task: str, owner: str) -> bool:
        if principal.tenant == owner:
            return True
        tenant = self.tenants.get(owner)
        return (
            principal.tenant is not None and tenant is not None and tenant.shared_with(task, principal.tenant)
        )

    def weight(self, tenant: str | None) -> float:
        found = self.tenants.get(tenant) if tenant else None
        return found.weight if found is not None else 1.0

    # ------------------------------------------------------------------------ operator actions
    async def put_tenant(self, tenant: Tenant) -> None:
        for task, others in tenant.shares.items():
            if tenant_of(task) != tenant.name:
                raise TenantError(f"shares: {task!r} is not a task of tenant {tenant.name!r}")
            for other in others:
                if other not in self.tenants and other != tenant.name:
                    raise TenantError(f"shares: tenant {other!r} does not exist")
        await asyncio.to_thread(self.backend.put_tenant, tenant)
        await self.reload()

    async def delete_tenant(self, name: str) -> bool:
        """Remove the tenant and revoke its tokens (its tasks stay, owned by nobody: operator only)."""
        for record in list(self.tokens.values()):
            if record.tenant == name:
                await asyncio.to_thread(self.backend.delete_token, record.id)
        found = await asyncio.to_thread(self.backend.delete_tenant, name)
        await self.reload()
        return found

    async def create_token(
        self, tenant: str | None, role: Role, ttl_s: float | None, description: str
    ) -> tuple[TokenRecord, str]:
        if self.secret is None:
            raise TenantError("stored tokens are off: start ssf-serve with SSF_TOKEN_SECRET set")
        if role == Role.OPERATOR and tenant is not None:
            raise TenantError("an operator token belongs to no tenant: leave 'tenant' out")
        if role != Role.OPERATOR and (tenant is None or tenant not in self.tenants):
            raise TenantError(f"tenant {tenant!r} does not exist: create it with PUT /tenants/{{name}}")
        token_id, token = tokens.mint()
        now = time.time()
        record = TokenRecord(
            id=token_id,
            tenant=tenant,
            role=role,
            digest=tokens.digest(self.secret, token),
            created_at=now,
            expires_at=None if ttl_s is None else now + ttl_s,
            description=description,
        )
        await asyncio.to_thread(self.backend.put_token, record)
        self.tokens = {**self.tokens, record.id: record}
        return record, token

    async def revoke(self, token_id: str) -> bool:
        found = await asyncio.to_thread(self.backend.delete_token, token_id)
        self.tokens = {k: v for k, v in self.tokens.items() if k != token_id}
        return found

    # ------------------------------------------------------------------------ quotas
    async def admit(self, tenant: str, predict: bool) -> None:
        """One request of ``tenant``: its requests/s bucket, and (for predict) its images/s bucket must not
        be in debt. QuotaExceeded names the quota; a store that cannot answer admits (fail open)."""
        found = self.tenants.get(tenant)
        if found is None:
            return
        q, takes = found.quotas, []
        if q.requests_per_s:
            takes.append(Take(f"{tenant}:rps", q.requests_per_s, max(1.0, q.requests_per_s * BURST_S), 1))
        if predict and q.images_per_s:
            takes.append(Take(f"{tenant}:ips", q.images_per_s, max(1.0, q.images_per_s * BURST_S), 0))
        if not takes:
            return
        try:
            refused = await asyncio.to_thread(self.backend.take, takes)
        except StoreUnavailable as e:
            log.warning("quota check skipped for tenant %s: %s", tenant, e)
            return
        if refused is not None:
            quota = "images_per_s" if refused.bucket.key.endswith(":ips") else "requests_per_s"
            raise QuotaExceeded(quota, tenant, refused.wait_s)

    async def charge_images(self, tenant: str, images: int) -> None:
        found = self.tenants.get(tenant)
        if found is None or not found.quotas.images_per_s or images <= 0:
            return
        rate = found.quotas.images_per_s
        with contextlib.suppress(StoreUnavailable):
            await asyncio.to_thread(
                self.backend.take, [Take(f"{tenant}:ips", rate, max(1.0, rate * BURST_S), images, DEBIT)]
            )

    def check_storage(self, task: str, size: int, current: dict[str, int]) -> None:
        """Before an upload of ``size`` bytes to ``task``: the owner's max_tasks and max_bytes, counted over
        ``current`` ({task: size of its current version}). StorageQuota names the quota."""
        owner = self.owner(task)
        if owner is None:
            return
        q = self.tenants[owner].quotas
        own = {name: n for name, n in current.items() if tenant_of(name) == owner}
        if q.max_tasks is not None and task not in own and len(own) + 1 > q.max_tasks:
            raise StorageQuota(
                "max_tasks", f"tenant {owner!r} has {len(own)} tasks (max_tasks {q.max_tasks})"
            )
        if q.max_bytes is not None:
            total = sum(n for name, n in own.items() if name != task) + size
            if total > q.max_bytes:
                raise StorageQuota(
                    "max_bytes", f"tenant {owner!r} would store {total} bytes (max_bytes {q.max_bytes})"
                )


class StorageQuota(Exception):
    def __init__(self, quota: str, message: str) -> None:
        super().__init__(message)
        self.quota, self.message = quota, message


def retry_after(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


__all__ = ["TokenExpired", "QuotaExceeded", "StorageQuota", "Tenants", "retry_after"]
