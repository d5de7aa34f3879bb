"""Every settings rule, checked before any connection, and no password in any message."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import SecretStr

from tenantflow.settings import Settings, SettingsError, load_settings, redacted_url

PASSWORD = "s3cr3t-Pa55word-xyz"
REF = "abcdefghijklmnopqrst"
POOLER = "aws-0-eu-central-1.pooler.supabase.com"

VALID: dict[str, Any] = {
    "database_url": f"postgresql://tenantflow_worker.{REF}:{PASSWORD}@{POOLER}:6543/postgres",
    "migration_database_url": f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:5432/postgres",
    "supabase_url": f"https://{REF}.supabase.co",
    "supabase_anon_key": "anon-key-value",
}


def build(**changes: Any) -> Settings:
    return load_settings(_env_file=None, **{**VALID, **changes})


def refused(**changes: Any) -> str:
    with pytest.raises(SettingsError) as caught:
        build(**changes)
    message = str(caught.value)
    assert PASSWORD not in message
    assert PASSWORD not in repr(caught.value)
    # NOTE: the pydantic error is not chained, so a traceback cannot show the input either.
    assert caught.value.__suppress_context__
    return message


def test_valid_supabase_settings_are_normalised_to_asyncpg_with_ssl() -> None:
    settings = build()
    url = settings.database_url.get_secret_value()
    assert url.startswith("postgresql+asyncpg://")
    assert "ssl=require" in url
    assert settings.migration_database_url.get_secret_value().startswith("postgresql+asyncpg://")
    assert settings.supabase_url == f"https://{REF}.supabase.co"
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in str(settings.model_dump())


@pytest.mark.parametrize("scheme", ["postgres", "postgresql", "postgresql+asyncpg"])
def test_postgres_schemes_are_normalised(scheme: str) -> None:
    url = f"{scheme}://worker:{PASSWORD}@127.0.0.1:6543/postgres"
    migrate = f"{scheme}://postgres:{PASSWORD}@127.0.0.1:54329/postgres"
    settings = build(database_url=url, migration_database_url=migrate)
    assert settings.database_url.get_secret_value() == (
        f"postgresql+asyncpg://worker:{PASSWORD}@127.0.0.1:6543/postgres"
    )


def test_libpq_sslmode_becomes_asyncpg_ssl() -> None:
    settings = build(database_url=VALID["database_url"] + "?sslmode=verify-full")
    url = settings.database_url.get_secret_value()
    assert "ssl=verify-full" in url and "sslmode" not in url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mysql://root:{PASSWORD}@127.0.0.1:3306/db", "must be a PostgreSQL URL"),
        (f"postgresql+psycopg2://u:{PASSWORD}@h:6543/db", "must be a PostgreSQL URL"),
        (f"not a url {PASSWORD}", "is not a database URL"),
        (f"https://u:{PASSWORD}@example.com/db", "must be a PostgreSQL URL"),
        (f"postgresql://u:{PASSWORD}@:6543/db", "must name a host"),
        (f"postgresql://:{PASSWORD}@h:6543/db", "must name a user"),
        (f"postgresql://u:{PASSWORD}@h:6543", "must name a database"),
    ],
)
def test_non_postgres_or_incomplete_urls_are_refused(url: str, expected: str) -> None:
    message = refused(database_url=url)
    assert "DATABASE_URL" in message
    assert expected in message


def test_pooler_host_needs_port_6543_for_workers() -> None:
    message = refused(database_url=f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:5432/postgres")
    assert "DATABASE_URL" in message and "6543" in message and "transaction pooler" in message


def test_pooler_host_needs_port_5432_for_migrations() -> None:
    message = refused(
        migration_database_url=f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:6000/postgres"
    )
    assert "MIGRATION_DATABASE_URL" in message and "5432" in message


@pytest.mark.parametrize("host", [POOLER, "127.0.0.1", "db.example.internal"])
def test_port_6543_is_never_accepted_for_migrations(host: str) -> None:
    message = refused(
        migration_database_url=f"postgresql://postgres.{REF}:{PASSWORD}@{host}:6543/postgres"
    )
    assert "MIGRATION_DATABASE_URL" in message and "transaction pooler" in message


@pytest.mark.parametrize("field", ["database_url", "migration_database_url"])
@pytest.mark.parametrize("user", ["postgres", "postgres.", "app", "postgres.ABC"])
def test_pooler_host_needs_the_project_ref_user(field: str, user: str) -> None:
    port = 6543 if field == "database_url" else 5432
    message = refused(**{field: f"postgresql://{user}:{PASSWORD}@{POOLER}:{port}/postgres"})
    assert field.upper() in message and "<role>.<project_ref>" in message


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:6543/postgres",
        f"postgresql://service_role.{REF}:{PASSWORD}@{POOLER}:6543/postgres",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:6543/postgres",
        f"postgresql://supabase_admin:{PASSWORD}@127.0.0.1:6543/postgres",
    ],
)
def test_workers_never_log_in_as_the_owner(url: str) -> None:
    message = refused(database_url=url)
    assert "DATABASE_URL" in message and "tenantflow_worker" in message


def test_migrations_keep_the_owner() -> None:
    assert (
        build()
        .migration_database_url.get_secret_value()
        .startswith(f"postgresql+asyncpg://postgres.{REF}:")
    )


def test_migrations_on_the_same_endpoint_as_workers_are_refused() -> None:
    message = refused(
        database_url=f"postgresql://worker:{PASSWORD}@10.0.0.5:7000/postgres",
        migration_database_url=f"postgresql://postgres:{PASSWORD}@10.0.0.5:7000/postgres",
    )
    assert "MIGRATION_DATABASE_URL" in message and "session pooler" in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ftp://example.com", "http(s) URL"),
        ("http://example.com", "must use https"),
        (f"https://user:{PASSWORD}@{REF}.supabase.co", "credentials"),
    ],
)
def test_supabase_url_rules(url: str, expected: str) -> None:
    message = refused(supabase_url=url)
    assert "SUPABASE_URL" in message and expected in message


def test_plain_http_is_fine_on_loopback() -> None:
    assert build(supabase_url="http://127.0.0.1:54321/").supabase_url == "http://127.0.0.1:54321"


@pytest.mark.parametrize(
    ("field", "value"),
    [("db_pool_mode", "lifo"), ("db_pool_size", 0), ("db_max_overflow", -1)],
)
def test_pool_settings_are_validated(field: str, value: Any) -> None:
    message = refused(**{field: value})
    assert field.upper() in message


def test_missing_required_settings_name_each_field(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "MIGRATION_DATABASE_URL", "SUPABASE_URL", "SUPABASE_ANON_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    for name in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_ANON_KEY"):
        assert name in str(caught.value)


def test_the_migration_login_is_needed_only_to_migrate() -> None:
    """Tenant workers never hold the schema owner's login: their settings load without it."""
    settings = build(migration_database_url=None)
    assert settings.migration_database_url is None
    with pytest.raises(SettingsError, match="MIGRATION_DATABASE_URL is not set"):
        settings.migration_url()
    held = build()
    assert held.migration_url() == held.migration_database_url


def test_environment_values_are_read_and_errors_hide_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "DATABASE_URL", f"postgresql://tenantflow_worker.{REF}:{PASSWORD}@{POOLER}:5432/pg"
    )
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert "6543" in str(caught.value)
    assert PASSWORD not in str(caught.value)


def test_redacted_url_masks_the_password() -> None:
    shown = redacted_url(VALID["database_url"])
    assert PASSWORD not in shown and "***" in shown and POOLER in shown
    assert redacted_url(f"garbage {PASSWORD}") == "<unparseable URL>"


# The migration endpoint: one rule, the same answer on load and before a migration connects.
WORKERS = f"postgresql+asyncpg://tenantflow_worker.{REF}:{PASSWORD}@{POOLER}:6543/postgres"
LOCAL_WORKERS = f"postgresql+asyncpg://tenantflow_worker:{PASSWORD}@127.0.0.1:6543/postgres"


@pytest.mark.parametrize(
    ("database_url", "migration_url", "reason"),
    [
        (WORKERS, f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:5432/postgres", None),
        (LOCAL_WORKERS, f"postgresql://postgres:{PASSWORD}@127.0.0.1:54329/postgres", None),
        (LOCAL_WORKERS, f"postgresql://postgres:{PASSWORD}@db.internal/postgres", None),
        (WORKERS, f"postgresql://postgres:{PASSWORD}@10.0.0.9:6543/postgres", "port 6543"),
        (WORKERS, f"postgresql://postgres.{REF}:{PASSWORD}@{POOLER}:6000/postgres", "port 5432"),
        # The same host and port as the workers' URL, whatever the port, 5432 included.
        (
            f"postgresql://tenantflow_worker:{PASSWORD}@10.0.0.5/postgres",
            f"postgresql://postgres:{PASSWORD}@10.0.0.5:5432/postgres",
            "same host and port as DATABASE_URL",
        ),
        (
            f"postgresql://tenantflow_worker:{PASSWORD}@10.0.0.5:7000/app",
            f"postgresql://postgres:{PASSWORD}@10.0.0.5:7000/postgres",
            "same host and port as DATABASE_URL",
        ),
    ],
)
def test_settings_and_migrations_apply_one_endpoint_rule(
    database_url: str, migration_url: str, reason: str | None
) -> None:
    from sqlalchemy.engine import make_url

    from tenantflow.migrate import MigrationRefused, check_session_pooler
    from tenantflow.settings import migration_endpoint_refusal

    refusal = migration_endpoint_refusal(make_url(migration_url), make_url(database_url))
    # Settings built around validation (as `model_copy` does) meet the same rule again.
    unchecked = build().model_copy(
        update={
            "database_url": SecretStr(database_url),
            "migration_database_url": SecretStr(migration_url),
        }
    )
    if reason is None:
        assert refusal is None
        build(database_url=database_url, migration_database_url=migration_url)
        check_session_pooler(unchecked)
        return
    assert refusal is not None and reason in refusal
    assert reason in refused(database_url=database_url, migration_database_url=migration_url)
    with pytest.raises(MigrationRefused, match=reason) as caught:
        check_session_pooler(unchecked)
    assert PASSWORD not in str(caught.value)
