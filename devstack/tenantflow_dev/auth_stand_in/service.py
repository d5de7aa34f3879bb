"""The Auth stand-in as a part of the local stack: one uvicorn process on its own port."""

from __future__ import annotations

import asyncio
import os
import sys

import httpx

from tenantflow_dev.auth_stand_in.keys import ensure_signing_keys
from tenantflow_dev.auth_stand_in.users import admin_connection, ensure_auth_schema
from tenantflow_dev.service import HttpProcessService

__all__ = ["AuthServer"]


class AuthServer(HttpProcessService):
    """The stand-in as a stack service: one uvicorn process on `SUPABASE_URL`'s port."""

    name = "supabase-auth"
    what = "the Auth stand-in"
    folder = "auth"
    port_variable = "TENANTFLOW_AUTH_PORT"

    @property
    def port(self) -> int:
        return self.config.auth_port

    @property
    def address(self) -> str:
        return self.config.supabase_url

    def argv(self) -> list[str]:
        # NOTE: not `-m`: the package imports this module, and runpy warns about that.
        return [sys.executable, "-c", "from tenantflow_dev.auth_stand_in.app import main; main()"]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.config.location_environment()}

    def answers(self) -> bool:
        return _answers(self.config.supabase_url)

    def prepare(self) -> None:
        super().prepare()
        self.root.chmod(0o700)
        ensure_signing_keys(self.config)

        async def auth_schema() -> None:
            conn = await admin_connection(self.config)
            try:
                await ensure_auth_schema(self.config, conn)
            finally:
                await conn.close()

        asyncio.run(auth_schema())


def _answers(supabase_url: str) -> bool:
    try:
        response = httpx.get(f"{supabase_url}/auth/v1/health", timeout=2)
    except httpx.HTTPError:
        return False
    return response.status_code == 200
