"""Settings refuse unsafe combinations before anything listens."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.api.forms import TASK_NAME_RE
from service.settings import Settings, is_loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
def test_non_loopback_host_needs_a_token(host: str) -> None:
    with pytest.raises(ValidationError, match="SSF_ADMIN_TOKEN"):
        Settings(model="m", host=host)
    with pytest.raises(ValidationError, match="SSF_ADMIN_TOKEN"):
        Settings(model="m", host=host, admin_token="   ")
    assert Settings(model="m", host=host, admin_token="t0ken").admin_enabled


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    assert is_loopback(host)
    assert not Settings(model="m", host=host).admin_enabled


def test_environment_prefix_and_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSF_ADMIN_TOKEN", "from-env-123")
    monkeypatch.setenv("SSF_MAX_BODY_BYTES", "2048")
    s = Settings(model="m")
    assert s.admin_token is not None and s.admin_token.get_secret_value() == "from-env-123"
    assert s.max_body_bytes == 2048
    assert "from-env-123" not in repr(s) and "from-env-123" not in str(s.model_dump())


@pytest.mark.parametrize(
    "bad", [{"port": 0}, {"port": 70000}, {"backend": "tensorrt"}, {"device": "tpu"}, {"max_body_bytes": 1}]
)
def test_bad_values_refused(bad: dict) -> None:
    with pytest.raises(ValidationError):
        Settings(model="m", **bad)


def test_onnx_backend_is_float32_cpu() -> None:
    with pytest.raises(ValidationError, match="onnx"):
        Settings(model="m", backend="onnx", device="cuda")


def test_task_name_pattern_matches_the_ssf_core() -> None:
    from ssf.delta import TASK_NAME_RE as CORE

    assert TASK_NAME_RE.pattern == CORE.pattern
