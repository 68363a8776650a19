"""
The text log observer for ``twistd --logger``: the same lines as Twisted's
``textFileLogObserver``, whatever the event.
"""

from __future__ import annotations

import io
import sys
from typing import Any, Dict, Optional

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import (
    ILogObserver,
    LogLevel,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.scripts.twistd import ServerOptions

from twisted_socks5.logs import (
    TextLogObserver,
    escape,
    escape_line,
    escape_word,
    text_observer,
)

_texts = st.text(max_size=40)
_times = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=4e9, allow_nan=False),
    st.integers(min_value=0, max_value=4_000_000_000),
)


@st.composite
def events(draw: Any) -> Dict[str, Any]:
    """Events as loggers make them, and odd ones as programs might."""
    event: Dict[str, Any] = {}
    fmt = draw(
        st.sampled_from(
            ["{summary}", "{x}", "{summary} and {x}", "plain", "{", "{summary!r}", ""]
        )
        | st.none()
        | _texts
    )
    if fmt is not None:
        event["log_format"] = fmt
    if draw(st.booleans()):
        event["summary"] = draw(st.one_of(_texts, st.integers(), st.none()))
    if draw(st.booleans()):
        event["x"] = draw(_texts)
    if draw(st.booleans()):
        event["log_system"] = draw(st.one_of(_texts, st.integers(), st.none()))
    if draw(st.booleans()):
        event["log_namespace"] = draw(st.one_of(_texts, st.none()))
    if draw(st.booleans()):
        event["log_level"] = draw(st.sampled_from(list(LogLevel.iterconstants())))
    when = draw(_times)
    if when is not None or draw(st.booleans()):
        event["log_time"] = when
    return event


def _twisted_text(event: Dict[str, Any]) -> str:
    out = io.StringIO()
    textFileLogObserver(out)(dict(event))
    return out.getvalue()


def _our_text(
    observer: TextLogObserver, out: io.StringIO, event: Dict[str, Any]
) -> str:
    start = out.tell()
    observer(dict(event))
    return out.getvalue()[start:]


@settings(max_examples=400, deadline=None)
@given(st.lists(events(), min_size=1, max_size=5))
def test_lines_are_twisteds_lines(batch: Any) -> None:
    """Byte for byte, for a run of events (the time stamp cache included)."""
    out = io.StringIO()
    observer = TextLogObserver(out)
    for event in batch:
        assert _our_text(observer, out, event) == _twisted_text(event)


def test_connection_event_line() -> None:
    """The connection event's shape: one field, newlines indented as Twisted does."""
    event = {
        "log_format": "{summary}",
        "summary": "127.0.0.1:5 None connect x:1 -> succeeded: closed\nsecond",
        "log_namespace": "twisted_socks5.server.SOCKS5ServerFactory",
        "log_level": LogLevel.info,
        "log_time": 1_700_000_000.75,
        "bytes_up": 64,
    }
    out = io.StringIO()
    TextLogObserver(out)(event)
    assert out.getvalue() == _twisted_text(event)
    assert out.getvalue().endswith("closed\n\tsecond\n")
    assert (
        "[twisted_socks5.server.SOCKS5ServerFactory#info] 127.0.0.1:5" in out.getvalue()
    )


def test_the_time_stamp_follows_the_clock_across_seconds() -> None:
    out = io.StringIO()
    observer = TextLogObserver(out)
    base = {"log_format": "{summary}", "summary": "s", "log_system": "-"}
    for when in (100.2, 100.9, 101.0, 99.5, 86500.0, 1.9999995, 2.0, 1.9999994):
        event = dict(base, log_time=when)
        assert _our_text(observer, out, event) == _twisted_text(event)


def test_failures_keep_their_traceback() -> None:
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        failure = Failure()
    event = {
        "log_format": "{summary}",
        "summary": "boom",
        "log_failure": failure,
        "log_time": 5.0,
        "log_system": "s",
    }
    out = io.StringIO()
    TextLogObserver(out)(dict(event))
    assert out.getvalue() == _twisted_text(event)
    assert "ZeroDivisionError" in out.getvalue()


class _CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_each_line_is_flushed_and_empty_events_write_nothing() -> None:
    out = _CountingStream()
    observer = TextLogObserver(out)
    observer({"log_format": "{summary}", "summary": "", "log_time": 1.0})
    observer({"log_time": 1.0})
    assert out.getvalue() == "" and out.flushes == 0
    observer({"log_format": "{summary}", "summary": "a", "log_time": 1.0})
    observer({"log_format": "b {summary}", "summary": "c", "log_time": 1.0})
    assert out.getvalue().count("\n") == 2 and out.flushes == 2


def test_many_formats_do_not_grow_the_cache_without_bound() -> None:
    out = io.StringIO()
    observer = TextLogObserver(out)
    for i in range(3000):
        observer({f"f{i}": "v", "log_format": f"{{f{i}}}", "log_time": 1.0})
    assert len(observer._fields) <= 1000
    assert out.getvalue().count("\n") == 3000


def test_factory_for_twistd_logger() -> None:
    """``--logger`` calls it with no arguments; it must be an ILogObserver."""
    observer = text_observer()
    assert ILogObserver.providedBy(observer)
    assert observer._stream is sys.stdout


def test_twistd_logger_option_takes_the_factory_by_name() -> None:
    """As documented: ``twistd --logger twisted_socks5.logs.text_observer``."""
    options = ServerOptions()
    options.parseOptions(["--logger", "twisted_socks5.logs.text_observer"])
    assert options["logger"] is text_observer


# --------------------------------------------------------------------------
# Escaping what came from the network


def _unescape(text: str) -> Optional[str]:
    """The inverse of ``escape`` (``None`` for ``-``), to show it is injective."""
    if text == "-":
        return None
    if text == '""':
        return ""
    out, i = [], 0
    widths = {"x": 2, "u": 4, "U": 8}
    while i < len(text):
        char = text[i]
        if char != "\\":
            out.append(char)
            i += 1
            continue
        kind = text[i + 1]
        if kind in widths:
            out.append(chr(int(text[i + 2 : i + 2 + widths[kind]], 16)))
            i += 2 + widths[kind]
        else:
            out.append({"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}[kind])
            i += 2
    return "".join(out)


@settings(max_examples=2000, deadline=None)
@given(st.one_of(st.none(), st.text(), st.sampled_from(["-", "", "\\", '"'])))
def test_escaped_text_is_printable_and_unambiguous(value: Optional[str]) -> None:
    escaped = escape(value)
    assert escaped and escaped.isprintable()
    assert not set(escaped) & {'"', "'"} or escaped == '""'
    assert _unescape(escaped) == value


@given(st.text())
def test_escape_line_keeps_tabs_and_escapes_the_rest(text: str) -> None:
    line = escape_line(text)
    assert all(c == "\t" or c.isprintable() for c in line)
    if text.isprintable():
        assert line == text


def test_escape_examples() -> None:
    assert escape("alice") == "alice"
    assert escape("bob\n2026-01-01 [-] forged") == "bob\\n2026-01-01 [-] forged"
    assert escape("\x1b[31mred") == "\\x1b[31mred"
    assert escape("a\\nb") == "a\\\\nb"
    assert escape("\u202eevil") == "\\u202eevil"
    assert escape("é") == "é"
    assert escape(None) == "-" and escape("-") == "\\x2d" and escape("") == '""'


@given(st.one_of(st.none(), st.text()))
def test_escaped_words_have_no_space_and_stay_unambiguous(value: Optional[str]) -> None:
    """User and target fields cannot forge the fields after them on a line."""
    word = escape_word(value)
    assert " " not in word and word.isprintable()
    assert _unescape(word) == value


def test_a_user_name_cannot_fake_the_rest_of_the_line() -> None:
    forged = "bob connect 10.0.0.1:22 -> succeeded"
    assert escape_word(forged) == "bob\\x20connect\\x2010.0.0.1:22\\x20->\\x20succeeded"
