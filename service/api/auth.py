"""Bearer token checks: admin for mutating routes and the ONNX download; client tokens for predict.

401 when no token is sent, 403 when a wrong one is (compared in constant time), 403 as well when the
server has no token configured: then the admin plane is off rather than open.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.api.errors import ApiError
from service.settings import Settings

CHALLENGE = {"WWW-Authenticate": 'Bearer realm="ssf-serve admin"'}


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None when absent or empty."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def check_admin(request: Request, settings: Settings) -> None:
    if settings.admin_token is None:
        raise ApiError(
            403,
            "admin_disabled",
            "the admin API is off: start ssf-serve with SSF_ADMIN_TOKEN set to enable it",
        )
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401, "missing_token", "this route needs 'Authorization: Bearer <admin token>'", CHALLENGE
        )
    expected = settings.admin_token.get_secret_value().encode()
    if not hmac.compare_digest(token.encode(), expected):
        raise ApiError(403, "invalid_token", "the admin token is wrong")


def check_client(request: Request, settings: Settings) -> None:
    """Predict needs a client token (or the admin token) only where client tokens are configured."""
    allowed = settings.client_token_list
    if not allowed:
        return
    if settings.admin_token is not None:
        allowed = [*allowed, settings.admin_token.get_secret_value()]
    token = bearer_token(request)
    if token is None:
        raise ApiError(
            401, "missing_token", "this route needs 'Authorization: Bearer <client token>'", CHALLENGE
        )
    given = token.encode()
    # compare against every token (no early exit) so timing does not tell which one came close
    matched = False
    for candidate in allowed:
        matched |= hmac.compare_digest(given, candidate.encode())
    if not matched:
        raise ApiError(403, "invalid_token", "the client token is wrong")
