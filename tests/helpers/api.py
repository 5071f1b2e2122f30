"""The HTTP layer's test vocabulary: the admin token every test app and server is given, settings with
small limits, and the error shape every refusal must have."""

from __future__ import annotations

from service.settings import Settings

TOKEN = "test-admin-token-7f3a9c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_settings(**overrides: object) -> Settings:
    values: dict[str, object] = {
        "model": "test_vit",
        "admin_token": TOKEN,
        "max_body_bytes": 64 * 1024,
        "max_delta_bytes": 32 * 1024,
        "max_images_per_request": 4,
        "drain_delay_s": 0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def assert_error(response: object, status: int, code: str | None = None) -> dict[str, str]:
    """The documented error shape (docs/api.md), the status, and (when given) the code."""
    r = response
    assert r.status_code == status, (r.status_code, r.text)  # type: ignore[attr-defined]
    body = r.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"], body
    if code is not None:
        assert body["error"]["code"] == code, body
    err: dict[str, str] = body["error"]
    return err
