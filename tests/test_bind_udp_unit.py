"""BIND and UDP ASSOCIATE driven in memory."""

from __future__ import annotations

import errno
from typing import Any

import pytest
from helpers import FakeUDPPort, HalfCloseTransport, Harness
from twisted.internet.address import IPv4Address
from twisted.internet.error import DNSLookupError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from twisted_socks5 import udp as udp_module
from twisted_socks5.codec import (
    MAX_UDP_PAYLOAD,
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_udp_datagram,
)
from twisted_socks5.server import State

GREET = b"\x05\x01\x00"
PEER = Address(AddressType.IPV4, "127.0.0.9", 2121)


def bind_request(address: Address = PEER) -> bytes:
    return GREET + Request(Command.BIND, address).to_bytes()


def first_listener(h: Harness) -> Any:
    port, factory, _, interface = h.reactor.tcpServers[-1]
    return factory, interface


def incoming(factory: Any, host: str, port: int = 5555) -> Any:
    """Simulate a TCP connection arriving at the BIND port."""
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    if protocol is None:
        return None, None
    transport = HalfCloseTransport(
        IPv4Address("TCP", "127.0.0.1", 40001), IPv4Address("TCP", host, port)
    )
    protocol.makeConnection(transport)
    return protocol, transport


# --------------------------------------------------------------------------
# BIND


def test_bind_two_replies_then_relay() -> None:
    h = Harness()
    h.send(bind_request())
    factory, interface = first_listener(h)
    assert interface == "127.0.0.1"  # the control connection's local address
    first = Reply(ReplyCode.SUCCEEDED, Address.from_host("0.0.0.0", 0)).to_bytes()
    assert h.take() == b"\x05\x00" + first
    peer, peer_transport = incoming(factory, "127.0.0.9", 2000)
    second = Reply(ReplyCode.SUCCEEDED, Address.from_host("127.0.0.9", 2000)).to_bytes()
    assert h.take() == second
    assert h.protocol.state is State.RELAYING
    h.send(b"to peer")
    peer.dataReceived(b"to client")
    assert peer_transport.value() == b"to peer"
    assert h.take() == b"to client"
    assert h.protocol.peer == Address.from_host("127.0.0.9", 2000)


def _bind_port(requested: Address, **factory_kwargs: Any) -> int:
    """The port the proxy listens on for a BIND asking for ``requested``."""
    h = Harness(**factory_kwargs)
    h.send(bind_request(requested))
    port, _, _, _ = h.reactor.tcpServers[-1]
    return int(port)


def test_bind_asks_for_the_port_named_with_an_unspecified_address() -> None:
    """Dante's socksify sends 0.0.0.0:PORT with the port its program bound."""
    ports = (40000, 40999)
    assert _bind_port(Address.from_host("0.0.0.0", 40404), bind_ports=ports) == 40404
    assert _bind_port(Address.from_host("::", 40999), bind_ports=ports) == 40999
    # A peer's port is not a wish for ours.
    assert _bind_port(Address.from_host("127.0.0.9", 40404), bind_ports=ports) == 0


def test_bind_chooses_the_port_unless_the_client_asks_within_the_range() -> None:
    """No client squats a port of the proxy's address: by default none chooses."""
    assert _bind_port(Address.from_host("0.0.0.0", 40404)) == 0
    assert _bind_port(Address.from_host("0.0.0.0", 22)) == 0
    ports = (40000, 40999)
    assert _bind_port(Address.from_host("0.0.0.0", 39999), bind_ports=ports) == 0
    assert _bind_port(Address.from_host("0.0.0.0", 41000), bind_ports=ports) == 0


def test_bind_refuses_the_wrong_peer_and_keeps_waiting() -> None:
    h = Harness()
    h.send(bind_request())
    factory, _ = first_listener(h)
    h.take()
    assert incoming(factory, "127.0.0.66") == (None, None)
    assert h.take() == b""
    assert h.protocol.state is State.BINDING
    peer, _ = incoming(factory, "127.0.0.9")
    assert peer is not None
    assert h.protocol.state is State.RELAYING


def test_bind_takes_exactly_one_connection() -> None:
    h = Harness()
    h.send(bind_request(Address.from_host("0.0.0.0", 0)))  # any peer
    factory, _ = first_listener(h)
    assert incoming(factory, "127.0.0.5")[0] is not None
    assert incoming(factory, "127.0.0.6") == (None, None)


def test_bind_timeout_sends_a_failure_second_reply() -> None:
    h = Harness(bind_timeout=120)
    h.send(bind_request())
    h.take()
    h.reactor.advance(119)
    assert not h.closing  # the handshake timeout does not apply while waiting
    h.reactor.advance(1)
    assert h.take() == Reply(ReplyCode.TTL_EXPIRED).to_bytes()
    assert h.closing


def test_bind_client_leaving_cancels_the_wait() -> None:
    h = Harness()
    h.send(bind_request())
    factory, _ = first_listener(h)
    h.lose()
    assert h.reactor.getDelayedCalls() == []
    assert incoming(factory, "127.0.0.9") == (None, None)


def test_bind_domain_peer_is_resolved_first() -> None:
    h = Harness()
    h.send(bind_request(Address(AddressType.DOMAIN, "ftp.test", 21)))
    (name, d), *_ = h.connector.lookups
    assert name == "ftp.test"
    assert h.reactor.tcpServers == []
    d.callback(["127.0.0.7"])
    factory, _ = first_listener(h)
    h.take()
    assert incoming(factory, "127.0.0.8") == (None, None)
    assert incoming(factory, "127.0.0.7")[0] is not None


def test_bind_unresolvable_peer() -> None:
    h = Harness()
    h.send(bind_request(Address(AddressType.DOMAIN, "nowhere.invalid", 21)))
    h.connector.lookups[0][1].errback(DNSLookupError("nope"))
    assert h.take() == b"\x05\x00" + Reply(ReplyCode.HOST_UNREACHABLE).to_bytes()
    assert h.closing


@pytest.mark.parametrize("command", [Command.BIND, Command.UDP_ASSOCIATE])
def test_disabled_commands_answer_07(command: Command) -> None:
    h = Harness(commands=[Command.CONNECT])
    h.send(GREET + Request(command, PEER).to_bytes())
    assert h.take() == b"\x05\x00" + Reply(ReplyCode.COMMAND_NOT_SUPPORTED).to_bytes()
    assert h.closing


# --------------------------------------------------------------------------
# UDP ASSOCIATE

CLIENT_UDP = ("127.0.0.1", 6000)
TARGET = Address(AddressType.IPV4, "127.0.0.20", 53)


ANYWHERE = Address.from_host("0.0.0.0", 0)


def associate(declared: Address = ANYWHERE, **kw: Any) -> Any:
    h = Harness(**kw)
    h.send(GREET + Request(Command.UDP_ASSOCIATE, declared).to_bytes())
    client_port = h.reactor.udp_ports[0]
    return h, client_port


def from_client(port: FakeUDPPort, datagram: bytes, addr: Any = CLIENT_UDP) -> None:
    port.protocol.datagramReceived(datagram, addr)


def test_associate_reply_names_the_udp_port() -> None:
    h, client_port = associate()
    assert client_port.interface == "127.0.0.1"
    assert h.reactor.max_packet_size >= MAX_UDP_PAYLOAD
    bound = Address.from_host("127.0.0.1", client_port.port)
    assert h.take() == b"\x05\x00" + Reply(ReplyCode.SUCCEEDED, bound).to_bytes()
    assert h.protocol.state is State.ASSOCIATED


def test_udp_round_trip_with_headers() -> None:
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"query").to_bytes())
    out = h.reactor.udp_ports[1]
    assert out.written == [(b"query", ("127.0.0.20", 53))]
    out.protocol.datagramReceived(b"answer", ("127.0.0.20", 53))
    (packet, to), *_ = client_port.written
    assert to == CLIENT_UDP
    assert parse_udp_datagram(packet) == UDPDatagram(TARGET, b"answer")
    udp = h.protocol.udp.counters.as_dict()
    assert udp["datagrams_up"] == udp["datagrams_down"] == 1
    assert (udp["bytes_up"], udp["bytes_down"]) == (5, 6)


def test_udp_foreign_source_is_dropped() -> None:
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"x").to_bytes(), ("127.0.0.2", 6000))
    assert len(h.reactor.udp_ports) == 1  # nothing was sent anywhere
    assert h.protocol.udp.counters.drops["foreign_source"] == 1


def test_udp_declared_port_is_enforced() -> None:
    h, client_port = associate(Address.from_host("127.0.0.1", 7000))
    from_client(client_port, UDPDatagram(TARGET, b"x").to_bytes(), ("127.0.0.1", 6000))
    assert h.protocol.udp.counters.drops["foreign_source"] == 1
    from_client(client_port, UDPDatagram(TARGET, b"x").to_bytes(), ("127.0.0.1", 7000))
    assert h.protocol.udp.counters.datagrams_up == 1


def test_udp_first_datagram_pins_the_client_port() -> None:
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"1").to_bytes(), ("127.0.0.1", 6000))
    from_client(client_port, UDPDatagram(TARGET, b"2").to_bytes(), ("127.0.0.1", 6001))
    assert h.protocol.udp.counters.drops["foreign_source"] == 1


def test_udp_ipv4_mapped_client_address_is_normalised() -> None:
    h, client_port = associate()
    from_client(
        client_port, UDPDatagram(TARGET, b"x").to_bytes(), ("::ffff:127.0.0.1", 9)
    )
    assert h.protocol.udp.counters.datagrams_up == 1


@pytest.mark.parametrize(
    ("datagram", "reason"),
    [
        (UDPDatagram(TARGET, b"frag", fragment=1).to_bytes(), "fragmented"),
        (b"\x00\x00\x00\x05garbage", "malformed"),
        (b"\x00\x00", "malformed"),
        (b"\x01\x00\x00\x01\x7f\x00\x00\x01\x00\x35", "malformed"),
    ],
)
def test_udp_bad_datagrams_are_dropped_and_counted(
    datagram: bytes, reason: str
) -> None:
    h, client_port = associate()
    from_client(client_port, datagram)
    assert h.protocol.udp.counters.drops[reason] == 1
    assert h.protocol.udp.counters.datagrams_up == 0


def test_udp_answers_from_strangers_are_dropped_unless_allowed() -> None:
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    out = h.reactor.udp_ports[1]
    out.protocol.datagramReceived(b"spoof", ("127.0.0.99", 53))
    assert client_port.written == []
    assert h.protocol.udp.counters.drops["unknown_source"] == 1

    h, client_port = associate(udp_allow_unknown_sources=True)
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    h.reactor.udp_ports[1].protocol.datagramReceived(b"hi", ("127.0.0.99", 53))
    (packet, _), *_ = client_port.written
    assert parse_udp_datagram(packet).address == Address.from_host("127.0.0.99", 53)


def test_udp_domain_target_is_resolved_once_and_queued_meanwhile() -> None:
    h, client_port = associate()
    name = Address(AddressType.DOMAIN, "dns.test", 53)
    from_client(client_port, UDPDatagram(name, b"a").to_bytes())
    from_client(client_port, UDPDatagram(name, b"b").to_bytes())
    assert [n for n, _ in h.connector.lookups] == ["dns.test"]
    h.connector.lookups[0][1].callback(["::1", "127.0.0.1"])
    from_client(client_port, UDPDatagram(name, b"c").to_bytes())
    out = h.reactor.udp_ports[1]
    assert out.interface == "::"
    assert [d for d, _ in out.written] == [b"a", b"b", b"c"]
    assert len(h.connector.lookups) == 1  # cached for the association


def test_udp_finished_lookups_are_forgotten() -> None:
    """Only lookups still running are kept (to cancel at close): no growth."""
    h, client_port = associate()
    for i, outcome in enumerate((["127.0.0.20"], DNSLookupError("no"))):
        name = Address(AddressType.DOMAIN, f"n{i}.test", 53)
        from_client(client_port, UDPDatagram(name, b"a").to_bytes())
        assert len(h.protocol.udp._lookups) == 1
        d = h.connector.lookups[i][1]
        if isinstance(outcome, Exception):
            d.errback(outcome)
        else:
            d.callback(outcome)
        assert h.protocol.udp._lookups == []


def test_udp_answer_arriving_after_the_close_is_dropped() -> None:
    """A datagram read in the same reactor turn as the close goes nowhere."""
    h, client_port = associate(udp_allow_unknown_sources=True)
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    out = h.reactor.udp_ports[1]
    h.protocol.udp.close()
    out.protocol.datagramReceived(b"late", ("127.0.0.20", 53))
    assert client_port.written == []
    assert h.protocol.udp.counters.drops["unknown_source"] == 1


@pytest.mark.parametrize("size, reason", [(100, "send_error"), (65500, "oversize")])
def test_udp_answer_the_client_cannot_take_is_counted(size: int, reason: str) -> None:
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    client_port.fail = OSError(errno.EMSGSIZE, "Message too long")
    h.reactor.udp_ports[1].protocol.datagramReceived(b"a" * size, ("127.0.0.20", 53))
    udp = h.protocol.udp.counters
    assert udp.drops[reason] == 1 and udp.datagrams_down == 0


def test_udp_header_cache_is_bounded_and_stays_right(monkeypatch: Any) -> None:
    monkeypatch.setattr(udp_module, "MAX_PEERS", 2)
    h, client_port = associate(udp_allow_unknown_sources=True)
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    out = h.reactor.udp_ports[1]
    sources = [("127.0.0.20", 53), ("127.0.0.21", 53), ("127.0.0.22", 53)] * 2
    for source in sources:
        out.protocol.datagramReceived(b"a", source)
        assert len(h.protocol.udp._headers) <= 2
    answers = [parse_udp_datagram(packet).address for packet, _ in client_port.written]
    assert answers == [Address.from_host(*source) for source in sources]


def test_udp_a_name_is_asked_again_after_a_while() -> None:
    """A long association follows the name's DNS changes (bounded reuse)."""
    h, client_port = associate()
    name = Address(AddressType.DOMAIN, "moving.test", 53)
    from_client(client_port, UDPDatagram(name, b"a").to_bytes())
    h.connector.lookups[0][1].callback(["127.0.0.20"])
    h.reactor.advance(udp_module.NAME_CACHE_SECONDS - 1)
    from_client(client_port, UDPDatagram(name, b"b").to_bytes())
    assert len(h.connector.lookups) == 1  # still fresh: no new look-up
    h.reactor.advance(2)
    from_client(client_port, UDPDatagram(name, b"c").to_bytes())
    from_client(client_port, UDPDatagram(name, b"d").to_bytes())
    assert [n for n, _ in h.connector.lookups] == ["moving.test"] * 2
    h.connector.lookups[1][1].callback(["127.0.0.21"])
    sent = h.reactor.udp_ports[1].written
    assert sent == [
        (b"a", ("127.0.0.20", 53)),
        (b"b", ("127.0.0.20", 53)),
        (b"c", ("127.0.0.21", 53)),  # queued while asked again
        (b"d", ("127.0.0.21", 53)),
    ]


def test_udp_unresolvable_name_drops_its_queue() -> None:
    h, client_port = associate()
    name = Address(AddressType.DOMAIN, "nowhere.invalid", 53)
    from_client(client_port, UDPDatagram(name, b"a").to_bytes())
    from_client(client_port, UDPDatagram(name, b"b").to_bytes())
    h.connector.lookups[0][1].errback(DNSLookupError("no"))
    assert h.protocol.udp.counters.drops["unresolvable"] == 2


def test_udp_ipv6_answer_gets_an_ipv6_header() -> None:
    h, client_port = associate()
    target = Address(AddressType.IPV6, "::1", 53)
    from_client(client_port, UDPDatagram(target, b"q").to_bytes())
    out = h.reactor.udp_ports[1]
    out.protocol.datagramReceived(b"r", ("::1", 53))
    (packet, _), *_ = client_port.written
    assert parse_udp_datagram(packet).address == target


def test_association_ends_with_its_control_connection() -> None:
    h, client_port = associate(idle_timeout=60)
    name = Address(AddressType.DOMAIN, "dns.test", 53)
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    from_client(client_port, UDPDatagram(name, b"q").to_bytes())
    lookup = h.connector.lookups[0][1]
    h.lose()
    assert not any(p.listening for p in h.reactor.udp_ports)
    assert lookup.called  # cancelled
    assert h.reactor.getDelayedCalls() == []


def test_association_ends_on_client_eof() -> None:
    h, client_port = associate()
    h.protocol.readConnectionLost()
    assert h.closing


def test_association_idle_timeout() -> None:
    h, client_port = associate(idle_timeout=30)
    h.reactor.pump([1] * 25)
    from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
    h.reactor.pump([1] * 29)
    assert not h.closing
    h.reactor.pump([1] * 40)
    assert h.transport.aborted


def test_udp_counters_reach_the_log_event() -> None:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        h, client_port = associate()
        from_client(client_port, UDPDatagram(TARGET, b"q").to_bytes())
        from_client(client_port, b"bad")
        h.lose()
    finally:
        globalLogPublisher.removeObserver(observer)
    (event,) = [e for e in observer if e.get("event") == "socks5.connection"]
    assert event["command"] == "udp associate"
    assert event["udp"]["datagrams_up"] == 1
    assert event["udp"]["drops"] == {"malformed": 1}
