"""Tenants over real HTTP: a server with SSF_TOKEN_SECRET, and the operator calls that set tenants up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from tests.helpers.api import AUTH
from tests.helpers.servers import Server, start

SECRET = "test-token-secret-5d1e"
GLOBAL_CLIENT = "global-client-token-81b2"


def start_tenant_server(tmp: Path, weights: Path, store: str | None = None, **settings: object) -> Server:
    values: dict[str, object] = {"token_secret": SECRET, "tenant_refresh_s": 0.2, **settings}
    return start(tmp, weights, store, **values)


def put_tenant(url: str, name: str, **spec: Any) -> dict[str, Any]:
    r = httpx.put(f"{url}/tenants/{name}", json=spec, headers=AUTH, timeout=10)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def create_token(url: str, role: str, tenant: str | None = None, **extra: Any) -> tuple[str, str]:
    """(token id, token string)."""
    r = httpx.post(f"{url}/tokens", json={"role": role, "tenant": tenant, **extra}, headers=AUTH, timeout=10)
    assert r.status_code == 201, r.text
    return r.json()["id"], r.json()["token"]


def revoke(url: str, token_id: str) -> None:
    r = httpx.delete(f"{url}/tokens/{token_id}", headers=AUTH, timeout=10)
    assert r.status_code == 204, r.text


def bearer(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def upload_as(url: str, token: str | None, data: bytes, name: str, replace: bool = True) -> httpx.Response:
    return httpx.post(
        f"{url}/tasks",
        params={"replace": "true"} if replace else None,
        headers=bearer(token),
        files={"delta": ("d.safetensors", data)},
        data={"name": name},
        timeout=60,
    )
