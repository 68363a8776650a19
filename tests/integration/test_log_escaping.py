"""
Names and users from the wire cannot forge a log line or reach the
operator's terminal: not in the text log, the JSON log, nor through the
``--workers`` relay.
"""

from __future__ import annotations

import io
import json
import os
import signal
from typing import Any, Iterator, Tuple

import pytest
import pytest_twisted
from conftest import all_closed
from test_errors import exchange
from test_twistd import TWISTD, Twistd
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher, jsonFileLogObserver

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Request,
    UserPassRequest,
)
from twisted_socks5.logs import TextLogObserver
from twisted_socks5.workers import _WorkerProcess

#: A username that would start a line of its own, then turn the terminal red.
EVIL = "eve\n2026-01-01T00:00:00+0000 [-] forged \x1b[31mred"
EVIL_ESCAPED = "eve\\n2026-01-01T00:00:00+0000 [-] forged \\x1b[31mred"
#: The same as a field of the line (client, user, target): spaces escaped too,
#: so the value cannot fake the fields after it.
EVIL_WORD = EVIL_ESCAPED.replace(" ", "\\x20")
FORGED = "\n2026-01-01T00:00:00+0000 [-] forged"


def _bad_login(user: str) -> bytes:
    return b"\x05\x01\x02" + UserPassRequest(user.encode(), b"wrong").to_bytes()


def _connect_by_name(name: str) -> bytes:
    request = Request(Command.CONNECT, Address(AddressType.DOMAIN, name, 80))
    return b"\x05\x01\x00" + request.to_bytes()


@pytest.fixture
def logs() -> Iterator[Tuple[io.StringIO, io.StringIO]]:
    text, js = io.StringIO(), io.StringIO()
    observers = [TextLogObserver(text), jsonFileLogObserver(js)]
    for observer in observers:
        globalLogPublisher.addObserver(observer)
    yield text, js
    for observer in observers:
        globalLogPublisher.removeObserver(observer)


def _assert_safe(output: str) -> None:
    assert FORGED not in output
    assert "\x1b" not in output
    assert all(c.isprintable() or c in "\n\t" for c in output)


@pytest_twisted.ensureDeferred
async def test_a_hostile_user_and_name_are_escaped_in_text_and_json(
    make_proxy: Any, logs: Tuple[io.StringIO, io.StringIO]
) -> None:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {b"alice": b"s3cret"}
    factory, port = make_proxy(
        authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)]
    )
    await exchange(port, _bad_login(EVIL))
    await all_closed(factory)
    _, noauth = make_proxy()
    await exchange(noauth, _connect_by_name(EVIL.replace("eve", "host")))
    await all_closed(_)
    text, js = (out.getvalue() for out in logs)
    _assert_safe(text)
    assert "127.0.0.1:" in text and f" {EVIL_WORD} - - -> -: " in text
    assert f" - connect {EVIL_WORD.replace('eve', 'host')}:80 -> " in text
    parsed = [json.loads(line) for line in js.split("\x1e") if line.strip()]
    connections = [e for e in parsed if e.get("event") == "socks5.connection"]
    assert [e["user"] for e in connections] == [EVIL_WORD, None]
    assert connections[1]["target"] == EVIL_WORD.replace("eve", "host") + ":80"
    for e in connections:
        assert "\n" not in e["summary"] and "\x1b" not in e["summary"]
        assert " None " not in e["summary"]


@pytest.mark.skipif(not os.path.exists(TWISTD), reason="twistd is not installed")
@pytest_twisted.ensureDeferred
async def test_a_hostile_user_is_escaped_through_the_workers_relay(
    tmp_path: Any,
) -> None:
    process = Twistd.start(tmp_path, "--workers", "2", "--auth", "memory:alice:s3cret")
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"worker 1 started").addTimeout(30, reactor)
        await exchange(port, _bad_login(EVIL))
        await process.wait_for(b"authentication failed").addTimeout(30, reactor)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
    output = b"".join(process.output).decode()
    _assert_safe(output)
    (line,) = [x for x in output.splitlines() if "authentication failed" in x]
    assert "[worker " in line and EVIL_WORD in line


def test_the_workers_relay_escapes_what_a_worker_prints(log_events: Any) -> None:
    """Whatever a worker writes, one line stays one line, without escapes."""

    class Supervisor:
        reactor = MemoryReactorClock()

    worker = _WorkerProcess(Supervisor(), 3)  # type: ignore[arg-type]
    worker.outReceived(b"a \x1b[31mred\rline\n\tcontinued\npartial")
    lines = [e["line"] for e in log_events if "line" in e]
    assert lines == ["a \\x1b[31mred\\rline", "\tcontinued"]
