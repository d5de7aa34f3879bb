from tests.tenancy.conftest import db_limit, world

__all__ = ["db_limit", "world"]
