"""Helpers of the auth tests."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from tenantflow.settings import Settings, load_settings
from tenantflow_dev import StackConfig


@dataclass(frozen=True)
class StackUser:
    email: str
    id: uuid.UUID


def with_(settings: Settings, **changes: Any) -> Settings:
    """Settings with some values changed, validated like the real ones."""
    return load_settings(**{**settings.model_dump(), **changes})


def claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def stand_in_counts(config: StackConfig) -> dict[str, int]:
    """Requests the Auth stand-in at `config.supabase_url` has served, by endpoint."""
    response = httpx.get(f"{config.supabase_url}/__stand-in/stats", timeout=5)
    response.raise_for_status()
    counts: dict[str, int] = response.json()
    return counts
