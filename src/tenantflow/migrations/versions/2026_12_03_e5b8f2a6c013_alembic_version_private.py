"""alembic_version belongs to the migrations alone

Revision ID: e5b8f2a6c013
Revises: d7a3c5e1f920
Create Date: 2026-12-03 12:00:00.000000+00:00

Alembic creates `public.alembic_version` itself, so it gets Supabase's default privileges
on new tables in `public`: `anon`, `authenticated` and `service_role` may read and write
it. A worker, which reaches the database as `service_role`, could then move the recorded
revision and make the next migration skip or repeat steps. Only the migration login (its
owner) needs the table.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "e5b8f2a6c013"
down_revision: str | Sequence[str] | None = "d7a3c5e1f920"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """No privilege on `alembic_version` for Supabase's API roles nor for PUBLIC."""
    op.execute("REVOKE ALL ON TABLE public.alembic_version FROM PUBLIC")
    op.execute("REVOKE ALL ON TABLE public.alembic_version FROM anon, authenticated, service_role")


def downgrade() -> None:
    """Back to the privileges before this revision: `service_role`'s, from Supabase's
    default privileges (the earlier revisions were written against them)."""
    op.execute("GRANT ALL ON TABLE public.alembic_version TO service_role")
