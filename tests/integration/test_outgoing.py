"""
``--outgoing``: outbound connections leave from the chosen loopback alias
(127.0.0.2, 127.0.0.3...), which a target that reports its peer confirms,
as does the CONNECT reply's BND.ADDR.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
from conftest import LoopbackResolver, all_closed, closed_port, needs_ipv6, turn
from test_bind_udp import UDPClient, control
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import globalLogPublisher

from twisted_socks5.client import SOCKS5ClientEndpoint
from twisted_socks5.codec import (
    Address,
    Command,
    Request,
    UDPDatagram,
    parse_udp_datagram,
)
from twisted_socks5.options import Options
from twisted_socks5.outbound import DirectConnector, _SourcingReactor
from twisted_socks5.outgoing import OutgoingAddresses
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.tap import build_factory


class ReportPeer(protocol.Protocol):
    """A target that tells each client the address it came from, then closes."""

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.transport.write(f"{peer.host} {peer.port}\n".encode())
        self.transport.loseConnection()


class UDPReportPeer(protocol.DatagramProtocol):
    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.transport.write(f"{addr[0]} {addr[1]}".encode(), addr)


class Line(protocol.Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(self.data)


@pytest.fixture
def servers() -> Iterator[Any]:
    """Listen with a factory on an address; everything stops at the end."""
    ports: List[Any] = []

    def listen(factory: Any, host: str = "127.0.0.1") -> int:
        port = reactor.listenTCP(0, factory, interface=host)
        ports.append(port)
        return int(port.getHost().port)

    yield listen
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


@pytest.fixture
def target(servers: Any) -> Any:
    """A ReportPeer target on ``host``: its port."""

    def make(host: str = "127.0.0.1") -> int:
        factory = protocol.Factory.forProtocol(ReportPeer)
        factory.noisy = False
        return int(servers(factory, host))

    return make


def proxy_from(argv: List[str]) -> SOCKS5ServerFactory:
    """The factory ``twistd socks5 ARGV`` would run."""
    options = Options()
    options.parseOptions(argv)
    return build_factory(options, reactor)


async def through(
    proxy_port: int,
    host: str,
    port: int,
    proxy_host: str = "127.0.0.1",
    **credentials: str,
) -> Tuple[str, int]:
    """
    CONNECT through the proxy; the source the target saw, checked against
    the reply's BND.ADDR (the outgoing address actually used).
    """
    kind = TCP6ClientEndpoint if ":" in proxy_host else TCP4ClientEndpoint
    endpoint = SOCKS5ClientEndpoint(
        kind(reactor, proxy_host, proxy_port), host, port, **credentials
    )
    line = await endpoint.connect(protocol.Factory.forProtocol(Line))
    bound = line.transport.bound
    seen_host, seen_port = (await line.done).decode().split()
    assert (bound.host, bound.port) == (seen_host, int(seen_port))
    return seen_host, int(seen_port)


ALIASES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


@pytest.mark.parametrize(
    ("rotation", "expected"),
    [
        ("none", ALIASES[:1] * 6),
        ("round-robin", ALIASES * 2),
    ],
)
@pytest_twisted.ensureDeferred
async def test_rotation_over_loopback_aliases(
    servers: Any, target: Any, rotation: str, expected: List[str]
) -> None:
    factory = proxy_from(
        ["--outgoing", ",".join(ALIASES), "--outgoing-rotation", rotation]
    )
    port = servers(factory)
    to = target()
    seen = [(await through(port, "127.0.0.1", to))[0] for _ in expected]
    assert seen == expected
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_random_rotation_stays_in_the_set_and_spreads(
    servers: Any, target: Any
) -> None:
    factory = proxy_from(
        ["--outgoing", ",".join(ALIASES), "--outgoing-rotation", "random"]
    )
    port = servers(factory)
    to = target()
    seen = {(await through(port, "127.0.0.1", to))[0] for _ in range(40)}
    # Forty draws from three addresses all alike: one chance in 3**39.
    assert seen <= set(ALIASES)
    assert len(seen) > 1
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_same_as_listen_uses_the_address_the_client_reached(
    servers: Any, target: Any
) -> None:
    factory = proxy_from(
        ["--outgoing", ",".join(ALIASES), "--outgoing-rotation", "same-as-listen"]
    )
    ports = {host: servers(factory, host) for host in ("127.0.0.3", "127.0.0.4")}
    to = target()
    for host, port in ports.items():
        assert (await through(port, "127.0.0.1", to, proxy_host=host))[0] == host
    # Reached on an address the set does not hold: never that one, the first.
    elsewhere = servers(factory, "127.0.0.5")
    assert (await through(elsewhere, "127.0.0.1", to, "127.0.0.5"))[0] == ALIASES[0]
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_rules_choose_a_named_set_with_via(
    servers: Any, target: Any, tmp_path: Any
) -> None:
    rules = tmp_path / "rules"
    rules.write_text(
        "allow user alice via eu\nallow user carol via direct\nallow user *\n"
    )
    factory = proxy_from(
        [
            "--auth",
            "memory:alice:a:bob:b:carol:c",
            "--rules",
            str(rules),
            "--outgoing",
            "127.0.0.2",
            "--outgoing",
            "eu=127.0.0.5,127.0.0.6",
            "--outgoing-rotation",
            "round-robin",
        ]
    )
    port = servers(factory)
    to = target()

    async def source(user: str, password: str) -> str:
        seen = await through(port, "127.0.0.1", to, username=user, password=password)
        return seen[0]

    assert [await source("alice", "a") for _ in range(3)] == [
        "127.0.0.5",
        "127.0.0.6",
        "127.0.0.5",
    ]
    assert await source("bob", "b") == "127.0.0.2"
    assert await source("carol", "c") == "127.0.0.2"
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_without_outgoing_the_system_chooses(servers: Any, target: Any) -> None:
    factory = proxy_from([])
    assert getattr(factory.connector, "outgoing", None) is None
    port = servers(factory)
    assert (await through(port, "127.0.0.1", target()))[0] == "127.0.0.1"
    await all_closed(factory)


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_a_family_without_an_address_gets_the_system_default(
    servers: Any, target: Any
) -> None:
    # Only IPv4 sources: an IPv6 destination still connects, from ::1.
    factory = proxy_from(["--outgoing", "127.0.0.2"])
    port = servers(factory)
    assert (await through(port, "::1", target("::1")))[0] == "::1"
    assert (await through(port, "127.0.0.1", target()))[0] == "127.0.0.2"
    await all_closed(factory)


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_ipv6_source_for_ipv6_destinations(servers: Any, target: Any) -> None:
    factory = proxy_from(["--outgoing", "127.0.0.3,::1"])
    port = servers(factory)
    assert (await through(port, "::1", target("::1")))[0] == "::1"
    assert (await through(port, "127.0.0.1", target()))[0] == "127.0.0.3"
    await all_closed(factory)


@pytest.mark.parametrize(
    ("v4_open", "expected"),
    [(True, "127.0.0.2"), pytest.param(False, "::1", marks=needs_ipv6)],
)
@pytest_twisted.ensureDeferred
async def test_happy_eyeballs_across_families_with_one_family_set(
    servers: Any, v4_open: bool, expected: str
) -> None:
    # localhost is 127.0.0.1 and ::1; the target listens on one of them,
    # the other is refused: each family's attempt has its own source.
    port_number = closed_port()
    factory = protocol.Factory.forProtocol(ReportPeer)
    host = "127.0.0.1" if v4_open else "::1"
    port = reactor.listenTCP(port_number, factory, interface=host)
    try:
        connector = DirectConnector(
            reactor,
            5,
            resolver=LoopbackResolver(),
            outgoing=OutgoingAddresses(["127.0.0.2"]),
        )
        proxy = SOCKS5ServerFactory(reactor=reactor, connector=connector)
        proxy_port = servers(proxy)
        assert (await through(proxy_port, "localhost", port_number))[0] == expected
        await all_closed(proxy)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_connection_log_names_the_outgoing_address(
    servers: Any, target: Any
) -> None:
    events: List[Dict[str, Any]] = []

    def observe(event: Dict[str, Any]) -> None:
        if event.get("event") == "socks5.connection":
            events.append(event)

    factory = proxy_from(["--outgoing", "127.0.0.4"])
    port = servers(factory)
    globalLogPublisher.addObserver(observe)
    try:
        _, source_port = await through(port, "127.0.0.1", target())
        await all_closed(factory)
    finally:
        globalLogPublisher.removeObserver(observe)
    (event,) = events
    assert event["outgoing"] == f"127.0.0.4:{source_port}"
    assert f" from 127.0.0.4:{source_port} -> succeeded" in event["summary"]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("allow", "127.0.0.2"),
        ("allow via eu", "127.0.0.5"),
        ("allow command udp via eu", "127.0.0.5"),
        # Decided by each datagram's destination, not by the request: the
        # association's sockets take the default set.
        ("allow to 127.0.0.0/8 via eu", "127.0.0.2"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_udp_relay_sockets_leave_from_the_rules_set(
    servers: Any, tmp_path: Any, rule: str, expected: str
) -> None:
    rules = tmp_path / "rules"
    rules.write_text(rule + "\n")
    factory = proxy_from(
        ["--rules", str(rules), "--outgoing", "127.0.0.2", "--outgoing", "eu=127.0.0.5"]
    )
    port = servers(factory)
    echo = reactor.listenUDP(0, UDPReportPeer(), interface="127.0.0.1")
    me = UDPClient()
    mine = reactor.listenUDP(0, me, interface="127.0.0.1")
    try:
        client = await control(
            port,
            "127.0.0.1",
            Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)),
        )
        relay = (await client.reply(1)).address
        target = Address.from_host("127.0.0.1", echo.getHost().port)
        me.transport.write(
            UDPDatagram(target, b"who").to_bytes(), (relay.host, relay.port)
        )
        data, _ = await me.next()
        assert parse_udp_datagram(data).data.decode().split()[0] == expected
        (server_side,) = factory.active
        assert server_side.udp.outgoing == [expected]
        client.transport.loseConnection()
        await all_closed(factory)
    finally:
        await echo.stopListening()
        await mine.stopListening()


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_same_as_listen_on_a_dual_stack_listener(
    servers: Any, target: Any
) -> None:
    # IPv4 clients of a listener on :: arrive as ::ffff:127.0.0.4: an IPv4
    # address all the same, and the IPv4 source.
    factory = proxy_from(
        ["--outgoing", ",".join(ALIASES), "--outgoing-rotation", "same-as-listen"]
    )
    port = servers(factory, "::")
    for host in ALIASES[::-1]:
        assert (await through(port, "127.0.0.1", target(), proxy_host=host))[0] == host
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_a_cancelled_attempt_leaves_nothing_behind(target: Any) -> None:
    # What HostnameEndpoint does with an attempt it gives up on (the
    # client left, or another family won): cancel its endpoint's Deferred.
    view = _SourcingReactor(reactor, OutgoingAddresses(["127.0.0.2"]), None)
    writers = set(reactor.getWriters())
    endpoint = TCP4ClientEndpoint(view, "127.0.0.1", target())
    d = endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
    assert set(reactor.getWriters()) > writers  # the attempt, under way
    failures: List[Any] = []
    d.addErrback(failures.append)
    d.cancel()
    (failure,) = failures
    assert failure.check(ConnectingCancelledError)
    assert set(reactor.getWriters()) <= writers
    await turn()


@pytest_twisted.ensureDeferred
async def test_twistd_refuses_an_address_of_another_host(tmp_path: Any) -> None:
    from test_twistd_errors import _twistd

    output, code = await _twistd(tmp_path, "--outgoing", "127.0.0.2,192.0.2.1")
    assert code == 1 and "Traceback" not in output
    assert (
        output.strip()
        .splitlines()[-1]
        .endswith(
            "--outgoing: 192.0.2.1 is not an address of this host "
            "(Cannot assign requested address)"
        )
    )


@pytest_twisted.ensureDeferred
async def test_the_connection_to_an_upstream_leaves_from_the_default_set(
    servers: Any, target: Any
) -> None:
    """An upstream SOCKS server is an outbound connection like any other."""
    seen: List[str] = []

    class Record(protocol.Protocol):
        def connectionMade(self) -> None:
            seen.append(self.transport.getPeer().host)
            self.transport.loseConnection()

    upstream = servers(protocol.Factory.forProtocol(Record))
    proxy = servers(
        proxy_from(
            [
                "--outgoing",
                "127.0.0.3",
                "--upstream",
                f"socks5://127.0.0.1:{upstream}",
            ]
        )
    )
    with pytest.raises(Exception):  # noqa: B017 - not a SOCKS server: any failure
        await through(proxy, "127.0.0.1", target())
    assert seen == ["127.0.0.3"]
