"""
What a PROXY header may claim, on real sockets behind ``haproxy:``: a source
that is no IP address names no client (refused, and never logged raw), and
the destination it claims does not make a client local (the factory's
default host protection treats every client behind a PROXY header as from
outside, since the client writes the header itself when no balancer does).
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import all_closed
from test_errors import connect_request, exchange, failure
from test_limits_server import GREETING, _header, haproxy  # noqa: F401 - fixture
from twisted.internet import protocol

from twisted_socks5.codec import ReplyCode


class Greet(protocol.Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"hi")
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_a_header_that_names_no_ip_is_refused_and_escaped(
    haproxy: Any,  # noqa: F811 - the fixture
    log_events: Any,
) -> None:
    factory, port = await haproxy(max_connections=10, max_per_client=0)
    source = "ev\x1b]0;PWNED\x07il"
    header = f"PROXY TCP4 {source} 127.0.0.1 5555 1080\r\n".encode()
    assert await exchange(port, header + GREETING) == b""
    await all_closed(factory)
    refused = [e for e in log_events if e.get("kind") == "bad_proxy_header"]
    assert refused, [e.get("event") for e in log_events]
    assert "\x1b" not in refused[0]["client"] and "\x07" not in refused[0]["client"]
    assert factory.limits.total == 0


@pytest_twisted.ensureDeferred
async def test_behind_a_proxy_header_the_host_is_protected_by_default(
    haproxy: Any,  # noqa: F811 - the fixture
    tcp_target: Any,
) -> None:
    factory, port = await haproxy(
        protect_host="when-exposed", max_connections=10, max_per_client=0
    )
    target = tcp_target(Greet)
    # The header claims the client connected to 127.0.0.1: it may not be so.
    out = await exchange(
        port, _header("127.0.0.1") + GREETING + connect_request("127.0.0.1", target)
    )
    assert out == b"\x05\x00" + failure(ReplyCode.CONNECTION_NOT_ALLOWED)
    await all_closed(factory)
