"""schemathesis hooks for S3: the admin token through an auth hook.

Used as SCHEMATHESIS_HOOKS=tests.reliability.st_hooks."""

from __future__ import annotations

import os

import schemathesis


@schemathesis.auth()
class AdminToken:
    def get(self, case, context):  # type: ignore[no-untyped-def]
        return os.environ["SSF_ST_TOKEN"]

    def set(self, case, data, context):  # type: ignore[no-untyped-def]
        case.headers = case.headers or {}
        case.headers["Authorization"] = f"Bearer {data}"
