"""
``limit`` lines of the rules file: the syntax, its errors (naming the
line), canonical rendering and round trips, and garbage.
"""

from __future__ import annotations

from typing import Any, Optional

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from twisted_socks5.rules import LimitLine, Rule, RulesError, RuleSet
from twisted_socks5.rules.limit import (
    MAX_BANDWIDTH,
    MAX_INTERVAL,
    MAX_QUOTA,
    MAX_RATE,
    MAX_SESSIONS,
    PERIODS,
    SCOPES,
    UNITS,
)

EXAMPLE = """\
limit user alice            sessions 2
limit user *                bandwidth 2MiB/s per-user
limit user bob              bandwidth 512KiB/s per-connection
limit from 10.0.0.0/8       rate 20/1s
limit user bob              quota 1GiB/day
allow user *
default deny
limit via direct command udp quota 1.5GB/month
"""


def test_the_issue_example_parses() -> None:
    rules = RuleSet.parse(EXAMPLE, "limits.conf")
    assert [(x.kind, x.line) for x in rules.limits] == [
        ("sessions", 1),
        ("bandwidth", 2),
        ("bandwidth", 3),
        ("rate", 4),
        ("quota", 5),
        ("quota", 8),
    ]
    sessions, per_user, per_connection, rate, quota, monthly = rules.limits
    assert sessions.count == 2 and sessions.when.users == ("alice",)
    assert (per_user.nbytes, per_user.scope) == (2 << 20, "per-user")
    assert (per_connection.nbytes, per_connection.scope) == (
        512 << 10,
        "per-connection",
    )
    assert (rate.count, rate.interval) == (20, 1.0)
    assert (quota.nbytes, quota.period) == (1 << 30, "day")
    assert (monthly.nbytes, monthly.when.via) == (1_500_000_000, "direct")
    assert sessions.description == "limits.conf:1: limit user alice sessions 2"
    assert len(rules.rules) == 1


@pytest.mark.parametrize(
    "text, expected",
    [
        ("rate 20/1s", (20, 1.0)),
        ("rate 20/s", (20, 1.0)),
        ("rate 20/1", (20, 1.0)),
        ("rate 600/1m", (600, 60.0)),
        ("rate 5/1.5h", (5, 5400.0)),
        ("rate 1/0.25s", (1, 0.25)),
    ],
)
def test_rate_intervals(text: str, expected: tuple) -> None:
    (line,) = RuleSet.parse("limit " + text).limits
    assert (line.count, line.interval) == expected


@pytest.mark.parametrize(
    "text, nbytes",
    [("1B", 1), ("1KB", 1000), ("3MB", 3_000_000), ("2KiB", 2048), ("1.5MiB", 1572864)],
)
def test_byte_units(text: str, nbytes: int) -> None:
    (line,) = RuleSet.parse(f"limit quota {text}/hour").limits
    assert line.nbytes == nbytes


@pytest.mark.parametrize(
    "line, message",
    [
        ("limit user a sessions 0", "out of range"),
        ("limit sessions -1", "whole number"),
        ("limit sessions 1000001", "out of range"),
        ("limit sessions 99999999999999999999999", "whole number"),
        ("limit sessions two", "whole number"),
        ("limit sessions", "sessions N"),
        ("limit sessions 1 2", "sessions N"),
        ("limit rate 20", "bad rate"),
        ("limit rate 0/1s", "out of range"),
        ("limit rate 20/0s", "out of range"),
        ("limit rate 20/25h", "out of range"),
        ("limit rate 20/1d", "bad rate"),
        ("limit rate -20/1s", "bad rate"),
        ("limit bandwidth 2MiB/s", "per-connection|per-user|per-rule"),
        ("limit bandwidth 2MiB/s per-host", "bad bandwidth scope"),
        ("limit bandwidth 2MiB/m per-user", "bytes per second"),
        ("limit bandwidth 2Mb/s per-user", "unknown unit 'Mb'"),
        ("limit bandwidth 2mib/s per-user", "unknown unit"),
        ("limit bandwidth 2/s per-user", "a number and a unit"),
        ("limit bandwidth 0B/s per-user", "out of range"),
        ("limit bandwidth 2TiB/s per-user", "out of range"),
        ("limit bandwidth 0.5B/s per-user", "out of range"),
        ("limit quota 1GiB", "bad quota"),
        ("limit quota 1GiB/year", "bad quota"),
        ("limit quota 2000PiB/day", "unknown unit"),
        ("limit quota 2000000TiB/day", "out of range"),
        ("limit", "ends with its limit"),
        ("limit user bob", "ends with its limit"),
        ("limit user bob speed 3", "or a limit: sessions"),
        ("limit deny sessions 1", "unknown condition 'deny'"),
        ("limit user bob user carol sessions 1", "given twice"),
        ("limit port 99999 sessions 1", "invalid port"),
        ("limit from 10.0.0.1/8 sessions 1", "host bits"),
        ("limit via no/such sessions 1", "bad route name"),
    ],
)
def test_bad_lines_are_errors_naming_the_line(line: str, message: str) -> None:
    text = "allow user *\n\n" + line + "\n"
    with pytest.raises(RulesError, match=r":3: ") as caught:
        RuleSet.parse(text, "r.conf")
    assert message in str(caught.value)
    assert caught.value.line == 3


def test_names_that_are_kind_words_are_names() -> None:
    (line,) = RuleSet.parse("limit user rate, sessions rate 5/1s").limits
    assert line.when.users == ("rate", "sessions")
    assert line.kind == "rate"


def test_limits_follow_the_default_and_round_trip() -> None:
    rules = RuleSet.parse(EXAMPLE)
    assert RuleSet.parse(rules.render()) == rules
    assert rules != RuleSet.parse("allow user *\ndefault deny\n")


def test_the_kind_bounds_hold_for_lines_built_in_code() -> None:
    with pytest.raises(ValueError, match="impossible"):
        LimitLine(Rule(True), "sessions", count=0)
    with pytest.raises(ValueError, match="unknown limit"):
        LimitLine(Rule(True), "speed")


# -- properties -------------------------------------------------------------

_users = st.lists(
    st.from_regex(r"[a-z][a-z0-9_.-]{0,8}", fullmatch=True), min_size=1, max_size=3
)
_conditions = st.builds(
    lambda users, ports, via: Rule(True, users=users, ports=ports, via=via),
    st.none() | _users.map(tuple),
    st.none()
    | st.lists(st.integers(0, 65535).map(lambda p: (p, p)), min_size=1, max_size=2).map(
        tuple
    ),
    st.none() | st.sampled_from(["direct", "tor", "office-1"]),
)


def _line(kind: str, when: Rule, data: st.DataObject) -> LimitLine:
    if kind == "sessions":
        return LimitLine(when, kind, count=data.draw(st.integers(1, MAX_SESSIONS)))
    if kind == "rate":
        millis = data.draw(st.integers(1, int(MAX_INTERVAL * 1000)))
        return LimitLine(
            when,
            kind,
            count=data.draw(st.integers(1, MAX_RATE)),
            interval=millis / 1000,
        )
    if kind == "bandwidth":
        return LimitLine(
            when,
            kind,
            nbytes=data.draw(st.integers(1, MAX_BANDWIDTH)),
            scope=data.draw(st.sampled_from(SCOPES)),
        )
    return LimitLine(
        when,
        kind,
        nbytes=data.draw(st.integers(1, MAX_QUOTA)),
        period=data.draw(st.sampled_from(PERIODS)),
    )


@given(
    st.sampled_from(["sessions", "rate", "bandwidth", "quota"]), _conditions, st.data()
)
def test_every_line_round_trips(kind: str, when: Rule, data: st.DataObject) -> None:
    line = _line(kind, when, data)
    (parsed,) = RuleSet.parse(str(line)).limits
    assert parsed == line
    assert str(parsed) == str(line)


@given(
    st.decimals(min_value=0, max_value=10**6, places=3, allow_nan=False),
    st.sampled_from(sorted(UNITS)),
)
def test_any_amount_in_range_is_its_bytes(amount: object, unit: str) -> None:
    text = f"limit quota {amount}{unit}/day"
    nbytes = int(amount * UNITS[unit])  # type: ignore[operator]
    try:
        (line,) = RuleSet.parse(text).limits
    except RulesError as e:
        assert nbytes < 1 or nbytes > MAX_QUOTA, e
    else:
        assert line.nbytes == nbytes


_words = st.sampled_from(
    ["limit", "sessions", "rate", "bandwidth", "quota", "user", "from", "port",
     "per-user", "1", "0", "-1", "2MiB/s", "20/1s", "1GiB/day", "*", ",", "via",
     "10.0.0.0/8", "1e9", "NaN", "inf", "1GiB/", "/s"]
)  # fmt: skip


@given(st.lists(_words | st.text(max_size=8), max_size=8))
@example(["sessions", "1e9"])
@example(["rate", "inf/1s"])
def test_garbage_is_an_error_or_a_line_that_round_trips(words: list) -> None:
    text = "limit " + " ".join(words)
    try:
        rules = RuleSet.parse(text)
    except RulesError:
        return
    if rules.limits:
        (line,) = rules.limits
        (again,) = RuleSet.parse(str(line)).limits
        assert again == line


def _first(rules: RuleSet, kind: str) -> Optional[LimitLine]:
    return next((x for x in rules.limits if x.kind == kind), None)


def test_slots_say_which_lines_compete() -> None:
    rules = RuleSet.parse(EXAMPLE)
    assert [x.slot for x in rules.limits] == [
        "sessions",
        "bandwidth per-user",
        "bandwidth per-connection",
        "rate",
        "quota day",
        "quota month",
    ]
    assert _first(rules, "rate") is rules.limits[3]


def test_which_lines_apply_to_a_request() -> None:
    from twisted_socks5.codec import Address, Command

    rules = RuleSet.parse(
        "limit to 10.0.0.0/8 sessions 1\n"
        "limit to .example.com rate 5/1s\n"
        "limit user bob sessions 9\n"
        "limit via tor quota 1GiB/day\n"
        "allow user *\n"
    )
    name = Address.from_host("example.com", 80)
    ip = Address.from_host("192.0.2.1", 80)

    def kinds(destination: Address, user: str = "alice", via: Any = None) -> list:
        lines = rules.limits_for("127.0.0.1", user, Command.CONNECT, destination, via)
        return [(line.kind, line.line) for line in lines]

    # A name is not resolved yet: the network line applies (the stricter way).
    assert kinds(name) == [("sessions", 1), ("rate", 2)]
    assert kinds(ip, "bob") == [("sessions", 3)]
    assert kinds(ip) == []
    assert kinds(ip, via="tor") == [("quota", 4)]
    assert (
        RuleSet.parse("allow user *\n").limits_for(
            "127.0.0.1", "a", Command.CONNECT, ip
        )
        == ()
    )
