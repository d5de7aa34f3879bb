"""Hand-made tokens for the auth tests, and the check that an error holds no secret.

Pure helpers (no stack, no network), shared by `tests/unit` and `tests/auth`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import pickle
import traceback
from typing import Any


def b64(data: bytes | dict[str, Any]) -> str:
    """base64url without padding, of bytes or of a dict as JSON."""
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token with any header, payload and signature bytes."""
    return f"{b64(header)}.{b64(payload)}.{b64(signature)}"


def hs256(payload: dict[str, Any], secret: bytes, header: dict[str, Any] | None = None) -> str:
    """A token signed with HMAC-SHA256 under `secret`, whatever its header says."""
    head = b64(header or {"alg": "HS256", "typ": "JWT"})
    body = b64(payload)
    signature = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(signature)}"


def assert_token_free(error: BaseException, *secrets: str) -> None:
    """Neither the message, the repr, the traceback nor the pickle holds a secret."""
    rendered = [
        str(error),
        repr(error),
        "".join(traceback.format_exception(error)),
    ]
    pickled = pickle.dumps(error)
    for secret in secrets:
        for text in rendered:
            assert secret not in text
        assert secret.encode() not in pickled
    # NOTE: a cause or context (an httpx error, a decoding error) could hold the request.
    assert error.__cause__ is None
    assert error.__context__ is None
