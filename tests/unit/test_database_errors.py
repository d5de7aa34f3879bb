"""Which database errors a client's retries take as transient, decided without a database:
the errors of a lane's connection (asyncpg's own, not wrapped by SQLAlchemy) among them."""

from __future__ import annotations

import asyncpg
import pytest

from tenantflow.db import is_database_unreachable, is_transient_database_error

LOST = [
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.InternalClientError("cannot switch to state 11; another operation (2) is in progress"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    ConnectionResetError("Connection reset by peer"),
]
NOT_TRANSIENT = [
    asyncpg.InterfaceError("cannot use Connection.transaction() in a manually started one"),
    asyncpg.InternalClientError("unexpected codec"),
    asyncpg.UndefinedTableError("relation does not exist"),
    ValueError("no"),
]


@pytest.mark.parametrize("error", LOST, ids=lambda e: type(e).__name__)
def test_a_lost_lane_connection_is_the_database_unreachable(error: BaseException) -> None:
    assert is_database_unreachable(error)
    assert is_transient_database_error(error)


@pytest.mark.parametrize("error", NOT_TRANSIENT, ids=lambda e: f"{type(e).__name__}:{e}")
def test_other_client_errors_are_not_retried(error: BaseException) -> None:
    assert not is_transient_database_error(error)
