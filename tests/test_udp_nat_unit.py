"""
UDP behind NAT, in memory: where the relay binds, which ports it takes,
what the replies advertise, and how a client that does not know its own
address is recognised (docs/deployment.rst, "Behind NAT").
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import pytest
from helpers import FakeConnector, FakeUDPPort, UDPReactor
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import CannotListenError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python import usage

from twisted_socks5.codec import (
    NULL_ADDRESS,
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_reply,
)
from twisted_socks5.options import Options
from twisted_socks5.rules import Decision
from twisted_socks5.server import SOCKS5ServerFactory, State
from twisted_socks5.tap import build_factory
from twisted_socks5.testing import HalfCloseTransport
from twisted_socks5.udp import PortRange

GREET = b"\x05\x01\x00"
TARGET = Address.from_host("127.0.0.20", 53)
V4 = (IPv4Address("TCP", "127.0.0.1", 1080), IPv4Address("TCP", "127.0.0.1", 40000))
V6 = (IPv6Address("TCP", "::1", 1080), IPv6Address("TCP", "::1", 40000))
#: A dual-stack listener's view of an IPv4 client.
MAPPED = (
    IPv6Address("TCP", "::ffff:127.0.0.1", 1080),
    IPv6Address("TCP", "::ffff:127.0.0.1", 40000),
)


class RangeReactor(UDPReactor):
    """listenUDP on the port asked for; ``busy`` ports are another's."""

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[int] = set()
        self.stopped: List[defer.Deferred[None]] = []

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> FakeUDPPort:
        if port in self.busy:
            raise CannotListenError(interface, port, OSError("in use"))
        fake = super().listenUDP(port, protocol, interface, maxPacketSize)
        if port:
            fake.port = port
            self.busy.add(port)
        reactor = self

        def stop() -> defer.Deferred[None]:
            # As Twisted's: the socket closes a turn later, then the Deferred fires.
            fake.listening = False
            d: defer.Deferred[None] = defer.Deferred()
            d.addCallback(lambda _: reactor.busy.discard(fake.port))
            reactor.stopped.append(d)
            return d

        fake.stopListening = stop  # type: ignore[method-assign]
        return fake

    def close_sockets(self) -> None:
        stopped, self.stopped = self.stopped, []
        for d in stopped:
            d.callback(None)


class Client:
    """One control connection on a factory, in memory."""

    def __init__(
        self,
        factory: SOCKS5ServerFactory,
        ends: Tuple[Any, Any] = V4,
        declared: Address = NULL_ADDRESS,
        command: Command = Command.UDP_ASSOCIATE,
    ) -> None:
        local, peer = ends
        self.protocol = factory.buildProtocol(peer)
        self.transport = HalfCloseTransport(local, peer)
        self.protocol.makeConnection(self.transport)
        self.protocol.dataReceived(GREET + Request(command, declared).to_bytes())

    def reply(self) -> Reply:
        data = self.transport.value()
        assert data[:2] == b"\x05\x00"
        parsed = parse_reply(data[2:])
        assert parsed is not None
        return parsed[0]

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(ConnectionDone()))


def factory(reactor: Optional[UDPReactor] = None, **kw: Any) -> SOCKS5ServerFactory:
    return SOCKS5ServerFactory(
        reactor=reactor or UDPReactor(), connector=FakeConnector(), **kw
    )


def relay_of(f: SOCKS5ServerFactory, index: int = -1) -> FakeUDPPort:
    port: FakeUDPPort = f.reactor.udp_ports[index]
    return port


# --------------------------------------------------------------------------
# Who may use the association: pinned to the TCP peer's IP, the port
# learnt from the first datagram unless the client named its own IP.

#: Requests whose DST.ADDR is not the client's (TCP peer 127.0.0.1).
LEARNT = {
    "zeros": Address.from_host("0.0.0.0", 0),
    "ipv6-zeros": Address.from_host("::", 0),
    "zeros-with-a-port": Address.from_host("0.0.0.0", 7000),
    "ipv6-zeros-with-a-port": Address.from_host("::", 7000),
    "its-private-address-behind-nat": Address.from_host("192.168.1.5", 7000),
    "another-loopback-address": Address.from_host("127.0.0.9", 7000),
    "a-name": Address(AddressType.DOMAIN, "client.test", 7000),
    "its-own-address-no-port": Address.from_host("127.0.0.1", 0),
}


def _send(f: SOCKS5ServerFactory, source: Tuple[str, int], data: bytes = b"x") -> None:
    relay_of(f, 0).protocol.datagramReceived(
        UDPDatagram(TARGET, data).to_bytes(), source
    )


@pytest.mark.parametrize("declared", list(LEARNT.values()), ids=list(LEARNT))
def test_association_is_pinned_to_the_peer_ip_and_learns_the_port(
    declared: Address,
) -> None:
    f = factory()
    client = Client(f, declared=declared)
    assert client.reply().reply is ReplyCode.SUCCEEDED
    counters = client.protocol.udp.counters  # type: ignore[union-attr]
    # Never another IP, not even the one the request named, not even first.
    _send(f, ("127.0.0.9", 7000))
    _send(f, ("192.168.1.5", 7000))
    assert counters.drops["foreign_source"] == 2
    # The client's IP, from a port the NAT chose: learnt...
    _send(f, ("127.0.0.1", 6123))
    assert counters.datagrams_up == 1
    # ...and pinned.
    _send(f, ("127.0.0.1", 7000))
    assert counters.drops["foreign_source"] == 3
    _send(f, ("::ffff:127.0.0.1", 6123))
    assert counters.datagrams_up == 2


@pytest.mark.parametrize(
    "declared",
    [Address.from_host("127.0.0.1", 7000), Address.from_host("::ffff:127.0.0.1", 7000)],
    ids=["its-own-address", "its-own-address-ipv4-mapped"],
)
def test_a_client_naming_its_own_address_is_held_to_its_port(
    declared: Address,
) -> None:
    f = factory()
    client = Client(f, declared=declared)
    counters = client.protocol.udp.counters  # type: ignore[union-attr]
    _send(f, ("127.0.0.1", 6123))
    assert counters.drops["foreign_source"] == 1
    _send(f, ("127.0.0.1", 7000))
    assert counters.datagrams_up == 1


class Spy:
    """A policy that allows everything and records what it was asked."""

    def __init__(self) -> None:
        self.requests: List[Address] = []
        self.resolved: List[str] = []

    def check_client(self, client: Any) -> Decision:
        return Decision(True, "spy")

    def check_request(
        self, client: Any, user: Any, command: Command, destination: Address
    ) -> Decision:
        self.requests.append(destination)
        return Decision(True, "spy", final=False)

    def check_resolved(
        self, client: Any, user: Any, command: Command, destination: Address, ip: Any
    ) -> Decision:
        self.resolved.append(str(ip))
        return Decision(True, "spy")


@pytest.mark.parametrize("declared", list(LEARNT.values()), ids=list(LEARNT))
def test_rules_never_see_the_request_address(declared: Address) -> None:
    """The ASSOCIATE's DST is the client's own source, never a destination."""
    spy = Spy()
    f = factory(policy=spy)
    client = Client(f, declared=declared)
    assert client.reply().reply is ReplyCode.SUCCEEDED
    assert spy.requests == [NULL_ADDRESS]


@pytest.mark.parametrize("to", ["0.0.0.0", "0.1.2.3", "::", "::ffff:0.0.0.0"])
def test_datagrams_to_an_unspecified_address_never_reach_the_rules(to: str) -> None:
    spy = Spy()
    f = factory(policy=spy)
    client = Client(f)
    spy.requests.clear()
    relay_of(f, 0).protocol.datagramReceived(
        UDPDatagram(Address.from_host(to, 53), b"x").to_bytes(), ("127.0.0.1", 6000)
    )
    counters = client.protocol.udp.counters  # type: ignore[union-attr]
    assert counters.drops["denied"] == 1
    assert (spy.requests, spy.resolved) == ([], [])
    assert len(f.reactor.udp_ports) == 1  # no outbound socket either


def test_a_name_resolving_to_an_unspecified_address_is_refused_before_its_rules() -> (
    None
):
    spy = Spy()
    f = factory(policy=spy)
    client = Client(f)
    spy.requests.clear()
    name = Address(AddressType.DOMAIN, "zero.test", 53)
    relay_of(f, 0).protocol.datagramReceived(
        UDPDatagram(name, b"x").to_bytes(), ("127.0.0.1", 6000)
    )
    f.connector.lookups[0][1].callback(["0.0.0.0"])  # type: ignore[attr-defined]
    assert client.protocol.udp.counters.drops["denied"] == 1  # type: ignore[union-attr]
    assert spy.resolved == []


# --------------------------------------------------------------------------
# Where the relay binds (--udp-bind) and what the replies name (--*-advertise)


@pytest.mark.parametrize(
    ("ends", "bind", "interface", "reply_host"),
    [
        (V4, (), "127.0.0.1", "127.0.0.1"),
        (V4, ("127.0.0.2",), "127.0.0.2", "127.0.0.2"),
        (V4, ("::1", "127.0.0.2"), "127.0.0.2", "127.0.0.2"),
        (V6, ("127.0.0.2",), "::1", "::1"),
        (V6, ("127.0.0.2", "::1"), "::1", "::1"),
        (MAPPED, ("::1", "127.0.0.2"), "127.0.0.2", "127.0.0.2"),
        # A wildcard binds every address; the reply names the one reached.
        (V4, ("0.0.0.0",), "0.0.0.0", "127.0.0.1"),
        (V6, ("::",), "::", "::1"),
    ],
)
def test_udp_bind_by_family(
    ends: Any, bind: Tuple[str, ...], interface: str, reply_host: str
) -> None:
    f = factory(udp_bind=bind)
    client = Client(f, ends)
    relay = relay_of(f, 0)
    assert relay.interface == interface
    assert client.reply().address == Address.from_host(reply_host, relay.port)
    assert client.protocol.bound == Address.from_host(interface, relay.port)


@pytest.mark.parametrize(
    ("ends", "advertise", "expected"),
    [
        (V4, ("127.0.0.3",), "127.0.0.3"),
        (V4, ("::3", "127.0.0.3"), "127.0.0.3"),
        # Only the other family's address: the client gets the bound one.
        (V4, ("::3",), "127.0.0.1"),
        (V6, ("127.0.0.3",), "::1"),
        (V6, ("127.0.0.3", "::3"), "::3"),
        # An IPv4 client on a dual-stack listener never gets IPv6, mapped or not.
        (MAPPED, ("::3",), "127.0.0.1"),
        (MAPPED, ("::ffff:127.0.0.3",), "127.0.0.3"),
    ],
)
@pytest.mark.parametrize("command", [Command.UDP_ASSOCIATE, Command.BIND])
def test_replies_advertise_the_address_of_the_client_family(
    ends: Any, advertise: Tuple[str, ...], expected: str, command: Command
) -> None:
    option = "udp_advertise" if command is Command.UDP_ASSOCIATE else "bind_advertise"
    other = "bind_advertise" if command is Command.UDP_ASSOCIATE else "udp_advertise"
    f = factory(**{option: advertise, other: ("127.0.0.66", "::66")})
    client = Client(f, ends, command=command)
    reply = client.reply()
    assert reply.reply is ReplyCode.SUCCEEDED
    if command is Command.BIND and expected in ("127.0.0.1", "::1"):
        # The memory reactor's TCP port may say 0.0.0.0: the reply is the
        # address bound, whatever either option advertises.
        assert reply.address == client.protocol.bound
    else:
        assert reply.address.host == expected
        family = AddressType.IPV6 if ":" in expected else AddressType.IPV4
        assert reply.address.type is family
    if command is Command.UDP_ASSOCIATE:
        relay = relay_of(f, 0)
        assert reply.address.port == relay.port
        assert relay.interface == ends[0].host.replace("::ffff:", "")
    else:
        # BIND listens where the client came in; only the reply changes.
        _, _, _, interface = f.reactor.tcpServers[-1]
        assert interface == ends[0].host.replace("::ffff:", "")
        assert client.protocol.state is State.BINDING


# --------------------------------------------------------------------------
# --udp-ports


def test_udp_ports_hands_out_the_range_then_refuses_with_0x01() -> None:
    reactor = RangeReactor()
    f = factory(reactor, udp_ports=(40000, 40002))
    reactor.busy.add(40001)  # another process holds it
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        first, second = Client(f), Client(f)
        assert [c.reply().address.port for c in (first, second)] == [40000, 40002]
        third, fourth = Client(f), Client(f)
        for refused in (third, fourth):
            data = refused.transport.value()
            assert data == b"\x05\x00" + Reply(ReplyCode.GENERAL_FAILURE).to_bytes()
            assert refused.transport.disconnecting
            assert refused.protocol.udp is None
            refused.close()
    finally:
        globalLogPublisher.removeObserver(observer)
    warnings = [e for e in observer if e.get("event") == "socks5.udp_ports_exhausted"]
    assert len(warnings) == 1  # once, not once per client
    assert (warnings[0]["low"], warnings[0]["high"]) == (40000, 40002)
    outcomes = [e["outcome"] for e in observer if e.get("event") == "socks5.connection"]
    assert outcomes and all("no free port in --udp-ports" in o for o in outcomes)


def test_udp_ports_come_back_once_the_socket_is_closed() -> None:
    reactor = RangeReactor()
    f = factory(reactor, udp_ports=(40000, 40001))
    first, second = Client(f), Client(f)
    first.close()
    # Not before the socket is really closed: a bind would fail.
    assert Client(f).reply().reply is ReplyCode.GENERAL_FAILURE
    reactor.close_sockets()
    again = Client(f)
    assert again.reply().address.port == 40000
    second.close()
    reactor.close_sockets()
    assert Client(f).reply().address.port == 40001


def test_port_range_reuses_the_oldest_freed_port_last() -> None:
    ports = PortRange(1, 3)
    taken = [ports.listen(lambda p: p) for _ in range(3)]
    assert taken == [1, 2, 3]
    ports.release(2)
    ports.release(1)
    assert [ports.listen(lambda p: p) for _ in range(2)] == [2, 1]
    with pytest.raises(CannotListenError):
        ports.listen(lambda p: p)


@pytest.mark.parametrize("ports", [(0, 10), (10, 9), (1, 65536)])
def test_port_range_must_be_one(ports: Tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="not a port range"):
        factory(udp_ports=ports)


def test_port_range_skips_a_port_in_use_and_tries_it_again_later() -> None:
    ports = PortRange(1, 2)
    busy = {1}

    def bind(port: int) -> int:
        if port in busy:
            raise CannotListenError("", port, OSError())
        return port

    assert ports.listen(bind) == 2
    with pytest.raises(CannotListenError):
        ports.listen(bind)
    busy.clear()
    assert ports.listen(bind) == 1


# --------------------------------------------------------------------------
# The options


def test_options_reach_the_factory() -> None:
    from twisted.internet import reactor

    options = Options()
    options.parseOptions(
        [
            "--udp-bind=127.0.0.2,::1",
            "--udp-ports=40000-40009",
            "--udp-advertise=::ffff:198.51.100.7,2001:db8::7",
            "--bind-advertise=198.51.100.8",
        ]
    )
    f = build_factory(options, reactor)
    assert f.udp_bind == {4: "127.0.0.2", 6: "::1"}
    assert f.udp_ports is not None
    assert (f.udp_ports.low, f.udp_ports.high) == (40000, 40009)
    assert f.udp_advertise == {4: "198.51.100.7", 6: "2001:db8::7"}
    assert f.bind_advertise == {4: "198.51.100.8"}
    plain = Options()
    plain.parseOptions([])
    defaults = build_factory(plain, reactor)
    assert (defaults.udp_bind, defaults.udp_ports) == ({}, None)
    assert (defaults.udp_advertise, defaults.bind_advertise) == ({}, {})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--udp-bind=192.0.2.1"], "--udp-bind: 192.0.2.1 is no address of this host"),
        (["--udp-bind=127.0.0.2,127.0.0.3"], "one address per family"),
        (["--udp-advertise=host.test"], "--udp-advertise:"),
        (["--bind-advertise=198.51.100.1,198.51.100.2"], "one address per family"),
        (["--udp-ports=40010-40000"], "--udp-ports: must be LOW-HIGH"),
    ],
)
def test_option_errors_name_the_option(argv: List[str], message: str) -> None:
    with pytest.raises(usage.UsageError, match=message):
        Options().parseOptions(argv)
