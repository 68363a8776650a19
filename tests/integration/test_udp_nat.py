"""
UDP ASSOCIATE and BIND behind NAT, on loopback aliases: the relay bound on
127.0.0.2 (``--udp-bind``), its ports forwarded from the "public" address
127.0.0.3 (``--udp-advertise``) by a small NAT-like forwarder, which also
gives each client a new source port, as a client's own NAT does.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
from typing import Any, Dict, List, Tuple

import pytest
import pytest_twisted
import socks
from conftest import all_closed
from helpers import until
from test_bind_udp import Control, UDPClient, UDPEcho, control, peer_connect
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.logger import globalLogPublisher

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_udp_datagram,
)

PUBLIC = "127.0.0.3"
PRIVATE = "127.0.0.2"
STRANGER = "127.0.0.9"


class PortForward:
    """
    A NAT in user space: datagrams to ``public``:P go to ``private``:P
    (a port forwarding), each source (ip, port) through a socket of its own
    bound on the same IP and a new port (a client's NAT: the relay never sees
    the port the client sent from); answers go back from ``public``:P.
    """

    def __init__(self, public: str, private: str, ports: range) -> None:
        self.private = private
        self.fronts: Dict[int, Any] = {}
        self.mappings: Dict[Tuple[Tuple[str, int], int], Any] = {}
        try:
            for port in ports:
                self.fronts[port] = reactor.listenUDP(
                    port, _Front(self, port), interface=public, maxPacketSize=65535
                )
        except Exception:
            self.close()
            raise

    def from_client(self, data: bytes, source: Tuple[str, int], port: int) -> None:
        key = (source, port)
        mapping = self.mappings.get(key)
        if mapping is None:
            mapping = self.mappings[key] = reactor.listenUDP(
                0, _Back(self, source, port), interface=source[0], maxPacketSize=65535
            )
        mapping.write(data, (self.private, port))

    def to_client(self, data: bytes, client: Tuple[str, int], port: int) -> None:
        self.fronts[port].write(data, client)

    def close(self) -> None:
        for port in [*self.fronts.values(), *self.mappings.values()]:
            port.stopListening()


class _Front(protocol.DatagramProtocol):
    def __init__(self, nat: PortForward, port: int) -> None:
        self.nat, self.port = nat, port

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        self.nat.from_client(data, addr, self.port)


class _Back(protocol.DatagramProtocol):
    def __init__(self, nat: PortForward, client: Tuple[str, int], port: int) -> None:
        self.nat, self.client, self.port = nat, client, port

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if addr == (self.nat.private, self.port):
            self.nat.to_client(data, self.client, self.port)


def _free_on(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@pytest.fixture
def nat() -> Any:
    """A forwarder of three ports free on both addresses, below the ephemeral ones."""
    for _ in range(50):
        low = random.randrange(20000, 30000)
        ports = range(low, low + 3)
        if all(_free_on(PRIVATE, p) for p in ports):
            try:
                forward = PortForward(PUBLIC, PRIVATE, ports)
            except CannotListenError:  # noqa: S112 - taken meanwhile: another range
                continue
            yield forward
            forward.close()
            return
    pytest.fail("no three free UDP ports on 127.0.0.2/127.0.0.3")


@pytest.fixture
def udp_sockets() -> Any:
    ports: List[Any] = []

    def listen(proto: Any, host: str) -> Any:
        port = reactor.listenUDP(0, proto, interface=host, maxPacketSize=65535)
        ports.append(port)
        return port

    yield listen
    for port in ports:
        port.stopListening()


def behind_nat(make_proxy: Any, nat: PortForward, **kw: Any) -> Tuple[Any, int]:
    """A proxy reached on the public address, its relays on the private one."""
    low, high = min(nat.fronts), max(nat.fronts)
    return make_proxy(
        PUBLIC,
        udp_bind=(PRIVATE,),
        udp_advertise=(PUBLIC,),
        udp_ports=(low, high),
        **kw,
    )


async def control_from(port: int, request: Request, source: str) -> Control:
    client = Control(request)
    endpoint = TCP4ClientEndpoint(reactor, PUBLIC, port, bindAddress=(source, 0))
    await connectProtocol(endpoint, client)
    return client


#: What clients behind NAT send: not their public address, or nothing.
DECLARED = {
    "zeros": Address.from_host("0.0.0.0", 0),
    "ipv6-zeros": Address.from_host("::", 0),
    "zeros-with-its-port": Address.from_host("0.0.0.0", 40404),
    "its-private-address": Address.from_host("192.168.1.5", 40404),
}


@pytest.mark.parametrize("declared", list(DECLARED.values()), ids=list(DECLARED))
@pytest_twisted.ensureDeferred
async def test_udp_through_a_nat_in_front_of_the_relay(
    make_proxy: Any, nat: PortForward, udp_sockets: Any, declared: Address
) -> None:
    factory, port = behind_nat(make_proxy, nat)
    echo = udp_sockets(UDPEcho(), "127.0.0.1").getHost().port
    client = await control_from(
        port, Request(Command.UDP_ASSOCIATE, declared), "127.0.0.1"
    )
    bound = (await client.reply(1)).address
    assert bound.type is AddressType.IPV4
    assert bound.host == PUBLIC and bound.port in nat.fronts
    (server_side,) = factory.active
    relay = server_side.udp.client_port_listener.getHost()
    assert (relay.host, relay.port) == (PRIVATE, bound.port)

    me, stranger = UDPClient(), UDPClient()
    udp_sockets(me, "127.0.0.1")
    udp_sockets(stranger, STRANGER)
    target = Address.from_host("127.0.0.1", echo)
    advertised = (bound.host, bound.port)
    # A stranger first, through the NAT and straight to the relay: dropped,
    # and the association learns nothing from it.
    stranger.transport.write(UDPDatagram(target, b"spoof").to_bytes(), advertised)
    stranger.transport.write(
        UDPDatagram(target, b"spoof").to_bytes(), (PRIVATE, relay.port)
    )
    drops = server_side.udp.counters.drops
    await until(lambda: drops["foreign_source"] == 2, "the stranger's drops")
    me.transport.write(UDPDatagram(target, b"via the nat").to_bytes(), advertised)
    data, source = await me.next()
    assert source == advertised
    assert parse_udp_datagram(data) == UDPDatagram(target, b"via the nat")
    # The relay saw the NAT's port, not the client's own.
    learnt = server_side.udp.client_port
    assert learnt != me.transport.getHost().port
    ((nat_source, _),) = [k for k in nat.mappings if k[0][0] == "127.0.0.1"]
    assert nat_source == ("127.0.0.1", me.transport.getHost().port)
    # From now on the learnt port only, even through the NAT.
    stranger.transport.write(UDPDatagram(target, b"late").to_bytes(), advertised)
    await until(lambda: drops["foreign_source"] == 3, "the late stranger's drop")
    assert stranger.received == []
    assert server_side.udp.counters.datagrams_up == 1
    client.transport.loseConnection()
    await all_closed(factory, 30)


@pytest_twisted.ensureDeferred
async def test_a_client_naming_its_own_address_keeps_its_port_even_behind_nat(
    make_proxy: Any, nat: PortForward, udp_sockets: Any
) -> None:
    """Documented: a client sure of its address and port is held to both."""
    factory, port = behind_nat(make_proxy, nat)
    me = UDPClient()
    mine = udp_sockets(me, "127.0.0.1").getHost().port
    client = await control_from(
        port,
        Request(Command.UDP_ASSOCIATE, Address.from_host("127.0.0.1", mine)),
        "127.0.0.1",
    )
    bound = (await client.reply(1)).address
    (server_side,) = factory.active
    target = Address.from_host("127.0.0.1", 9)
    me.transport.write(UDPDatagram(target, b"x").to_bytes(), (bound.host, bound.port))
    drops = server_side.udp.counters.drops
    await until(lambda: drops["foreign_source"] == 1, "the translated port's drop")
    client.transport.loseConnection()
    await all_closed(factory, 30)


def _pysocks_udp(proxy: Tuple[str, int], echo: Tuple[str, int]) -> Tuple[bytes, Any]:
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(20)
    s.set_proxy(socks.SOCKS5, *proxy)
    try:
        s.sendto(b"pysocks behind nat", echo)
        return s.recvfrom(65535)
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_pysocks_udp_through_the_advertised_address(
    make_proxy: Any, nat: PortForward, udp_sockets: Any
) -> None:
    """
    PySocks asks for ``0.0.0.0:ITS_PORT`` and sends to the proxy's host at
    the reply's port: through the forwarder here, which changes its port.
    """
    factory, port = behind_nat(make_proxy, nat)
    echo = udp_sockets(UDPEcho(), "127.0.0.1").getHost().port
    data, source = await threads.deferToThread(
        _pysocks_udp, (PUBLIC, port), ("127.0.0.1", echo)
    )
    assert (data, source) == (b"pysocks behind nat", ("127.0.0.1", echo))
    assert nat.mappings  # it went through the NAT
    await all_closed(factory, 30)


@pytest_twisted.ensureDeferred
async def test_udp_ports_exhausted_answers_0x01_and_logs(
    make_proxy: Any, nat: PortForward
) -> None:
    factory, port = behind_nat(make_proxy, nat)
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    request = Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0))
    try:
        held = [await control_from(port, request, "127.0.0.1") for _ in nat.fronts]
        ports = [(await c.reply(1)).address.port for c in held]
        assert sorted(ports) == sorted(nat.fronts)
        refused = await control_from(port, request, "127.0.0.1")
        assert (await refused.reply(1)).reply is ReplyCode.GENERAL_FAILURE
        await refused.closed
        # A port comes back once its association has gone.
        held[0].transport.loseConnection()
        await until(lambda: _free_on(PRIVATE, ports[0]), "the first relay closed")
        again = await control_from(port, request, "127.0.0.1")
        reply = await again.reply(1)
        assert (reply.reply, reply.address.port) == (ReplyCode.SUCCEEDED, ports[0])
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert any(e.get("event") == "socks5.udp_ports_exhausted" for e in events)
    for c in [*held, again]:
        c.transport.loseConnection()
    await all_closed(factory, 30)


# --------------------------------------------------------------------------
# BIND's first reply, and never an IPv4-mapped address to an IPv4 client


@pytest_twisted.ensureDeferred
async def test_bind_advertises_the_public_address(make_proxy: Any) -> None:
    _, port = make_proxy("127.0.0.1", bind_advertise=(PUBLIC, "::3"))
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("0.0.0.0", 0))
    )
    first = await client.reply(1)
    assert (first.address.type, first.address.host) == (AddressType.IPV4, PUBLIC)
    # The NAT would forward PUBLIC:P to where the proxy listens.
    connected, peer = peer_connect("127.0.0.1", first.address.port)
    await connected
    second = await client.reply(2)
    assert second.reply is ReplyCode.SUCCEEDED
    peer.transport.loseConnection()
    client.transport.loseConnection()
    await client.closed


def _dual_stack() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _dual_stack(), reason="no dual-stack IPv6 socket here")
@pytest.mark.parametrize(
    "advertise",
    [{}, {"udp_advertise": ("::3",), "bind_advertise": ("::3",)}],
    ids=["nothing-advertised", "only-ipv6-advertised"],
)
@pytest.mark.parametrize("command", [Command.UDP_ASSOCIATE, Command.BIND])
@pytest_twisted.ensureDeferred
async def test_an_ipv4_client_of_a_dual_stack_listener_gets_ipv4(
    make_proxy: Any, command: Command, advertise: Dict[str, Any]
) -> None:
    factory, port = make_proxy("::", **advertise)
    client = await control(
        port, "127.0.0.1", Request(command, Address.from_host("0.0.0.0", 0))
    )
    reply = await client.reply(1)
    assert reply.reply is ReplyCode.SUCCEEDED
    assert reply.address.type is AddressType.IPV4
    assert reply.address.host == "127.0.0.1"
    client.transport.loseConnection()
    await all_closed(factory, 30)


# --------------------------------------------------------------------------
# ncat


@pytest.mark.skipif(shutil.which("ncat") is None, reason="ncat is not installed")
@pytest_twisted.ensureDeferred
async def test_ncat_udp_through_socks5_is_a_tcp_connect(make_proxy: Any) -> None:
    """
    ``ncat --udp --proxy-type socks5`` (7.9x) does not use UDP ASSOCIATE: it
    sends a CONNECT and then the data over TCP.  Documented on the
    deployment page; this test notices when a newer ncat learns it.
    """
    factory, port = make_proxy()
    got: defer.Deferred[bytes] = defer.Deferred()

    class Once(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            if not got.called:
                got.callback(data)

    tcp = reactor.listenTCP(
        0, protocol.Factory.forProtocol(Once), interface="127.0.0.1"
    )
    events: List[Dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    target = tcp.getHost().port
    try:
        argv = ["ncat", "--udp", "--proxy", f"127.0.0.1:{port}"]
        argv += ["--proxy-type", "socks5", "127.0.0.1", str(target)]
        run = threads.deferToThread(
            subprocess.run, argv, input=b"datagram?\n", capture_output=True, timeout=30
        )
        assert await got.addTimeout(30, reactor) == b"datagram?\n"  # over TCP
        await run
        await all_closed(factory, 30)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await tcp.stopListening()
    commands = [e["command"] for e in events if e.get("event") == "socks5.connection"]
    assert commands == ["connect"]
