"""
The embedded limit store: sessions, fixed rate windows, calendar quota
periods in UTC, token buckets, and the state file (atomic, survives a
restart, a corrupt one never stops the server).
"""

from __future__ import annotations

import calendar
import contextlib
import json
import os
import pathlib
from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import task
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from twisted_socks5.limitstore import (
    PERIODS,
    ILimitStore,
    MemoryLimitStore,
    parse_state,
    period_bounds,
)


def result(d: Deferred[Any]) -> Any:
    out: List[Any] = []
    d.addBoth(out.append)
    assert out, "the memory store fires at once"
    return out[0]


def utc(*args: int) -> int:
    """POSIX seconds of a UTC time: year, month, day[, hour, minute, second]."""
    fields = (*args, 0, 0, 0)[:6]
    return calendar.timegm((*fields, 0, 0, 0))


def store_at(when: float, **kw: Any) -> tuple[MemoryLimitStore, task.Clock]:
    clock = task.Clock()
    clock.advance(when)
    return MemoryLimitStore(clock, **kw), clock


def test_provides_the_interface() -> None:
    assert verifyObject(ILimitStore, MemoryLimitStore(task.Clock()))


def test_sessions_count_up_to_the_maximum_and_release() -> None:
    store, _ = store_at(0)
    assert result(store.open_session("user:a", 2)) is True
    assert result(store.open_session("user:a", 2)) is True
    assert result(store.open_session("user:a", 2)) is False
    assert result(store.open_session("user:b", 2)) is True
    result(store.close_session("user:a"))
    assert result(store.open_session("user:a", 2)) is True
    result(store.close_session("user:a"))
    result(store.close_session("user:a"))
    assert "user:a" not in store.sessions
    # An extra release never makes room for more than the maximum.
    result(store.close_session("user:a"))
    assert "user:a" not in store.sessions


def test_rate_refuses_the_twenty_first_in_its_window() -> None:
    store, clock = store_at(1000)
    allowed = [result(store.hit_rate("client:x", 20, 1.0)) for _ in range(21)]
    assert allowed == [True] * 20 + [False]
    clock.advance(0.5)
    assert result(store.hit_rate("client:x", 20, 1.0)) is False
    assert result(store.hit_rate("client:y", 20, 1.0)) is True
    clock.advance(0.5)
    assert result(store.hit_rate("client:x", 20, 1.0)) is True


@pytest.mark.parametrize(
    "period, now, start, end",
    [
        (
            "hour",
            utc(2026, 12, 4, 18, 59, 59),
            utc(2026, 12, 4, 18),
            utc(2026, 12, 4, 19),
        ),
        ("day", utc(2026, 12, 4, 18, 30), utc(2026, 12, 4), utc(2026, 12, 5)),
        # 2026-12-04 is a Friday: its week began on Monday the 30th of November.
        ("week", utc(2026, 12, 4, 18), utc(2026, 11, 30), utc(2026, 12, 7)),
        ("week", utc(2026, 11, 30), utc(2026, 11, 30), utc(2026, 12, 7)),
        ("month", utc(2026, 12, 31, 23, 59, 59), utc(2026, 12, 1), utc(2027, 1, 1)),
        ("month", utc(2028, 2, 29, 12), utc(2028, 2, 1), utc(2028, 3, 1)),
    ],
)
def test_periods_are_calendar_aligned_in_utc(
    period: str, now: int, start: int, end: int
) -> None:
    assert period_bounds(period, now) == (start, end)


@given(st.sampled_from(PERIODS), st.integers(0, utc(2200, 1, 1)))
def test_every_moment_lies_in_its_period(period: str, now: int) -> None:
    start, end = period_bounds(period, now)
    assert start <= now < end
    assert period_bounds(period, end)[0] == end
    assert period_bounds(period, start - 1)[1] == start


def test_an_unknown_period_is_refused() -> None:
    with pytest.raises(ValueError, match="year"):
        period_bounds("year", 0)


def test_usage_adds_up_and_starts_again_with_the_period() -> None:
    store, clock = store_at(utc(2026, 12, 4, 23, 59))
    assert result(store.add_usage("user:a", "day", 100)) == 100
    assert result(store.add_usage("user:a", "day", 50)) == 150
    assert result(store.add_usage("user:a", "hour", 7)) == 7
    assert result(store.quota_used("user:a", "day")) == 150
    assert result(store.quota_used("user:b", "day")) == 0
    clock.advance(60)
    assert result(store.quota_used("user:a", "day")) == 0
    assert result(store.add_usage("user:a", "day", 1)) == 1


def test_buckets_grant_their_burst_then_their_rate() -> None:
    store, clock = store_at(0)
    assert result(store.take_bandwidth("b", 1000.0, 500, 800)) == 500
    assert result(store.take_bandwidth("b", 1000.0, 500, 800)) == 0
    clock.advance(0.1)
    assert result(store.take_bandwidth("b", 1000.0, 500, 800)) == 100
    clock.advance(10)
    assert result(store.take_bandwidth("b", 1000.0, 500, 10)) == 10
    assert result(store.take_bandwidth("b", 1000.0, 500, 800)) == 490


def test_usage_survives_a_restart_through_the_state_file(
    tmp_path: pathlib.Path,
) -> None:
    path = str(tmp_path / "state.json")
    store, clock = store_at(utc(2026, 12, 4, 12), state_file=path)
    result(store.start())
    result(store.add_usage("user:a", "day", 1234))
    result(store.add_usage("user:a", "hour", 5))
    result(store.stop())
    assert not [p for p in os.listdir(tmp_path) if p != "state.json"]

    again, _ = store_at(utc(2026, 12, 4, 20), state_file=path)
    result(again.start())
    assert result(again.quota_used("user:a", "day")) == 1234
    # The hour it was used in has passed.
    assert result(again.quota_used("user:a", "hour")) == 0
    result(again.stop())


def test_usage_is_saved_on_a_timer(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "state.json"
    store, clock = store_at(
        utc(2026, 12, 4, 12), state_file=str(path), save_interval=10
    )
    result(store.start())
    result(store.add_usage("user:a", "month", 9))
    assert not path.exists()
    clock.advance(10)
    assert parse_state(path.read_bytes()) == [("user:a", "month", utc(2026, 12, 1), 9)]
    result(store.stop())
    assert not clock.getDelayedCalls()


@pytest.mark.parametrize("content", [b"", b"{", b"[]", b'{"version": 1}', b"\xff\xfe"])
def test_a_corrupt_state_file_is_moved_aside_and_usage_starts_at_zero(
    tmp_path: pathlib.Path, content: bytes, events: Any
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store, _ = store_at(utc(2026, 12, 4), state_file=str(path))
    result(store.start())
    assert store.usage == {}
    assert (tmp_path / "state.json.corrupt").read_bytes() == content
    assert [e for e in events if e.get("event") == "socks5.state_corrupt"]
    result(store.add_usage("user:a", "day", 1))
    result(store.stop())
    assert parse_state(path.read_bytes())[0][3] == 1


def test_a_missing_state_file_is_a_first_start(tmp_path: pathlib.Path) -> None:
    store, _ = store_at(0, state_file=str(tmp_path / "none.json"))
    result(store.start())
    assert store.usage == {}
    result(store.stop())


def test_a_state_file_that_cannot_be_written_is_logged_once(
    tmp_path: pathlib.Path, events: Any
) -> None:
    path = str(tmp_path / "missing-dir" / "state.json")
    store, clock = store_at(utc(2026, 12, 4), state_file=path, save_interval=1)
    result(store.start())
    for _ in range(3):
        result(store.add_usage("user:a", "day", 1))
        clock.advance(1)
    assert len([e for e in events if e.get("event") == "socks5.state_save_failed"]) == 1
    os.mkdir(tmp_path / "missing-dir")
    result(store.stop())
    assert parse_state(pathlib.Path(path).read_bytes())[0][3] == 3


def test_ended_windows_and_periods_are_forgotten() -> None:
    store, clock = store_at(utc(2026, 12, 4, 23))
    result(store.start())
    result(store.hit_rate("client:x", 1, 1.0))
    result(store.add_usage("user:a", "hour", 1))
    result(store.take_bandwidth("b", 1.0, 1, 1))
    clock.advance(86400)
    assert store.windows == {} and store.usage == {} and store.buckets == {}
    result(store.stop())


_entry = st.tuples(
    st.text(max_size=20),
    st.sampled_from(PERIODS),
    st.integers(0, 2**40),
    st.integers(0, 2**62),
)


@given(st.lists(_entry, max_size=10))
def test_the_state_round_trips(entries: List[Any]) -> None:
    document = {"version": 1, "usage": [list(e) for e in entries]}
    assert parse_state(json.dumps(document).encode()) == entries


@given(st.binary(max_size=200))
def test_garbage_state_is_a_value_error_or_entries(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        parse_state(raw)


@given(
    st.recursive(
        st.none() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=5), c),
    )
)
def test_any_json_is_a_value_error_or_entries(document: Any) -> None:
    with contextlib.suppress(ValueError):
        parse_state(json.dumps(document).encode())
