"""The guard's cost: verifying access tokens locally and remotely, opening sealed tokens."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

from bench.table import Row, ratio, say
from tenantflow.auth import clear_jwks_cache, verify_access_token
from tenantflow.sealing import open_sealed_token, public_key, seal_access_token
from tenantflow.settings import Settings, load_settings
from tenantflow_dev.auth_stand_in import add_signing_key, mint_access_token, remove_signing_key
from tenantflow_dev.config import StackConfig
from tenantflow_dev.demo import ACME, DEMO_MEMBER

LOCAL_CALLS = 3000
REMOTE_CALLS = 300


async def _median_us(call: Callable[[], Awaitable[object]], times: int) -> float:
    for _ in range(min(50, times)):  # warm: JWKS fetched, keys parsed, connections open
        await call()
    samples = []
    for _ in range(times):
        started = time.perf_counter_ns()
        await call()
        samples.append(time.perf_counter_ns() - started)
    return statistics.median(samples) / 1000


async def guard_rows(config: StackConfig, settings: Settings) -> list[Row]:
    say("\n## the guard's cost per call (median)")
    clear_jwks_cache()
    local = load_settings(**{**settings.model_dump(), "supabase_jwt_secret": None})
    with_secret = load_settings(
        **{**settings.model_dump(), "supabase_jwt_secret": config.secrets.jwt_secret}
    )
    rs_kid = add_signing_key(config, "RS256")
    try:
        es = await mint_access_token(config, DEMO_MEMBER)
        rs = await mint_access_token(config, DEMO_MEMBER, algorithm="RS256", kid=rs_kid)
        hs = await mint_access_token(config, DEMO_MEMBER, algorithm="HS256")

        def verify(token: str, s: Settings) -> Callable[[], Awaitable[object]]:
            return lambda: verify_access_token(token, settings=s, strict=False)

        es_us = await _median_us(verify(es, local), LOCAL_CALLS)
        rs_us = await _median_us(verify(rs, local), LOCAL_CALLS)
        hs_us = await _median_us(verify(hs, with_secret), LOCAL_CALLS)
        # HS256 without the secret: Supabase Auth is asked (GET /auth/v1/user).
        remote_us = await _median_us(verify(hs, local), REMOTE_CALLS)
    finally:
        remove_signing_key(config, rs_kid)
        clear_jwks_cache()

    keys = config.secrets.seal_private_key
    # A report's run: the seal binds its period; opening compares the run's arguments.
    today = datetime.now(UTC).date()
    period = {"period_start": today - timedelta(days=7), "period_end": today}
    sealed = seal_access_token(
        es, public_key(keys), flow="client-report", client_ids=[ACME.id], parameters=period
    )

    async def open_once() -> object:
        return open_sealed_token(
            sealed,
            keys,
            flow="client-report",
            client_ids=[ACME.id],
            parameters={"client_id": ACME.id, **period},
        )

    open_us = await _median_us(open_once, LOCAL_CALLS // 3)
    for name, value in (
        ("ES256", es_us),
        ("RS256", rs_us),
        ("HS256 with the secret", hs_us),
        ("remote (GET /auth/v1/user)", remote_us),
        ("open a sealed token", open_us),
    ):
        say(f"  {name:<28} {value:9.1f} us")
    remote = f"{remote_us:,.0f} us (remote check)"
    return [
        Row(
            "verify ES256, cached key (us/call)",
            f"{es_us:.0f}",
            remote,
            f"{remote_us / es_us:.0f}x faster",
            "<= 200 us and >= 50x faster",
            es_us <= 200 and remote_us / es_us >= 50,
        ),
        Row(
            "verify RS256, cached key (us/call)",
            f"{rs_us:.0f}",
            remote,
            f"{remote_us / rs_us:.0f}x faster",
        ),
        Row(
            "verify HS256 with the JWT secret (us/call)",
            f"{hs_us:.0f}",
            remote,
            f"{remote_us / hs_us:.0f}x faster",
        ),
        Row(
            "remote check, GET /auth/v1/user (us/call)",
            f"{remote_us:,.0f}",
            f"{es_us:.0f} us (ES256)",
            ratio(remote_us, es_us),
            ">= 50x",
            remote_us >= 50 * es_us,
        ),
        Row(
            "open a sealed token (us/call)",
            f"{open_us:.0f}",
            f"{es_us:.0f} us (ES256)",
            ratio(open_us, es_us),
        ),
    ]
