"""
A finished connection is freed by reference counting alone.

A reference cycle per connection (the protocol kept bound methods of itself)
left every connection for the cyclic garbage collector: under churn that
was hundreds of collections a second, and full ones walked the whole heap.
With the collector off, the server's protocol, both transports and the
destination's protocol must be gone as soon as the connection is.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from conftest import listen, until
from test_errors import RawClient
from twisted.internet import protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_socks5.codec import Address, AddressType, Command, Request
from twisted_socks5.server import SOCKS5ServerProtocol


class _EchoThenClose(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.loseConnection()


@pytest.fixture
def collector_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "splice, password", [(False, False), (True, False), (False, True)]
)
@pytest_twisted.ensureDeferred
async def test_a_closed_tunnel_leaves_no_reference_cycle(
    make_proxy: Any,
    collector_off: None,
    monkeypatch: pytest.MonkeyPatch,
    splice: bool,
    password: bool,
) -> None:
    from test_clients import userpass

    target = listen(protocol.Factory.forProtocol(_EchoThenClose), "127.0.0.1")
    extra = {"authenticators": [userpass(alice="s3cret")]} if password else {}
    factory, port = make_proxy(splice=splice, splice_after=0, **extra)
    refs: List[Any] = []
    opened = factory.connection_opened

    def tracked(p: Any) -> None:  # holds no reference to p: no cycle of ours
        refs.extend([weakref.ref(p), weakref.ref(p.transport)])
        opened(p)

    factory.connection_opened = tracked  # type: ignore[method-assign]
    start_tunnel = SOCKS5ServerProtocol.start_tunnel

    def tracked_relay(self: Any, peer: Any) -> None:  # the destination's side
        refs.extend([weakref.ref(peer), weakref.ref(peer.transport)])
        start_tunnel(self, peer)

    monkeypatch.setattr(SOCKS5ServerProtocol, "start_tunnel", tracked_relay)
    request = Request(
        Command.CONNECT, Address(AddressType.IPV4, "127.0.0.1", target.getHost().port)
    )
    greeting = b"\x05\x01\x02\x01\x05alice\x06s3cret" if password else b"\x05\x01\x00"
    client = RawClient(greeting + request.to_bytes() + b"ping")
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    received = await client.done.addTimeout(20, reactor)
    assert received.endswith(b"ping")
    await until(lambda: not factory.active, "the server's close")
    await target.stopListening()
    assert len(refs) == 4
    alive = [ref() for ref in refs]
    assert alive == [None] * 4, [gc.get_referrers(o) for o in alive if o]
