"""
A login's outcome that arrives too late decides nothing: a check answered
after the server closed the connection grants nothing and counts no
failure, and a right password whose check ran while its address became
throttled is refused even when no request follows it.  In memory.
"""

from __future__ import annotations

from typing import Any

from test_auth import (
    GREET_USERPASS,
    REFUSED,
    _said,
    login,
    open_clients,
    plugin_harness,
    slow_harness,
)
from twisted.internet import defer

from twisted_socks5.codec import UserPassRequest
from twisted_socks5.interfaces import AuthStep
from twisted_socks5.server import State


def test_a_right_password_checked_while_throttled_is_refused_alone() -> None:
    h, checker = slow_harness(per_client=0)
    right, *wrong = open_clients(h, 4)
    # No request after the credentials: nothing else parses after the check.
    right.dataReceived(GREET_USERPASS + UserPassRequest(b"alice", b"s3cret").to_bytes())
    for protocol in wrong:
        protocol.dataReceived(login(b"alice", b"wrong"))
    for _ in wrong:
        checker.answer(1)
    checker.answer(0)
    assert _said(right) == REFUSED
    assert right.state is State.CLOSING and right.user is None
    assert right.transport.disconnecting


def test_a_right_password_answered_after_the_client_eof_grants_nothing() -> None:
    h, checker = slow_harness()
    (client,) = open_clients(h, 1)
    client.dataReceived(login(b"alice", b"s3cret"))
    client.readConnectionLost()  # EOF while the check runs: the server closes
    assert client.state is State.CLOSING
    assert not client.transport.disconnected  # the close is still under way
    checker.answer()
    assert _said(client) == b""
    assert client.state is State.CLOSING and client.user is None
    assert h.connector.calls == []


def test_a_plugin_failing_after_the_client_eof_counts_no_failure() -> None:
    d: defer.Deferred[Any] = defer.Deferred()
    steps = [AuthStep(1, d)]
    h = plugin_harness(received=lambda data: steps.pop() if steps else None)
    h.send(b"\x05\x01\x80" + b"T")
    assert h.take() == b"\x05\x80"
    h.protocol.readConnectionLost()
    assert h.protocol.state is State.CLOSING
    assert not h.transport.disconnected
    d.errback(RuntimeError("backend down"))
    assert h.protocol.outcome != "authenticator error"
    assert h.factory.limits._recent_failures("127.0.0.1") == 0
