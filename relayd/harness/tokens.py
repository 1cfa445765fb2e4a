"""The HS256 JWTs relayd issues to Harness SDKs at ``POST /client/auth`` and checks on every protected route.

Written by hand (hmac, hashlib, base64) because the format is tiny and fixed: header ``{"alg":"HS256","typ":"JWT"}``
and the claims of the vendor's v2 relay, ``environment``, ``clusterIdentifier`` ("1"), ``iat``, ``nbf`` and
``apiKey`` = ``auth-key-<sha256 hex of the SDK key>``. The hashed key in the token is what lets a revoked key revoke
its tokens: the caller checks it against the environment's current key hashes on every request. There is no
``exp`` (the vendor issues none). Pure module: no I/O, the time is passed in.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

__all__ = ["KEY_PREFIX", "Claims", "TokenError", "issue", "key_hash", "make_secret", "verify"]

KEY_PREFIX = "auth-key-"
_HEADER = {"alg": "HS256", "typ": "JWT"}


class TokenError(Exception):
    """A token that is malformed, not signed by us, or not yet valid (the message never contains the token)."""


@dataclass(frozen=True)
class Claims:
    environment: str
    key_hash: str  # sha256 hex of the SDK key the token was issued for
    cluster: str
    issued_at: int


def key_hash(api_key: str) -> str:
    """The lowercase SHA-256 hex of an SDK key: how keys are stored and compared, never in clear. A lone surrogate
    (legal in JSON, not in UTF-8) is hashed as its surrogatepass bytes: it matches no key instead of raising."""
    return hashlib.sha256(api_key.encode("utf-8", "surrogatepass")).hexdigest()


def make_secret(configured: str) -> bytes:
    """The configured secret, or (offline mode may leave it empty) a random one valid for this process only."""
    return (configured or secrets.token_hex(32)).encode("utf-8")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def _unb64(text: str) -> bytes:
    if len(text) % 4 == 1 or not _BASE64URL.fullmatch(text):
        raise TokenError("token segment is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _sign(secret: bytes, signing_input: str) -> bytes:
    return hmac.new(secret, signing_input.encode("ascii"), hashlib.sha256).digest()


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def issue(secret: bytes, environment: str, hashed_key: str, now: float) -> str:
    """A token for an SDK that authenticated with the key whose hash is ``hashed_key``."""
    issued = int(now)
    claims = {"environment": environment, "clusterIdentifier": "1", "iat": issued, "nbf": issued,
              "apiKey": KEY_PREFIX + hashed_key}
    signing_input = f"{_b64(_compact(_HEADER))}.{_b64(_compact(claims))}"
    return f"{signing_input}.{_b64(_sign(secret, signing_input))}"


def verify(secret: bytes, token: str, now: float | None = None, leeway: float = 60.0) -> Claims:
    """The claims of a token we signed; TokenError otherwise. The signature is compared in constant time
    and checked before anything of the payload is trusted."""
    claims, nbf = _verified(secret, token)
    if now is not None and nbf is not None and nbf > now + leeway:
        raise TokenError("token not valid yet")
    return claims


@functools.lru_cache(maxsize=16384)
def _verified(secret: bytes, token: str) -> tuple[Claims, float | None]:
    """The time-independent part of ``verify``. SDKs present the same token on every request, so good tokens
    are remembered (a bad one raises, and exceptions are never cached)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token is not three base64url segments")
    try:
        signing_input = f"{parts[0]}.{parts[1]}"
        signing_input.encode("ascii")
    except UnicodeEncodeError:
        raise TokenError("token is not ASCII") from None
    signature = _unb64(parts[2])
    if not hmac.compare_digest(signature, _sign(secret, signing_input)):
        raise TokenError("bad signature")
    try:
        header = json.loads(_unb64(parts[0]))
        payload = json.loads(_unb64(parts[1]))
    except ValueError:
        raise TokenError("token segment is not JSON") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("token algorithm is not HS256")
    if not isinstance(payload, dict):
        raise TokenError("token claims are not an object")
    environment, api_key = payload.get("environment"), payload.get("apiKey")
    if not isinstance(environment, str) or not environment:
        raise TokenError("token has no environment")
    if not isinstance(api_key, str) or not api_key.startswith(KEY_PREFIX):
        raise TokenError("token has no apiKey")
    nbf = payload.get("nbf")
    cluster = payload.get("clusterIdentifier")
    iat = payload.get("iat")
    claims = Claims(environment=environment, key_hash=api_key[len(KEY_PREFIX):],
                    cluster=cluster if isinstance(cluster, str) else "1",
                    issued_at=iat if isinstance(iat, int) and not isinstance(iat, bool) else 0)
    return claims, (nbf if isinstance(nbf, (int, float)) and not isinstance(nbf, bool) else None)
