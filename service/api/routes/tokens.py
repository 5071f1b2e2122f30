"""Operator routes for teams: tenants (weight, quotas, shared tasks) and their scoped tokens.

``POST /tokens`` answers the token string once; it is stored only as its HMAC and never listed or logged.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Response
from pydantic import BaseModel, Field

from service.api.deps import Admin, TenantsDep
from service.api.errors import ApiError
from service.api.schemas import error_responses as errors
from service.tenants.model import TENANT_NAME, Quotas, Role, Tenant, TenantError, TokenRecord, validate_tenant
from service.tenants.tokens import TOKEN_ID

router = APIRouter(tags=["tenants"], dependencies=[Admin])

TenantName = Annotated[str, Path(description="tenant name", pattern=TENANT_NAME.pattern)]
TokenId = Annotated[str, Path(description="token id", pattern=TOKEN_ID.pattern)]


class QuotaSpec(BaseModel):
    requests_per_s: float | None = Field(
        default=None, gt=0, description="requests per second, all replicas together"
    )
    images_per_s: float | None = Field(
        default=None, gt=0, description="images per second, all replicas together"
    )
    max_tasks: int | None = Field(default=None, ge=0, strict=True, description="tasks the tenant may own")
    max_bytes: int | None = Field(
        default=None, ge=0, strict=True, description="bytes of current versions the tenant may store"
    )


class TenantSpec(BaseModel):
    weight: float = Field(
        default=1.0, gt=0, le=1000, description="share of the scheduler relative to other tenants"
    )
    quotas: QuotaSpec = Field(default_factory=lambda: QuotaSpec())
    shares: dict[str, list[str]] = Field(
        default_factory=dict, description="own task name -> tenants whose clients may predict with it"
    )


class TenantInfo(TenantSpec):
    name: str


class TenantList(BaseModel):
    tenants: list[TenantInfo]


class TokenRequest(BaseModel):
    role: Literal["operator", "admin", "client"] = Field(
        description="operator, or a tenant's admin or client"
    )
    tenant: str | None = Field(default=None, description="the tenant; none for an operator token")
    ttl_s: float | None = Field(
        default=None, gt=0, description="seconds until the token expires; none: never"
    )
    description: str = Field(default="", max_length=200, description="a note for the token list")


class TokenInfo(BaseModel):
    id: str
    tenant: str | None
    role: str
    created_at: float = Field(description="Unix time")
    expires_at: float | None = Field(description="Unix time; none: never")
    expired: bool
    description: str

    @classmethod
    def of(cls, record: TokenRecord) -> TokenInfo:
        return cls(
            id=record.id,
            tenant=record.tenant,
            role=record.role.value,
            created_at=record.created_at,
            expires_at=record.expires_at,
            expired=record.expired(time.time()),
            description=record.description,
        )


class NewToken(TokenInfo):
    token: str = Field(description="the bearer token: shown this once, stored only as its HMAC")


class TokenList(BaseModel):
    tokens: list[TokenInfo]


def _info(tenant: Tenant) -> TenantInfo:
    return TenantInfo(
        name=tenant.name,
        weight=tenant.weight,
        quotas=QuotaSpec(**tenant.quotas.__dict__),
        shares=tenant.shares,
    )


@router.put("/tenants/{tenant}", response_model=TenantInfo, responses=errors(400, 401, 403, 422, 503))
async def put_tenant(tenant: TenantName, spec: TenantSpec, tenants: TenantsDep) -> TenantInfo:
    """Create a tenant or replace its weight, quotas and shares (every replica within the refresh bound)."""
    record = Tenant(validate_tenant(tenant), spec.weight, Quotas(**spec.quotas.model_dump()), spec.shares)
    try:
        await tenants.put_tenant(record)
    except TenantError as e:
        raise ApiError(422, "invalid_parameter", str(e)) from None
    return _info(record)


@router.get("/tenants", response_model=TenantList, responses=errors(401, 403))
async def list_tenants(tenants: TenantsDep) -> TenantList:
    return TenantList(tenants=[_info(t) for _, t in sorted(tenants.tenants.items())])


@router.delete("/tenants/{tenant}", status_code=204, responses=errors(401, 403, 404, 422, 503))
async def delete_tenant(tenant: TenantName, tenants: TenantsDep) -> Response:
    """Remove a tenant and revoke its tokens; its tasks stay, owned by nobody (operator only)."""
    if not await tenants.delete_tenant(tenant):
        raise ApiError(404, "tenant_not_found", f"tenant {tenant!r} does not exist")
    return Response(status_code=204)


@router.post("/tokens", status_code=201, response_model=NewToken, responses=errors(400, 401, 403, 422, 503))
async def create_token(body: TokenRequest, tenants: TenantsDep) -> NewToken:
    """A new token; the answer is the only place its string ever appears."""
    try:
        record, token = await tenants.create_token(body.tenant, Role(body.role), body.ttl_s, body.description)
    except TenantError as e:
        raise ApiError(422, "invalid_parameter", str(e)) from None
    return NewToken(**TokenInfo.of(record).model_dump(), token=token)


@router.get("/tokens", response_model=TokenList, responses=errors(401, 403))
async def list_tokens(tenants: TenantsDep) -> TokenList:
    """Every token's id, tenant, role and expiry; never a token string or its hash."""
    records = sorted(tenants.tokens.values(), key=lambda r: (r.tenant or "", r.created_at))
    return TokenList(tokens=[TokenInfo.of(r) for r in records])


@router.delete("/tokens/{token_id}", status_code=204, responses=errors(401, 403, 404, 422, 503))
async def revoke_token(token_id: TokenId, tenants: TenantsDep) -> Response:
    """Revoke a token: at once on this replica, on the others within SSF_TENANT_REFRESH_S."""
    if not await tenants.revoke(token_id):
        raise ApiError(404, "token_not_found", f"token {token_id!r} does not exist")
    return Response(status_code=204)
