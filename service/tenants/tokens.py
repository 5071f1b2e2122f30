"""Token strings: ``ssf_<id>_<secret>``; at rest only ``HMAC-SHA256(SSF_TOKEN_SECRET, token)``.

The secret part is 32 random bytes (``secrets.token_urlsafe``), so a keyed hash is enough: a slow KDF
(argon2, scrypt) protects low-entropy passwords against guessing, which 256 random bits already defeat, and
would cost milliseconds on every request. The key means a copy of the store alone cannot even confirm a
guess. The id in the token finds the record in one lookup; the digest is then compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "ssf_"
TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_SHAPE = re.compile(r"^ssf_([0-9a-f]{16})_[A-Za-z0-9_-]{43}$")


def mint() -> tuple[str, str]:
    """A new (token id, token string). The string is shown once, at creation."""
    token_id = secrets.token_hex(8)
    return token_id, f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"


def digest(key: bytes, token: str) -> str:
    return hmac.new(key, token.encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def token_id_of(token: str) -> str | None:
    """The id of a well-formed stored-token string; None for anything else (e.g. SSF_ADMIN_TOKEN)."""
    match = _SHAPE.match(token)
    return match.group(1) if match else None


def matches(key: bytes, token: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(key, token), stored_digest)


def any_equal(given: str, candidates: list[str]) -> bool:
    """Compare against every candidate, with no early exit, in constant time per candidate."""
    given_b = given.encode("utf-8", "surrogateescape")
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(given_b, candidate.encode("utf-8", "surrogateescape"))
    return found
