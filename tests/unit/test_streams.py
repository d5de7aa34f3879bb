"""What `make test` repeats at the end of its output when a stream fails (no stack)."""

from __future__ import annotations

from tests.streams import TAIL, _summary


def test_a_failed_stream_is_summed_up_from_pytests_short_summary_on() -> None:
    lines = [
        "tests/faults/test_auth_down.py ..F\n",
        "=================== FAILURES ===================\n",
        "AssertionError: assert 1 == 2\n",
        "=========== short test summary info ============\n",
        "FAILED tests/faults/test_auth_down.py::test_x - AssertionError\n",
        "========== 1 failed, 40 passed in 300s ==========\n",
    ]
    assert _summary(lines) == lines[3:]


def test_a_stream_that_printed_no_summary_is_summed_up_by_its_last_lines() -> None:
    lines = [f"line {number}\n" for number in range(TAIL + 5)]
    assert _summary(lines) == lines[5:]
    assert _summary(lines[:3]) == lines[:3]
