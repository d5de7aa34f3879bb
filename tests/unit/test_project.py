"""The scheduler's idempotency keys: what the guard and the housekeeper read a slot from."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from tenantflow.project import scheduler_key, slot_of_key

DEPLOYMENT, SCHEDULE = uuid.uuid4(), uuid.uuid4()


def test_a_key_names_its_slot_in_the_schedules_time_zone() -> None:
    for slot in (
        datetime(2026, 12, 4, 2, 15, tzinfo=UTC),
        datetime(2026, 12, 4, 2, 15, tzinfo=timezone(timedelta(hours=1))),
    ):
        key = scheduler_key(DEPLOYMENT, SCHEDULE, slot)
        assert slot_of_key(key) == slot
        assert slot_of_key(key, deployment_id=DEPLOYMENT, schedule_id=SCHEDULE) == slot


def test_a_key_of_another_deployment_or_schedule_or_shape_names_no_slot() -> None:
    key = scheduler_key(DEPLOYMENT, SCHEDULE, datetime(2026, 12, 4, 2, 15, tzinfo=UTC))
    assert slot_of_key(key, deployment_id=uuid.uuid4()) is None
    assert slot_of_key(key, schedule_id=uuid.uuid4()) is None
    for other in (
        None,
        "",
        "my own key",
        key.replace("scheduled", "manual", 1),
        f"scheduled {DEPLOYMENT} {SCHEDULE} 2026-12-04 02:15:00",  # no time zone
        f"scheduled {DEPLOYMENT} {SCHEDULE} tomorrow",
    ):
        assert slot_of_key(other) is None
