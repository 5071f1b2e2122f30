"""``ssf-tokens``: the operator's tenants and tokens, through a running server's HTTP API
(docs/multi-team.md). The token string is printed once, by ``create``; nothing else ever shows it."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

import httpx

PROG = "ssf-tokens"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Manage tenants and their tokens on a running ssf-serve.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=os.environ.get("SSF_URL", "http://127.0.0.1:8000"), help="server URL")
    p.add_argument("--token", help="operator token (default: $SSF_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tenant", help="create a tenant or set its weight and quotas")
    t.add_argument("name")
    t.add_argument("--weight", type=float, default=1.0, help="scheduler share relative to other tenants")
    t.add_argument("--requests-per-s", type=float, help="requests per second, all replicas together")
    t.add_argument("--images-per-s", type=float, help="images per second, all replicas together")
    t.add_argument("--max-tasks", type=int, help="tasks the tenant may own")
    t.add_argument("--max-bytes", type=int, help="bytes of current versions the tenant may store")
    t.add_argument(
        "--share", action="append", default=[], metavar="TASK=TENANT[,TENANT]", help="share a task"
    )
    sub.add_parser("tenants", help="list tenants")
    d = sub.add_parser("delete-tenant", help="remove a tenant and revoke its tokens")
    d.add_argument("name")
    c = sub.add_parser("create", help="create a token and print it (once)")
    c.add_argument("tenant", help="the tenant, or '-' for an operator token")
    c.add_argument("role", choices=["admin", "client", "operator"])
    c.add_argument("--ttl-days", type=float, help="days until it expires (default: never)")
    c.add_argument("--description", default="", help="a note shown by list")
    sub.add_parser("list", help="list tokens (never the token strings)")
    r = sub.add_parser("revoke", help="revoke a token by id")
    r.add_argument("id")
    p.epilog = _command_options(sub)
    return p


def _command_options(sub: argparse._SubParsersAction[_Parser]) -> str:
    """The commands' own options, listed in the main --help too (``ssf-tokens COMMAND --help`` has them)."""
    lines = ["command options:"]
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.dest != "help":
                meta = f" {action.metavar or action.dest.upper()}" if action.nargs != 0 else ""
                lines.append(f"  {action.option_strings[0]}{meta}  ({name}) {action.help}")
    return "\n".join(lines)


def _shares(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        task, sep, tenants = item.partition("=")
        if not sep or not tenants:
            raise SystemExit(f"{PROG}: error: --share {item!r}: use TASK=TENANT[,TENANT]")
        out[task] = [t for t in tenants.split(",") if t]
    return out


def request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    if args.command == "tenant":
        quotas = {
            "requests_per_s": args.requests_per_s,
            "images_per_s": args.images_per_s,
            "max_tasks": args.max_tasks,
            "max_bytes": args.max_bytes,
        }
        body = {"weight": args.weight, "quotas": quotas, "shares": _shares(args.share)}
        return "PUT", f"/tenants/{args.name}", body
    if args.command == "tenants":
        return "GET", "/tenants", None
    if args.command == "delete-tenant":
        return "DELETE", f"/tenants/{args.name}", None
    if args.command == "create":
        ttl = None if args.ttl_days is None else args.ttl_days * 86400
        tenant = None if args.tenant == "-" else args.tenant
        return (
            "POST",
            "/tokens",
            {"role": args.role, "tenant": tenant, "ttl_s": ttl, "description": args.description},
        )
    if args.command == "list":
        return "GET", "/tokens", None
    return "DELETE", f"/tokens/{args.id}", None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    token = args.token or os.environ.get("SSF_ADMIN_TOKEN")
    if not token:
        print(f"{PROG}: error: give --token or set SSF_ADMIN_TOKEN", file=sys.stderr)
        return 2
    method, path, body = request(args)
    try:
        r = httpx.request(
            method,
            args.url.rstrip("/") + path,
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
    except httpx.HTTPError as e:
        print(f"{PROG}: error: {args.url}: {type(e).__name__}", file=sys.stderr)
        return 1
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            print(f"{PROG}: error: {r.status_code} {error['code']}: {error['message']}", file=sys.stderr)
        except (ValueError, KeyError, TypeError):
            print(f"{PROG}: error: HTTP {r.status_code}", file=sys.stderr)
        return 1
    if r.status_code != 204:
        print(json.dumps(r.json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
