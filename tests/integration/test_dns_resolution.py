"""
``--resolver``, ``--hosts`` and ``--prefer`` against a real twisted.names
server the test starts on a loopback port (tests/dns_server.py): names with
A and AAAA records, a CNAME chain, NXDOMAIN, SERVFAIL and a server that
never answers; CONNECT, UDP datagrams and BIND's peer all resolve through
it, and a silent server holds up no other connection.  No name ever reaches
the system's DNS.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Iterator, List, Optional

import pytest
import pytest_twisted
from conftest import HAS_IPV6, listen, needs_ipv6, until
from dns_server import DNSTestServer, Silent
from test_bind_udp import UDPEcho, associate, control, peer_connect
from test_bind_udp import udp_ports as udp_ports  # a fixture
from test_twistd import CURL, TWISTD, Twistd, _env
from twisted.internet import reactor, utils
from twisted.internet.protocol import Factory, Protocol

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_udp_datagram,
)
from twisted_socks5.outbound import DirectConnector
from twisted_socks5.replies import PolicyDenied
from twisted_socks5.resolver import (
    FamilyPreference,
    LookupFailed,
    NamesResolver,
    parse_servers,
)
from twisted_socks5.rules import RuleSet
from twisted_socks5.tap import Options, build_factory


@pytest.fixture
def dns_server() -> Iterator[DNSTestServer]:
    server = DNSTestServer()
    yield server
    server.stop()


@pytest.fixture
def silent() -> Iterator[str]:
    """``--resolver``'s value for a server that never answers."""
    port = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
    yield f"udp:127.0.0.1:{port.getHost().port}"
    port.stopListening()


def names(spec: str, timeout: float = 5.0, **kw: Any) -> NamesResolver:
    return NamesResolver(reactor, parse_servers(spec), timeout=timeout, **kw)


def by_name(host: str, port: int) -> Address:
    return Address(AddressType.DOMAIN, host, port)


async def connect_reply(port: int, destination: Address) -> Any:
    client = await control(port, "127.0.0.1", Request(Command.CONNECT, destination))
    reply = await client.reply(1)
    client.transport.loseConnection()
    return reply


def dns_failures(events: Any) -> List[Any]:
    return [e for e in events if e.get("event") == "socks5.dns_failed"]


@pytest.fixture
def target() -> Iterator[dict[str, int]]:
    """A TCP listener on 127.0.0.1 and (where present) ::1, same port."""
    ports = {"127.0.0.1": listen(Factory.forProtocol(Protocol))}
    number = ports["127.0.0.1"].getHost().port
    if HAS_IPV6:
        ports["::1"] = reactor.listenTCP(
            number, Factory.forProtocol(Protocol), interface="::1"
        )
    yield dict.fromkeys(ports, number)
    for port in ports.values():
        port.stopListening()


# --------------------------------------------------------------------------
# The resolver on its own


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest_twisted.ensureDeferred
async def test_names_resolve_through_the_server(
    dns_server: DNSTestServer, transport: str
) -> None:
    resolver = names(dns_server.spec(transport))
    assert await resolver.lookup("both.test") == ["::1", "127.0.0.1"]
    # alias -> middle -> both: the server gives the first hop only.
    assert await resolver.lookup("alias.test") == ["::1", "127.0.0.1"]
    assert (b"middle.test", 1) in dns_server.queries
    with pytest.raises(LookupFailed, match="NXDOMAIN"):
        await resolver.lookup("nx.test")
    with pytest.raises(LookupFailed, match="SERVFAIL"):
        await resolver.lookup("servfail.test")
    with pytest.raises(LookupFailed, match="CNAME chain too long"):
        await resolver.lookup("loop1.test")
    asked = len(dns_server.queries)
    assert await resolver.lookup("both.test") == ["::1", "127.0.0.1"]
    assert len(dns_server.queries) == asked  # from the cache


@pytest_twisted.ensureDeferred
async def test_a_silent_server_times_out(silent: str, events: Any) -> None:
    with pytest.raises(LookupFailed, match="timeout"):
        await names(silent, timeout=0.5).lookup("both.test")
    assert [e["reason"] for e in dns_failures(events)] == ["timeout"]


@pytest_twisted.ensureDeferred
async def test_the_next_server_answers_when_the_first_is_silent(
    silent: str, dns_server: DNSTestServer
) -> None:
    resolver = names(f"{silent},{dns_server.spec('tcp')}", timeout=1.0)
    assert await resolver.lookup("v4.test") == ["127.0.0.1"]


# --------------------------------------------------------------------------
# CONNECT


@pytest_twisted.ensureDeferred
async def test_connect_by_name_through_the_server(
    make_proxy: Any, dns_server: DNSTestServer, target: dict[str, int]
) -> None:
    _, port = make_proxy(connector=None, resolver=names(dns_server.spec()))
    reply = await connect_reply(port, by_name("alias.test", target["127.0.0.1"]))
    assert reply.reply is ReplyCode.SUCCEEDED
    assert (b"alias.test", 1) in dns_server.queries


@pytest.mark.parametrize(
    "name, reason",
    [("nx.test", "NXDOMAIN"), ("servfail.test", "SERVFAIL"), ("none.test", "")],
)
@pytest_twisted.ensureDeferred
async def test_dns_failures_answer_0x04_with_a_log_line(
    make_proxy: Any, dns_server: DNSTestServer, events: Any, name: str, reason: str
) -> None:
    spec = dns_server.spec()
    if name == "none.test":
        # A server that never answers: a timeout within the connect's.
        silent_port = reactor.listenUDP(0, Silent(), interface="127.0.0.1")
        spec, reason = f"udp:127.0.0.1:{silent_port.getHost().port}", "timeout"
    try:
        _, port = make_proxy(
            connector=None, connect_timeout=5, resolver=names(spec, timeout=0.5)
        )
        reply = await connect_reply(port, by_name(name, 80))
    finally:
        if name == "none.test":
            silent_port.stopListening()
    assert reply.reply is ReplyCode.HOST_UNREACHABLE
    assert [(e["name"], e["reason"]) for e in dns_failures(events)] == [(name, reason)]


@pytest_twisted.ensureDeferred
async def test_a_silent_dns_server_blocks_no_other_connection(
    make_proxy: Any, silent: str, target: dict[str, int]
) -> None:
    resolver = names(silent, timeout=2.0, hosts={"web.test": ["127.0.0.1"]})
    _, port = make_proxy(connector=None, connect_timeout=5, resolver=resolver)
    waiting = await control(
        port, "127.0.0.1", Request(Command.CONNECT, by_name("slow.test", 80))
    )
    stuck = waiting.reply(1)
    for destination in (
        by_name("web.test", target["127.0.0.1"]),
        Address.from_host("127.0.0.1", target["127.0.0.1"]),
    ):
        reply = await connect_reply(port, destination)
        assert reply.reply is ReplyCode.SUCCEEDED
        assert not stuck.called  # still waiting for the silent server
    assert (await stuck).reply is ReplyCode.HOST_UNREACHABLE
    waiting.transport.loseConnection()


# --------------------------------------------------------------------------
# --prefer, after the rules


async def _connected_from(connector: DirectConnector, name: str, check: Any) -> str:
    protocol: Any = await connector.connect(
        by_name(name, connector.port), Factory.forProtocol(Protocol), check
    )
    try:
        return str(protocol.transport.getPeer().host)
    finally:
        protocol.transport.abortConnection()


def _deny(*denied: str) -> Any:
    return lambda ip: f"deny to {ip}" if ip in denied else None


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_the_connector_applies_the_preference_after_the_rules(
    dns_server: DNSTestServer, target: dict[str, int]
) -> None:
    def connector(spec: str) -> DirectConnector:
        made = DirectConnector(
            reactor, 5, resolver=names(dns_server.spec()), prefer=FamilyPreference(spec)
        )
        made.port = target["::1"]  # type: ignore[attr-defined]
        return made

    assert await _connected_from(connector("ipv4"), "both.test", _deny()) == "127.0.0.1"
    assert await _connected_from(connector("ipv6"), "both.test", _deny()) == "::1"
    # Happy eyeballs only among allowed addresses: ::1 is not tried.
    assert (
        await _connected_from(connector("ipv6"), "both.test", _deny("::1"))
        == "127.0.0.1"
    )
    # The rules allow ::1 only, the family is IPv4 only: host unreachable.
    with pytest.raises(LookupFailed, match="no IPv4 address allowed"):
        await _connected_from(connector("ipv4-only"), "both.test", _deny("127.0.0.1"))
    # The rules allow none: not allowed, naming the rule.
    with pytest.raises(PolicyDenied, match="deny to"):
        await _connected_from(
            connector("ipv4-only"), "both.test", _deny("127.0.0.1", "::1")
        )
    with pytest.raises(LookupFailed):
        await _connected_from(connector("ipv6-only"), "v4.test", _deny())


NO_V4 = "deny to 127.0.0.1\ndefault allow\n"
NO_V6 = "deny to ::1\ndefault allow\n"
NEITHER = "deny to 127.0.0.1, ::1\ndefault allow\n"


@needs_ipv6
@pytest.mark.parametrize(
    "prefer, rules, code",
    [
        ("ipv4", NO_V4, ReplyCode.SUCCEEDED),
        ("ipv4-only", NO_V4, ReplyCode.HOST_UNREACHABLE),
        ("ipv4-only", NEITHER, ReplyCode.CONNECTION_NOT_ALLOWED),
        ("ipv6-only", NO_V6, ReplyCode.HOST_UNREACHABLE),
    ],
)
@pytest_twisted.ensureDeferred
async def test_the_server_applies_the_preference_after_the_rules(
    make_proxy: Any,
    dns_server: DNSTestServer,
    target: dict[str, int],
    prefer: str,
    rules: str,
    code: ReplyCode,
) -> None:
    _, port = make_proxy(
        connector=None,
        resolver=names(dns_server.spec()),
        prefer=FamilyPreference(prefer),
        policy=RuleSet.parse(rules),
    )
    reply = await connect_reply(port, by_name("both.test", target["::1"]))
    assert reply.reply is code
    if code is ReplyCode.SUCCEEDED:
        assert reply.address.host == "::1"  # left from the only allowed family


# --------------------------------------------------------------------------
# UDP and BIND


@pytest.mark.parametrize(
    "prefer, name, delivered",
    [
        (None, "v4.test", True),
        ("ipv4", "both.test", True),
        ("ipv6-only", "v4.test", False),
    ],
)
@pytest_twisted.ensureDeferred
async def test_udp_targets_resolve_through_the_server(
    make_proxy: Any,
    udp_ports: Any,
    dns_server: DNSTestServer,
    prefer: Optional[str],
    name: str,
    delivered: bool,
) -> None:
    factory, port = make_proxy(
        connector=None,
        resolver=names(dns_server.spec()),
        prefer=FamilyPreference(prefer) if prefer else None,
    )
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    (server_side,) = factory.active
    destination = by_name(name, echo)
    me.transport.write(
        UDPDatagram(destination, b"by name").to_bytes(), (bound.host, bound.port)
    )
    if delivered:
        data, _ = await me.next()
        assert parse_udp_datagram(data).data == b"by name"
    else:
        drops = server_side.udp.counters.drops
        await until(lambda: drops["unresolvable"] == 1, "the datagram dropped")
        assert me.received == []
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_bind_expects_the_peer_the_server_names(
    make_proxy: Any, dns_server: DNSTestServer
) -> None:
    _, port = make_proxy(connector=None, resolver=names(dns_server.spec()))
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, by_name("peer.test", 0))
    )
    first = await client.reply(1)
    assert first.reply is ReplyCode.SUCCEEDED
    connected, _ = peer_connect("127.0.0.1", first.address.port)
    await connected
    second = await client.reply(2)
    assert second.reply is ReplyCode.SUCCEEDED and second.address.host == "127.0.0.1"
    client.transport.loseConnection()
    refused = await control(
        port, "127.0.0.1", Request(Command.BIND, by_name("nx.test", 0))
    )
    assert (await refused.reply(1)).reply is ReplyCode.HOST_UNREACHABLE


# --------------------------------------------------------------------------
# From the command line


@pytest_twisted.ensureDeferred
async def test_options_build_one_resolver_for_every_connector(
    dns_server: DNSTestServer, tmp_path: Any
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.7 db.internal\n")
    options = Options()
    options.parseOptions(
        [
            "--resolver", dns_server.spec("tcp"),
            "--hosts", str(hosts),
            "--prefer", "ipv4",
            "--upstream", "via=socks5://127.0.0.1:1",
        ]
    )  # fmt: skip
    factory = build_factory(options, reactor)
    assert factory.prefer is not None and factory.prefer.spec == "ipv4"
    assert await factory.connector.resolve("both.test") == ["::1", "127.0.0.1"]
    assert await factory.connector.resolve("db.internal") == ["127.0.0.7"]
    upstream: Any = factory.routes["via"]
    assert upstream.local.prefer is factory.prefer
    assert await upstream.local.resolve("v4.test") == ["127.0.0.1"]
    # One resolver, one cache: the upstream's look-up came from it.
    asked = len(dns_server.queries)
    assert await factory.routes["direct"].resolve("v4.test") == ["127.0.0.1"]
    assert len(dns_server.queries) == asked


def test_without_the_options_the_reactor_resolves() -> None:
    options = Options()
    options.parseOptions([])
    factory = build_factory(options, reactor)
    assert factory.prefer is None
    connector: Any = factory.connector
    assert connector._name_reactor is reactor


@pytest.mark.skipif(
    CURL is None or not os.path.exists(TWISTD), reason="needs curl and twistd"
)
@pytest_twisted.ensureDeferred
async def test_twistd_socks5_resolves_through_the_server(
    dns_server: DNSTestServer, http_target: Any, tmp_path: Any
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("")  # every name from the test's server
    process = Twistd.start(
        tmp_path, "--resolver", dns_server.spec(), "--hosts", str(hosts),
        "--prefer", "ipv4",
    )  # fmt: skip
    try:
        port = await process.listening.addTimeout(30, reactor)

        async def curl(name: str) -> Any:
            return await utils.getProcessOutputAndValue(
                CURL,
                [
                    "-sS", "--max-time", "20",
                    "--socks5-hostname", f"127.0.0.1:{port}",
                    f"http://{name}:{http_target['127.0.0.1']}/",
                ],
                env=_env(),
            )  # fmt: skip

        out, err, code = await curl("alias.test")
        assert code == 0, err
        assert out == b"hello through socks\n"
        out, err, code = await curl("nx.test")
        assert code != 0
        await process.wait_for(b"DNS look-up of nx.test failed: NXDOMAIN").addTimeout(
            30, reactor
        )
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
    assert (b"alias.test", 1) in dns_server.queries


@pytest_twisted.ensureDeferred
async def test_an_upstream_named_by_a_name_is_found_through_the_server(
    dns_server: DNSTestServer,
) -> None:
    """The upstream server's own name goes to --resolver, not the system."""
    reached: List[str] = []

    class Record(Protocol):
        def connectionMade(self) -> None:
            reached.append(self.transport.getPeer().host)
            self.transport.loseConnection()

    upstream = listen(Factory.forProtocol(Record))
    options = Options()
    options.parseOptions(
        [
            "--resolver", dns_server.spec("udp"),
            "--upstream", f"socks5://v4.test:{upstream.getHost().port}",
        ]
    )  # fmt: skip
    factory = build_factory(options, reactor)
    with pytest.raises(Exception):  # noqa: B017 - not a SOCKS server: any failure
        await factory.connector.connect(
            Address.from_host("127.0.0.1", 9), Factory.forProtocol(Protocol)
        )
    upstream.stopListening()
    assert reached == ["127.0.0.1"]
    assert any("v4.test" in str(q) for q in dns_server.queries)


@pytest_twisted.ensureDeferred
async def test_sighup_rereads_the_hosts_file_and_keeps_it_when_broken(
    tmp_path: Any, events: Any
) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.7 db.internal\n")
    options = Options()
    options.parseOptions(["--hosts", str(hosts)])
    factory = build_factory(options, reactor)
    assert await factory.connector.resolve("db.internal") == ["127.0.0.7"]
    hosts.write_text("127.0.0.8 db.internal\n")  # read at start: not yet
    assert await factory.connector.resolve("db.internal") == ["127.0.0.7"]
    factory.reload()  # SIGHUP
    assert await factory.connector.resolve("db.internal") == ["127.0.0.8"]
    hosts.unlink()
    factory.reload()  # a file that cannot be read: the names stay
    assert await factory.connector.resolve("db.internal") == ["127.0.0.8"]
    assert [e for e in events if e.get("event") == "socks5.reload_failed"]
