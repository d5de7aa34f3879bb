"""The stand-in's mail: one-time sign-in codes, delivered to files in the stack folder.

GoTrue emails a 6-digit code on `POST /otp`; the stand-in has no mail server, so it appends
the message to `<stack>/auth/mailbox/<email>` (one JSON object a line, 0600, in the
stand-in's 0700 folder), where the developer (`tenantflow-dev mailbox`) and the tests read
it. The code is never logged. The database keeps only a hash of it
(`auth.one_time_tokens`), as GoTrue does.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg

from tenantflow_dev.auth_stand_in.users import AuthRefusal
from tenantflow_dev.config import StackConfig

__all__ = [
    "Mail",
    "consume_one_time_code",
    "latest_one_time_code",
    "mailbox_folder",
    "read_mailbox",
    "send_one_time_code",
]

#: The `token_type` of an emailed sign-in code (GoTrue's magic link / email OTP).
_TOKEN_TYPE = "magiclink"  # noqa: S105 - a kind of token, not a secret


@dataclass(frozen=True)
class Mail:
    """One message of a user's mailbox."""

    email: str
    code: str
    sent_at: datetime
    expires_at: datetime


def mailbox_folder(config: StackConfig) -> Path:
    return config.stack_dir / "auth" / "mailbox"


def _mailbox_file(config: StackConfig, email: str) -> Path:
    name = email.strip().lower()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"not a mailbox name: {email!r}")
    return mailbox_folder(config) / name


def _code_hash(email: str, code: str) -> str:
    return hashlib.sha256(f"{email.strip().lower()}:{code}".encode()).hexdigest()


async def send_one_time_code(
    config: StackConfig, conn: asyncpg.Connection, user_id: uuid.UUID, email: str
) -> None:
    """Issue a new 6-digit code for the user (replacing an unused one, as GoTrue does) and
    deliver it to the user's mailbox file."""
    code = f"{secrets.randbelow(1_000_000):06d}"
    sent_at = datetime.now(UTC)
    async with conn.transaction():
        await conn.execute(
            "DELETE FROM auth.one_time_tokens WHERE user_id = $1 AND token_type = $2",
            user_id,
            _TOKEN_TYPE,
        )
        await conn.execute(
            "INSERT INTO auth.one_time_tokens (id, user_id, token_type, token_hash, created_at) "
            "VALUES ($1, $2, $3, $4, $5)",
            uuid.uuid4(),
            user_id,
            _TOKEN_TYPE,
            _code_hash(email, code),
            sent_at,
        )
    path = _mailbox_file(config, email)
    path.parent.mkdir(parents=True, exist_ok=True)
    message = {
        "email": email.strip().lower(),
        "code": code,
        "sent_at": sent_at.isoformat(),
        "expires_at": (sent_at + timedelta(seconds=config.auth_otp_expiry_s)).isoformat(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as handle:
        handle.write(json.dumps(message) + "\n")


async def consume_one_time_code(
    config: StackConfig, conn: asyncpg.Connection, user_id: uuid.UUID, email: str, code: str
) -> None:
    """Check and use up the user's code: single use, and good for `config.auth_otp_expiry_s`.

    Raises:
        AuthRefusal: 403 `otp_expired` for a wrong, used or expired code alike, as GoTrue.
    """
    rows = await conn.fetch(
        "DELETE FROM auth.one_time_tokens WHERE user_id = $1 AND token_type = $2 "
        "AND token_hash = $3 RETURNING created_at + make_interval(secs => $4) > now() AS live",
        user_id,
        _TOKEN_TYPE,
        _code_hash(email, code.strip()),
        config.auth_otp_expiry_s,
    )
    if not any(row["live"] for row in rows):
        raise AuthRefusal(403, "otp_expired", "Token has expired or is invalid")


def read_mailbox(config: StackConfig, email: str) -> list[Mail]:
    """The messages delivered to `email`, oldest first (none: an empty list)."""
    path = _mailbox_file(config, email)
    if not path.exists():
        return []
    mails = []
    for line in path.read_text().splitlines():
        if line.strip():
            data = json.loads(line)
            mails.append(
                Mail(
                    data["email"],
                    data["code"],
                    datetime.fromisoformat(data["sent_at"]),
                    datetime.fromisoformat(data["expires_at"]),
                )
            )
    return mails


def latest_one_time_code(config: StackConfig, email: str) -> str | None:
    """The code last sent to `email`, if any (it may be used or expired since)."""
    mails = read_mailbox(config, email)
    return mails[-1].code if mails else None
