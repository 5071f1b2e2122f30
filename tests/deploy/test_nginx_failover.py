"""nginx's passive health on its own, with two tiny stub upstreams that can be stopped and restarted in
milliseconds: the case the replica tests can only hit by chance.

After a replica fails, nginx sends a single probe request once ``fail_timeout`` is over and treats the
replica as down until that probe returns. If the other replica fails meanwhile, every request gets
"no live upstreams" (502) at once. The template's ``error_page 502 = @fallback`` sends such requests to
the same replicas without passive health; the negative control shows the 502s without it."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from deploy.topology import NGINX_TEMPLATE, nginx_command
from tests.helpers.ports import free_port, wait_for_port

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


class Stub:
    """An HTTP server answering every request with its own name; ``stop``/``start`` on the same port."""

    def __init__(self, name: str) -> None:
        self.name, self.port = name, free_port()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        name = self.name

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                body = name.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


@contextmanager
def run_nginx(tmp: Path, stubs: list[Stub], template: str) -> Iterator[str]:
    port = free_port()
    cmd = nginx_command(tmp, port, [f"127.0.0.1:{s.port}" for s in stubs], tmp / "access.log", template)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def second_failure_statuses(tmp: Path, template: str) -> list[int]:
    """Fail stub b, let nginx mark it down, bring it back, then fail a before any probe reached b."""
    a, b = Stub("a"), Stub("b")
    a.start()
    b.start()
    try:
        with run_nginx(tmp, [a, b], template) as base:
            with httpx.Client(timeout=5) as http:
                owner = {f"t{i}": http.post(f"{base}/tasks/t{i}/predict").text for i in range(20)}
                on_a = [t for t, o in owner.items() if o == "a"]
                on_b = [t for t, o in owner.items() if o == "b"]
                assert on_a and on_b, owner
                b.stop()
                assert http.post(f"{base}/tasks/{on_b[0]}/predict").text == "a"  # b is marked down
                b.start()  # back at once, but nginx will not try it again for fail_timeout
                a.stop()
                statuses = [http.post(f"{base}/tasks/{t}/predict").status_code for t in on_a + on_b]
                statuses += [http.get(f"{base}/tasks/{on_a[0]}").status_code]
            return statuses
    finally:
        a.stop()
        b.stop()


def test_a_second_failure_within_fail_timeout_is_absorbed(tmp_path: Path) -> None:
    statuses = second_failure_statuses(tmp_path, NGINX_TEMPLATE.read_text())
    assert set(statuses) == {200}, statuses


def test_negative_control_without_the_fallback_nginx_answers_502(tmp_path: Path) -> None:
    template = re.sub(r"\n\s*error_page 502 = @fallback;", "", NGINX_TEMPLATE.read_text())
    assert "error_page 502" not in template
    t0 = time.monotonic()
    statuses = second_failure_statuses(tmp_path, template)
    assert 502 in statuses and time.monotonic() - t0 < 5  # before fail_timeout could end it
