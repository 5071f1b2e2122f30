"""``ssf-serve`` bad input: one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import build_parser, main


@pytest.fixture(autouse=True)
def _no_ssf_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("SSF_")]:
        monkeypatch.delenv(key)


BAD = [
    [],
    ["--model"],
    ["--model", "test_vit", "--port", "abc"],
    ["--model", "test_vit", "--port", "70000"],
    ["--model", "test_vit", "--backend", "tensorrt"],
    ["--model", "test_vit", "--device", "tpu"],
    ["--model", "no_such_model_xyz"],
    ["--model", "test_vit", "--weights", "/no/such/file.safetensors"],
    ["--model", "test_vit", "--host", "0.0.0.0"],
    ["--model", "test_vit", "--store", "s3://bucket"],
    ["--model", "test_vit", "--store", "redis://"],
    ["--model", "test_vit", "--store", "redis://host:notaport/0"],
    ["--model", "test_vit", "--store", "redis://host:6379/zero"],
    ["--model", "test_vit", "--store", "/etc/hostname"],
    ["--model", "test_vit", "--unknown-flag"],
    ["--model", "test_vit", "--backend", "onnx", "--device", "cuda"],
]


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) or "(none)" for a in BAD])
def test_bad_input_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ssf-serve: error: "), err
    assert "Traceback" not in err


def test_port_in_use_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["--model", "test_vit", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and err.count("\n") == 1


def test_documented_flags_exist() -> None:
    flags = {a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    assert {"--model", "--weights", "--store", "--backend", "--device", "--host", "--port"} <= flags


def test_as_a_process_no_traceback(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "service.cli", "--model", "test_vit", "--host", "10.0.0.1"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        cwd=Path(__file__).resolve().parents[3],
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "SSF_ADMIN_TOKEN" in r.stderr


def test_store_password_never_printed(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--model", "test_vit", "--store", "redis://:hunter2@host:x/0"]) == 2
    assert "hunter2" not in capsys.readouterr().err
