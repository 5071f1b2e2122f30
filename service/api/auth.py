"""Who may call which route: ONE table (``ROUTES``: route -> permission) and the one check that reads it.

Principals: the operator (``SSF_ADMIN_TOKEN``, or a stored operator token), a tenant's admin or client
(stored tokens, ``service.tenants``), a global client (``SSF_CLIENT_TOKENS``), or nobody. Permissions:

- ``public``: anyone, whatever header is sent;
- ``predict``: a task's owner tenant (its admins and clients), tenants the owner shared the task with, global
  clients and the operator. A task nobody owns keeps the single-team rule: open unless
  ``SSF_CLIENT_TOKENS`` is set, then any of those tokens or the admin token;
- ``task_admin``: the operator, or an admin of the tenant that owns the task in the path;
- ``upload``: the operator, or a tenant admin (the task name, known only once the body is read, must be the
  tenant's: ``service.api.deps`` checks it with the storage quotas);
- ``operator``: the operator only.

Statuses: no token where one is needed 401 ``missing_token`` (with ``WWW-Authenticate``); a token that is
not one (wrong, revoked, a deleted tenant's) 403 ``invalid_token``; expired 403 ``token_expired``; a valid
token without the permission 403 ``forbidden``; admin routes on a server with no ``SSF_ADMIN_TOKEN`` and no
``SSF_TOKEN_SECRET`` 403 ``admin_disabled``. Every token comparison is constant-time.
"""

from __future__ import annotations

from enum import StrEnum

from fastapi import Request

from service.api.errors import ApiError
from service.settings import Settings
from service.tenants.model import ANONYMOUS, Principal, Role
from service.tenants.service import Tenants, TokenExpired
from service.tenants.tokens import any_equal

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ssf-serve"'}


class Perm(StrEnum):
    PUBLIC = "public"
    PREDICT = "predict"
    TASK_ADMIN = "task_admin"
    UPLOAD = "upload"
    OPERATOR = "operator"


# The route table: every route of the app, (METHOD, path template) -> permission. tests/service/api/
# test_auth_matrix.py generates its matrix from it and fails when a route of the app is missing here.
ROUTES: dict[tuple[str, str], Perm] = {
    ("GET", "/healthz"): Perm.PUBLIC,
    ("GET", "/livez"): Perm.PUBLIC,
    ("GET", "/readyz"): Perm.PUBLIC,
    ("GET", "/metrics"): Perm.PUBLIC,
    ("GET", "/backbone"): Perm.PUBLIC,
    ("GET", "/console"): Perm.PUBLIC,
    ("GET", "/console/console.js"): Perm.PUBLIC,
    ("GET", "/console/console.css"): Perm.PUBLIC,
    ("GET", "/tasks"): Perm.PUBLIC,
    ("POST", "/tasks"): Perm.UPLOAD,
    ("GET", "/tasks/{name}"): Perm.PUBLIC,
    ("DELETE", "/tasks/{name}"): Perm.TASK_ADMIN,
    ("GET", "/tasks/{name}/model.onnx"): Perm.TASK_ADMIN,
    ("POST", "/tasks/{name}/predict"): Perm.PREDICT,
    ("POST", "/tasks/{name}/evaluate"): Perm.TASK_ADMIN,
    ("GET", "/tasks/{name}/evaluations/{job_id}"): Perm.TASK_ADMIN,
    ("GET", "/tasks/{name}/versions"): Perm.PUBLIC,
    ("GET", "/tasks/{name}/versions/{version}"): Perm.PUBLIC,
    ("POST", "/tasks/{name}/versions/{version}/promote"): Perm.TASK_ADMIN,
    ("GET", "/audit"): Perm.OPERATOR,
    ("GET", "/v2"): Perm.PUBLIC,
    ("GET", "/v2/health/live"): Perm.PUBLIC,
    ("GET", "/v2/health/ready"): Perm.PUBLIC,
    ("GET", "/v2/models/{name}"): Perm.PUBLIC,
    ("GET", "/v2/models/{name}/versions/{version}"): Perm.PUBLIC,
    ("GET", "/v2/models/{name}/ready"): Perm.PUBLIC,
    ("GET", "/v2/models/{name}/versions/{version}/ready"): Perm.PUBLIC,
    ("POST", "/v2/models/{name}/infer"): Perm.PREDICT,
    ("POST", "/v2/models/{name}/versions/{version}/infer"): Perm.PREDICT,
    ("POST", "/tokens"): Perm.OPERATOR,
    ("GET", "/tokens"): Perm.OPERATOR,
    ("DELETE", "/tokens/{token_id}"): Perm.OPERATOR,
    ("GET", "/tenants"): Perm.OPERATOR,
    ("PUT", "/tenants/{tenant}"): Perm.OPERATOR,
    ("DELETE", "/tenants/{tenant}"): Perm.OPERATOR,
}
ADMIN_PERMS = (Perm.TASK_ADMIN, Perm.UPLOAD, Perm.OPERATOR)


def permission(method: str, template: str) -> Perm:
    """The table's entry; a route left out fails closed (a write on a task: task_admin; else operator)."""
    found = ROUTES.get((method, template))
    if found is not None:
        return found
    return Perm.TASK_ADMIN if method not in ("GET", "HEAD") and "{name}" in template else Perm.OPERATOR


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or empty."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def identify(token: str, settings: Settings, tenants: Tenants) -> Principal:
    """The principal of a presented token, or ApiError 403: every configured token is compared, always."""
    admin = [settings.admin_token.get_secret_value()] if settings.admin_token is not None else []
    is_admin = any_equal(token, admin)
    is_client = any_equal(token, settings.client_token_list)
    try:
        stored = tenants.authenticate(token)
    except TokenExpired as e:
        raise ApiError(403, "token_expired", str(e)) from None
    if is_admin:
        return Principal(Role.OPERATOR, None, "admin-token")
    if stored is not None:
        return stored
    if is_client:
        return Principal("global_client", None, "client-token")
    raise ApiError(403, "invalid_token", "the token is wrong, expired or revoked")


def _need_token(perm: Perm) -> ApiError:
    kind = "client" if perm == Perm.PREDICT else "admin"
    return ApiError(
        401, "missing_token", f"this route needs 'Authorization: Bearer <{kind} token>'", CHALLENGE
    )


def _forbidden(principal: Principal, what: str) -> ApiError:
    who = f"tenant {principal.tenant!r} {principal.kind}" if principal.tenant else principal.kind
    return ApiError(403, "forbidden", f"a {who} token may not {what}")


def check(request: Request, perm: Perm, settings: Settings, tenants: Tenants) -> Principal:
    """Authorize one request; the principal it runs as."""
    if perm == Perm.PUBLIC:
        return ANONYMOUS
    task = request.path_params.get("name")
    owner = tenants.owner(task) if isinstance(task, str) else None
    if perm == Perm.PREDICT and owner is None and not settings.client_token_list:
        return ANONYMOUS  # a task nobody owns on a server without client tokens: open, as always
    if perm in ADMIN_PERMS and settings.admin_token is None and not tenants.enabled:
        raise ApiError(
            403,
            "admin_disabled",
            "the admin API is off: start ssf-serve with SSF_ADMIN_TOKEN set to enable it",
        )
    token = bearer_token(request)
    if token is None:
        raise _need_token(perm)
    principal = identify(token, settings, tenants)
    if principal.is_operator:
        return principal
    if perm == Perm.PREDICT:
        if principal.kind == "global_client":
            return principal
        if owner is not None and tenants.may_predict(principal, str(task), owner):
            return principal
        raise _forbidden(principal, f"predict with task {task!r}")
    own_task = perm == Perm.TASK_ADMIN and owner is not None and owner == principal.tenant
    if principal.kind == Role.ADMIN and (perm == Perm.UPLOAD or own_task):
        return principal
    what = "call this operator route" if perm == Perm.OPERATOR else f"change task {task!r}"
    raise _forbidden(principal, what if perm != Perm.UPLOAD else "upload tasks")
