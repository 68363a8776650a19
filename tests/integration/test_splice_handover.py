"""
Tunnels start on the copying relay and are handed to the splice relay once
they have moved ``splice_after`` bytes: short tunnels never hold pipes, a
hand-over whose buffers do not drain is called off, and pipes are only taken
from descriptors that no connection needs.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from conftest import Source, until
from test_relay_paths import (
    GREETING,
    Client,
    connect,
    fd_count,
)
from twisted.internet import reactor

import twisted_socks5.splice as splice_module
from twisted_socks5.codec import Address, Command, Request
from twisted_socks5.server import DEFAULT_SPLICE_AFTER
from twisted_socks5.splice import splice_available
from twisted_socks5.testing import pattern_chunk, pattern_sha256

pytestmark = pytest.mark.skipif(not splice_available(), reason="os.splice needs Linux")


class _Proxy:
    def __init__(self, make_proxy: Any, **kwargs: Any) -> None:
        self.factory, self.port = make_proxy(splice=True, **kwargs)

    def request(self, port: int) -> bytes:
        return (
            GREETING
            + Request(Command.CONNECT, Address.from_host("127.0.0.1", port)).to_bytes()
        )


@pytest_twisted.ensureDeferred
async def test_short_tunnels_copy_and_hold_two_descriptors_long_ones_splice(
    make_proxy: Any, tcp_target: Any
) -> None:
    proxy = _Proxy(make_proxy)  # the default threshold
    assert proxy.factory.splice_after == DEFAULT_SPLICE_AFTER == 64 * 1024
    source = tcp_target(Source)

    # A short answer: copied, and the open tunnel holds just its two sockets.
    before = fd_count()
    short = await connect(proxy, Client(proxy.request(source), early=b"1000\n"))
    await short.eof.addTimeout(30, reactor)
    (server,) = proxy.factory.active
    assert bytes(short.data) == pattern_chunk(0)[:1000]
    assert server.tunnel.splice is None
    # Our client's socket and the proxy's two (the target closed its own).
    assert fd_count() - before == 3
    short.transport.loseConnection()
    await short.lost
    await until(lambda: not proxy.factory.active, "the short tunnel closed")

    # A long one: handed over after 64 KiB, intact, pipes given back after.
    size = 4 << 20
    long = await connect(proxy, Client(proxy.request(source), early=b"%d\n" % size))
    await long.eof.addTimeout(60, reactor)
    (server,) = proxy.factory.active
    assert server.tunnel.splice is not None and server.tunnel.splice.started
    assert len(long.data) == size
    assert hashlib.sha256(long.data).hexdigest() == pattern_sha256(size)
    # The copying relay carried the first bytes, the splice relay the rest.
    assert server.counters.bytes_down == size
    long.transport.loseConnection()
    await long.lost
    await until(lambda: not proxy.factory.active, "the long tunnel closed")
    assert proxy.factory.limits.spliced == 0
    assert fd_count() == before


class _NeverDrains(splice_module._WhenFlushed):
    """
    Stands for a peer that never takes the bytes Twisted holds for it.  (On
    loopback a real one cannot be arranged: whenever the peer sends, its
    kernel compacts its receive queue and opens the window again.)
    """

    def resumeProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_a_hand_over_that_cannot_drain_is_called_off(
    make_proxy: Any, tcp_target: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    A hand-over stops reading both ways until Twisted's buffers drain; a
    peer that only reads once its own writes complete would wait on us for
    ever.  After the grace period the copying relay goes on, intact.
    """
    monkeypatch.setattr(splice_module, "HANDOVER_GRACE", 0.05)
    monkeypatch.setattr(splice_module, "_WhenFlushed", _NeverDrains)
    proxy = _Proxy(make_proxy, splice_after=1)
    source = tcp_target(Source)
    before = fd_count()
    size = 1 << 20
    client = await connect(proxy, Client(proxy.request(source), early=b"%d\n" % size))
    await client.relaying
    (server,) = proxy.factory.active
    relay = server.tunnel.splice
    assert relay is not None and not relay.started, "no hand-over began"
    assert proxy.factory.limits.spliced == 1
    await client.eof.addTimeout(60, reactor)
    assert relay.stopped and not relay.started
    assert server.tunnel.splice is None
    assert proxy.factory.limits.spliced == 0
    assert hashlib.sha256(client.data).hexdigest() == pattern_sha256(size)
    # Our client's socket and the proxy's two; the pipes were closed.
    assert fd_count() - before == 3
    client.transport.loseConnection()
    await client.lost


@pytest_twisted.ensureDeferred
async def test_no_pipes_when_descriptors_run_short(
    make_proxy: Any, tcp_target: Any
) -> None:
    proxy = _Proxy(make_proxy, splice_after=1)
    limits = proxy.factory.limits
    # Room for the connections, none for a pipe pair.
    limits.fd_budget = (limits.total + 1) * limits.fds_per_connection + 3
    source = tcp_target(Source)
    size = 1 << 20
    client = await connect(proxy, Client(proxy.request(source), early=b"%d\n" % size))
    await client.eof.addTimeout(60, reactor)
    (server,) = proxy.factory.active
    assert server.tunnel.splice is None
    assert hashlib.sha256(client.data).hexdigest() == pattern_sha256(size)
    client.transport.loseConnection()
    await client.lost
