"""BIND and UDP ASSOCIATE on real sockets, IPv4 and IPv6."""

from __future__ import annotations

import socket
from typing import Any, List, Optional, Tuple

import pytest
import pytest_twisted
import socks
from conftest import LOOPBACKS, all_closed, until
from helpers import within
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_reply,
    parse_udp_datagram,
)


class Control(protocol.Protocol):
    """A raw SOCKS client for BIND / UDP ASSOCIATE; collects replies."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.buffer = b""
        self.replies: List[Any] = []
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()
        self._waiters: List[Tuple[int, defer.Deferred[Any]]] = []

    def connectionMade(self) -> None:
        self.transport.write(b"\x05\x01\x00" + self.request.to_bytes())

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        if self.buffer.startswith(b"\x05\x00") and not self.replies:
            self.buffer = self.buffer[2:]
            self.replies.append("method")
        while len(self.replies) < 3:
            parsed = parse_reply(self.buffer)
            if parsed is None:
                break
            reply, used = parsed
            self.buffer = self.buffer[used:]
            self.replies.append(reply)
            if reply.reply is not ReplyCode.SUCCEEDED:
                break
        if len(self.replies) >= 3 or (
            len(self.replies) == 2 and self.request.command is Command.UDP_ASSOCIATE
        ):
            self.data += self.buffer
            self.buffer = b""
        self._wake()

    def _wake(self) -> None:
        for count, d in list(self._waiters):
            if len(self.replies) - 1 >= count:
                self._waiters.remove((count, d))
                d.callback(self.replies[count])

    def reply(self, number: int) -> defer.Deferred[Any]:
        """Fires with the ``number``-th reply (1 = first)."""
        d: defer.Deferred[Any] = defer.Deferred()
        self._waiters.append((number, d))
        self._wake()
        return d.addTimeout(20, reactor)

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


async def control(port: int, host: str, request: Request) -> Control:
    client = Control(request)
    endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    await connectProtocol(endpoint_class(reactor, host, port), client)
    return client


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.closed.callback(None)


def peer_connect(host: str, port: int, source: Optional[str] = None) -> Any:
    endpoint_class = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    kw = {"bindAddress": (source, 0)} if source else {}
    peer = Collect()
    return connectProtocol(endpoint_class(reactor, host, port, **kw), peer), peer


# --------------------------------------------------------------------------
# BIND


@pytest.mark.parametrize("host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_bind_end_to_end(make_proxy: Any, host: str) -> None:
    _, port = make_proxy(host)
    client = await control(
        port, host, Request(Command.BIND, Address.from_host(host, 0))
    )
    first = await client.reply(1)
    assert first.reply is ReplyCode.SUCCEEDED
    assert first.address.host == host and first.address.port != 0
    connected, peer = peer_connect(host, first.address.port)
    peer_proto = await connected
    second = await client.reply(2)
    assert second.reply is ReplyCode.SUCCEEDED
    assert second.address == Address.from_host(
        host, peer_proto.transport.getHost().port
    )
    peer_proto.transport.write(b"from the peer")
    client.transport.write(b"from the client")
    await until(
        lambda: client.data == b"from the peer" and peer.data == b"from the client",
        "both sides' data",
    )
    # half-close from the peer: the client sees EOF and can still send
    peer_proto.transport.loseWriteConnection()
    client.transport.loseConnection()
    await within(client.closed, "client closed")
    await within(peer.closed, "peer closed")


@pytest_twisted.ensureDeferred
async def test_bind_refuses_an_unexpected_peer(make_proxy: Any) -> None:
    _, port = make_proxy()
    expected = "127.0.0.2"
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host(expected, 0))
    )
    first = await client.reply(1)
    wrong, wrong_peer = peer_connect("127.0.0.1", first.address.port, "127.0.0.3")
    await wrong
    await within(wrong_peer.closed, "wrong peer closed")  # the proxy hung up on it
    assert len(client.replies) == 2  # method + first reply only: still waiting
    right, _ = peer_connect("127.0.0.1", first.address.port, expected)
    await right
    second = await client.reply(2)
    assert second.address.host == expected
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_bind_timeout(make_proxy: Any) -> None:
    _, port = make_proxy(bind_timeout=0.2)
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("127.0.0.1", 0))
    )
    first = await client.reply(1)
    second = await client.reply(2)
    assert second.reply is ReplyCode.TTL_EXPIRED
    await within(client.closed, "client closed")
    with pytest.raises(Exception, match="refused"):
        connected, _ = peer_connect("127.0.0.1", first.address.port)
        await connected


@pytest_twisted.ensureDeferred
async def test_bind_port_closes_when_the_client_leaves(make_proxy: Any) -> None:
    factory, port = make_proxy()
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("127.0.0.1", 0))
    )
    first = await client.reply(1)
    client.transport.loseConnection()
    await within(client.closed, "client closed")
    await all_closed(factory, 30)
    with pytest.raises(Exception, match="refused"):
        connected, _ = peer_connect("127.0.0.1", first.address.port)
        await connected


# --------------------------------------------------------------------------
# UDP ASSOCIATE


class UDPEcho(protocol.DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.transport.write(datagram, addr)


class UDPClient(protocol.DatagramProtocol):
    def __init__(self) -> None:
        self.received: List[Tuple[bytes, Any]] = []
        self.waiting: List[defer.Deferred[Tuple[bytes, Any]]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, addr))
        if self.waiting:
            self.waiting.pop(0).callback((datagram, addr))

    def next(self) -> defer.Deferred[Tuple[bytes, Any]]:
        if self.received:
            return defer.succeed(self.received.pop(0))
        d: defer.Deferred[Tuple[bytes, Any]] = defer.Deferred()
        self.waiting.append(d)
        return d.addTimeout(20, reactor)


@pytest.fixture
def udp_ports() -> Any:
    ports: List[Any] = []

    def listen(proto: Any, host: str) -> Any:
        port = reactor.listenUDP(0, proto, interface=host, maxPacketSize=65535)
        ports.append(port)
        return port

    yield listen
    for port in ports:
        port.stopListening()


async def associate(port: int, listen_udp: Any) -> Tuple[Control, UDPClient, Address]:
    """
    A UDP association from 127.0.0.1 (``listen_udp``: the ``udp_ports``
    fixture): the control connection, the client's socket, the relay address.
    """
    client = await control(
        port,
        "127.0.0.1",
        Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)),
    )
    bound = (await client.reply(1)).address
    me = UDPClient()
    listen_udp(me, "127.0.0.1")
    return client, me, bound


@pytest.mark.parametrize("host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_udp_associate_echo(make_proxy: Any, udp_ports: Any, host: str) -> None:
    factory, port = make_proxy(host)
    echo = udp_ports(UDPEcho(), host).getHost().port
    client = await control(
        port, host, Request(Command.UDP_ASSOCIATE, Address.from_host(host, 0))
    )
    bound = (await client.reply(1)).address
    assert bound.host == host
    me = UDPClient()
    udp_ports(me, host)
    target = Address.from_host(host, echo)
    # Larger than Twisted's default 8 KiB read: must pass whole both ways.
    payload = bytes(range(256)) * 255
    me.transport.write(
        UDPDatagram(target, payload).to_bytes(), (bound.host, bound.port)
    )
    data, source = await me.next()
    assert source[1] == bound.port
    assert parse_udp_datagram(data) == UDPDatagram(target, payload)
    (server_side,) = factory.active
    assert server_side.udp.counters.datagrams_down == 1
    client.transport.loseConnection()
    await within(client.closed, "client closed")
    await all_closed(factory, 30)
    assert server_side.udp.closed


@pytest_twisted.ensureDeferred
async def test_udp_largest_ipv4_datagram(make_proxy: Any, udp_ports: Any) -> None:
    _, port = make_proxy()
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    target = Address.from_host("127.0.0.1", echo)
    payload = b"x" * (65507 - 10)  # the largest an IPv4 datagram with header holds
    me.transport.write(
        UDPDatagram(target, payload).to_bytes(), (bound.host, bound.port)
    )
    data, _ = await me.next()
    assert len(parse_udp_datagram(data).data) == len(payload)
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_udp_domain_target_foreign_source_and_fragments(
    make_proxy: Any, udp_ports: Any
) -> None:
    factory, port = make_proxy()
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client = await control(
        port,
        "127.0.0.1",
        Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)),
    )
    bound = (await client.reply(1)).address
    to = (bound.host, bound.port)
    me = UDPClient()
    udp_ports(me, "127.0.0.1")
    stranger = UDPClient()
    udp_ports(stranger, "127.0.0.2")
    name = Address(AddressType.DOMAIN, "echo.test", echo)
    me.transport.write(UDPDatagram(name, b"frag", fragment=1).to_bytes(), to)
    stranger.transport.write(UDPDatagram(name, b"spoof").to_bytes(), to)
    me.transport.write(UDPDatagram(name, b"by name").to_bytes(), to)
    data, _ = await me.next()
    answer = parse_udp_datagram(data)
    assert answer.data == b"by name"
    assert answer.address.type is not AddressType.DOMAIN  # the real source
    (server_side,) = factory.active
    drops = server_side.udp.counters.drops
    assert drops["fragmented"] == 1
    assert drops["foreign_source"] == 1
    assert stranger.received == []
    client.transport.loseConnection()


def _pysocks_udp(proxy_port: int, echo_port: int) -> Tuple[bytes, Any]:
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(20)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port)
    try:
        s.sendto(b"pysocks datagram", ("127.0.0.1", echo_port))
        return s.recvfrom(65535)
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_pysocks_udp_client(make_proxy: Any, udp_ports: Any) -> None:
    _, port = make_proxy()
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    data, source = await threads.deferToThread(_pysocks_udp, port, echo)
    assert data == b"pysocks datagram"
    assert source == ("127.0.0.1", echo)


@pytest_twisted.ensureDeferred
async def test_bind_never_listens_on_the_port_a_client_picks(make_proxy: Any) -> None:
    """Without --bind-ports, 0.0.0.0:PORT gets a port the system chooses."""
    from conftest import closed_port

    _, port = make_proxy()
    wanted = closed_port()
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("0.0.0.0", wanted))
    )
    first = await client.reply(1)
    assert first.reply is ReplyCode.SUCCEEDED
    assert first.address.port not in (wanted, 0)
    client.transport.loseConnection()
    await within(client.closed, "client closed")


@pytest_twisted.ensureDeferred
async def test_bind_gets_the_requested_port_or_another(make_proxy: Any) -> None:
    from conftest import closed_port

    wanted = closed_port()
    _, port = make_proxy(bind_ports=(wanted, wanted))
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("0.0.0.0", wanted))
    )
    first = await client.reply(1)
    assert first.address.port == wanted
    # The same port again is taken now: the proxy falls back to a free one.
    other = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("0.0.0.0", wanted))
    )
    second = await other.reply(1)
    assert second.reply is ReplyCode.SUCCEEDED and second.address.port != wanted
    client.transport.loseConnection()
    other.transport.loseConnection()
    await within(client.closed, "client closed")
    await other.closed


@pytest_twisted.ensureDeferred
async def test_udp_sends_past_twisted_address_checks_on_real_ports_only() -> None:
    """udp.sender_for: a real port's socket sends; a double gets write()."""
    from twisted.internet.protocol import DatagramProtocol

    from twisted_socks5.udp import sender_for

    got: defer.Deferred[bytes] = defer.Deferred()

    class Receiver(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            got.callback(data)

    receiver = reactor.listenUDP(0, Receiver(), interface="127.0.0.1")
    sender = reactor.listenUDP(0, DatagramProtocol(), interface="127.0.0.1")
    try:
        send = sender_for(sender)
        assert send == sender.getHandle().sendto
        send(b"datagram", ("127.0.0.1", receiver.getHost().port))
        assert await got == b"datagram"
        with pytest.raises(OSError):  # errors are the caller's (a drop)
            send(b"x" * 70000, ("127.0.0.1", receiver.getHost().port))
    finally:
        await receiver.stopListening()
        await sender.stopListening()

    class Double:
        def write(self, data: bytes, addr: Any) -> None:
            pass

    double = Double()
    assert sender_for(double) == double.write
