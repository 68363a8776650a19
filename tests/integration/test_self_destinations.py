"""
Destinations on the proxy host itself, from the wire: unspecified addresses
(refused whatever the rules say), the ``self`` network, and the protection a
server listening beyond loopback gets by default.

Names like ``0`` and ``0x0`` go through the system resolver on purpose:
getaddrinfo turns numeric names into addresses itself (inet_aton), without
asking any DNS server (checked with no network at all: ``unshare -rn``).
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import pytest_twisted
from conftest import Echo, all_closed, needs_ipv6, until
from test_bind_udp import (
    UDPEcho,
    associate,
    control,
    udp_ports,  # noqa: F401 - fixture
)
from test_errors import connect_request, exchange, failure
from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
)
from twisted_socks5.outbound import DirectConnector
from twisted_socks5.rules import RuleSet
from twisted_socks5.selfnet import SELF_RULE, UNSPECIFIED_RULE, HostAddresses
from twisted_socks5.tap import Options, makeService

DENIED = b"\x05\x00" + failure(ReplyCode.CONNECTION_NOT_ALLOWED)
#: The rule set the README showed before ``self`` existed.
OLD_README_RULES = "deny to 127.0.0.0/8, 10.0.0.0/8, ::1/128\ndefault allow\n"


def _system_resolver_proxy(make_proxy: Any, **kwargs: Any) -> Any:
    """A proxy resolving through getaddrinfo (numeric names only, here)."""
    return make_proxy(connector=DirectConnector(reactor, 5), **kwargs)


class Greet(Protocol):
    """Says hi and hangs up: a tunnel that got through ends by itself."""

    def connectionMade(self) -> None:
        self.transport.write(b"hi")
        self.transport.loseConnection()


def _events_of(events: Any, factory: Any) -> List[Any]:
    return [
        e
        for e in events
        if e.get("event") == "socks5.connection" and e.get("log_source") is factory
    ]


# --------------------------------------------------------------------------
# Unspecified destinations: never, whatever the rules


UNSPECIFIED_TARGETS = [
    ("0.0.0.0", AddressType.IPV4),
    ("0.1.2.3", AddressType.IPV4),
    ("0.0.0.0", AddressType.DOMAIN),
    ("0", AddressType.DOMAIN),
    ("0x0", AddressType.DOMAIN),
    pytest.param("::", AddressType.IPV6, marks=needs_ipv6),
    pytest.param("::ffff:0.0.0.0", AddressType.IPV6, marks=needs_ipv6),
]


@pytest.mark.parametrize("rules", [None, OLD_README_RULES, "default allow\n"])
@pytest.mark.parametrize(("host", "atyp"), UNSPECIFIED_TARGETS)
@pytest_twisted.ensureDeferred
async def test_connect_to_an_unspecified_address_is_refused(
    make_proxy: Any,
    tcp_target: Any,
    events: Any,
    host: str,
    atyp: AddressType,
    rules: Optional[str],
) -> None:
    """On Linux each of these reaches the loopback service listening there."""
    policy = None if rules is None else RuleSet.parse(rules, "r")
    factory, port = _system_resolver_proxy(make_proxy, policy=policy)
    target = tcp_target(Echo, "::1" if ":" in host else "127.0.0.1")
    request = connect_request(host, target, atyp)
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED
    await all_closed(factory, 30)
    (event,) = _events_of(events, factory)
    assert event["reply"] == 2
    assert UNSPECIFIED_RULE in event["outcome"]


@pytest_twisted.ensureDeferred
async def test_a_name_that_is_allowed_by_pattern_still_never_reaches_0000(
    make_proxy: Any, tcp_target: Any
) -> None:
    """
    The rules' answer to ``0x0`` is final (a host pattern allows it), so the
    connector's filtering resolver is the one check of its addresses.
    """
    rules = RuleSet.parse("allow to 0x0\ndeny to 127.0.0.0/8\ndefault deny\n")
    factory, port = _system_resolver_proxy(make_proxy, policy=rules)
    target = tcp_target(Echo)
    request = connect_request("0x0", target, AddressType.DOMAIN)
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED


@pytest.mark.parametrize("name", ["0.1.2.3", "0x0"])
@pytest.mark.parametrize("rules", [None, "default allow\n"])
@pytest_twisted.ensureDeferred
async def test_bind_expecting_an_unspecified_peer_is_refused(
    make_proxy: Any, name: str, rules: Optional[str]
) -> None:
    policy = None if rules is None else RuleSet.parse(rules)
    _, port = _system_resolver_proxy(make_proxy, policy=policy)
    atyp = AddressType.IPV4 if name[1] == "." else AddressType.DOMAIN
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address(atyp, name, 0))
    )
    reply = await client.reply(1)
    assert reply.reply is ReplyCode.CONNECTION_NOT_ALLOWED
    await client.closed


@pytest.mark.parametrize("rules", [None, OLD_README_RULES])
@pytest_twisted.ensureDeferred
async def test_udp_datagrams_to_unspecified_addresses_are_dropped(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
    events: Any,
    rules: Optional[str],
) -> None:
    policy = None if rules is None else RuleSet.parse(rules)
    factory, port = make_proxy(policy=policy)
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    to = (bound.host, bound.port)
    # Sent to 0.0.0.0, "no" would reach the echo on 127.0.0.1 and come back
    # first: the same sockets carry both, in order.
    for host, data in (("0.0.0.0", b"no"), ("0.9.9.9", b"no"), ("127.0.0.1", b"ok")):
        if rules is not None and host == "127.0.0.1":
            break
        me.transport.write(
            UDPDatagram(Address.from_host(host, echo), data).to_bytes(), to
        )
    (server_side,) = factory.active
    if rules is None:
        data, _ = await me.next()
        assert data.endswith(b"ok")
    else:
        await until(lambda: server_side.udp.counters.drops["denied"] == 2, "drops")
    assert server_side.udp.counters.drops["denied"] == 2
    assert not [d for d, _ in me.received if d.endswith(b"no")]
    (denied,) = [e for e in events if e.get("event") == "socks5.udp_denied"]
    assert denied["rule"] == UNSPECIFIED_RULE
    assert denied["destination"] == f"0.0.0.0:{echo}"
    client.transport.loseConnection()
    await all_closed(factory, 30)


# --------------------------------------------------------------------------
# UDP by name: every datagram, every resolved address


@pytest_twisted.ensureDeferred
async def test_udp_by_name_into_a_denied_network_is_dropped(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
) -> None:
    """
    The request check passes (``inside.test`` is a name, the CIDR waits for
    its addresses); only the check of the resolved address refuses it.
    Names resolve at once (LoopbackResolver), so datagrams are judged in the
    order sent, and ``ok.test`` (allowed by name) proves ``no`` was judged.
    """
    rules = RuleSet.parse(
        "allow to ok.test\ndeny to 127.0.0.0/8, ::1/128\ndefault allow\n"
    )
    factory, port = make_proxy(policy=rules)
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    to = (bound.host, bound.port)
    for name, data in (("inside.test", b"no"), ("ok.test", b"ok")):
        target = Address(AddressType.DOMAIN, name, echo)
        me.transport.write(UDPDatagram(target, data).to_bytes(), to)
    data, _ = await me.next()
    assert data.endswith(b"ok")
    (server_side,) = factory.active
    assert server_side.udp.counters.drops["denied"] == 1
    client.transport.loseConnection()
    await all_closed(factory, 30)


@needs_ipv6
@pytest_twisted.ensureDeferred
async def test_udp_by_name_uses_the_first_allowed_address(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
) -> None:
    """``v6.test`` is 127.0.0.1 then ::1; the rules refuse the first."""
    rules = RuleSet.parse("deny to 127.0.0.0/8\ndefault allow\n")
    factory, port = make_proxy(policy=rules)
    echo_port = udp_ports(UDPEcho(), "::1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    target = Address(AddressType.DOMAIN, "v6.test", echo_port)
    me.transport.write(UDPDatagram(target, b"hi").to_bytes(), (bound.host, bound.port))
    data, _ = await me.next()
    assert data.endswith(b"hi")
    client.transport.loseConnection()
    await all_closed(factory, 30)


# --------------------------------------------------------------------------
# The proxy host, on a server that protects it


def _loopback_only() -> HostAddresses:
    return HostAddresses(read=lambda: [])


@pytest.mark.parametrize(
    ("host", "atyp"),
    [
        ("127.0.0.1", AddressType.IPV4),
        ("127.0.0.1", AddressType.DOMAIN),
        ("localhost", AddressType.DOMAIN),
        pytest.param("::1", AddressType.IPV6, marks=needs_ipv6),
        pytest.param("::ffff:127.0.0.1", AddressType.IPV6, marks=needs_ipv6),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_protected_host_is_no_destination(
    make_proxy: Any, tcp_target: Any, events: Any, host: str, atyp: AddressType
) -> None:
    factory, port = _system_resolver_proxy(make_proxy, protect_host=_loopback_only())
    target = tcp_target(Echo, "::1" if host == "::1" else "127.0.0.1")
    request = connect_request(host, target, atyp)
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED
    await all_closed(factory, 30)
    (event,) = _events_of(events, factory)
    assert SELF_RULE in event["outcome"]


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        ("default allow\n", False),
        ("deny to 10.0.0.0/8\ndefault allow\n", False),
        ("allow to 127.0.0.0/8\n", False),  # self must be named
        ("allow to self\n", True),
        ("allow to localhost\n", False),
        ("allow to self port 1-65535\ndefault deny\n", True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_only_a_rule_naming_self_opens_a_protected_host(
    make_proxy: Any, tcp_target: Any, rules: str, allowed: bool
) -> None:
    host = _loopback_only()
    factory, port = make_proxy(
        protect_host=host, policy=RuleSet.parse(rules, host=host)
    )
    target = tcp_target(Greet)
    for address, atyp in (("127.0.0.1", AddressType.IPV4), ("localhost", 3)):
        request = connect_request(address, target, AddressType(atyp))
        out = await exchange(port, b"\x05\x01\x00" + request)
        if allowed:
            assert out.endswith(b"hi")
        else:
            assert out == DENIED
    await all_closed(factory, 30)


@pytest_twisted.ensureDeferred
async def test_udp_to_a_protected_host_is_dropped(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
) -> None:
    factory, port = make_proxy(protect_host=_loopback_only())
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    for host in ("127.0.0.1", "localhost"):
        atyp = AddressType.IPV4 if host[0].isdigit() else AddressType.DOMAIN
        target = Address(atyp, host, echo)
        me.transport.write(
            UDPDatagram(target, b"no").to_bytes(), (bound.host, bound.port)
        )
    (server_side,) = factory.active
    await until(lambda: server_side.udp.counters.drops["denied"] == 2, "drops")
    assert me.received == []
    client.transport.loseConnection()
    await all_closed(factory, 30)


# --------------------------------------------------------------------------
# As ``twistd socks5`` builds it


class _Started:
    def __init__(self, *args: str) -> None:
        options = Options()
        options.parseOptions(list(args))
        self.service: Any = makeService(options)
        self.service.startService()

    async def port(self) -> int:
        await until(lambda: bool(self.service.ports), "listening")
        return int(self.service.ports[0].getHost().port)

    def stop(self) -> Any:
        return self.service.stopService()


def _rules_file(tmp_path: Any, text: str) -> str:
    path = tmp_path / "rules"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("listen", "extra", "rules", "allowed"),
    [
        # Beyond loopback (all interfaces; the test talks to 127.0.0.1 only):
        ("tcp:0:interface=0.0.0.0", [], "allow from 127.0.0.0/8\n", False),
        (
            "tcp:0:interface=0.0.0.0",
            ["--allow-self-destinations"],
            "allow from 127.0.0.0/8\n",
            True,
        ),
        ("tcp:0:interface=0.0.0.0", [], "allow from 127.0.0.0/8 to self\n", True),
        ("tcp:0:interface=0.0.0.0", ["--auth", "memory:a:b"], None, False),
        # On loopback only, today's behaviour:
        ("tcp:0:interface=127.0.0.1", [], None, True),
    ],
)
@pytest_twisted.ensureDeferred
async def test_twistd_socks5_protects_the_host_when_exposed(
    tmp_path: Any,
    tcp_target: Any,
    listen: str,
    extra: List[str],
    rules: Optional[str],
    allowed: bool,
) -> None:
    args = ["--listen", listen, *extra]
    if rules is not None:
        args += ["--rules", _rules_file(tmp_path, rules)]
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    started = _Started(*args)
    try:
        port = await started.port()
        protected = [e for e in observer if e.get("event") == "socks5.self_protected"]
        assert bool(protected) is (
            "interface=0.0.0.0" in listen and "--allow-self-destinations" not in extra
        )
        target = tcp_target(Greet)
        greeting = b"\x05\x01\x00"
        if "--auth" in extra:
            greeting = b"\x05\x01\x02\x01\x01a\x01b"
        for host, atyp in (("127.0.0.1", AddressType.IPV4), ("localhost", 3)):
            request = connect_request(host, target, AddressType(atyp))
            out = await exchange(port, greeting + request)
            if "--auth" in extra:
                assert out[:4] == b"\x05\x02\x01\x00"
                out = b"\x05\x00" + out[4:]
            if allowed:
                assert out.endswith(b"hi"), out
            else:
                assert out == DENIED
    finally:
        globalLogPublisher.removeObserver(observer)
        await started.stop()


def test_reload_rereads_the_host_addresses(tmp_path: Any) -> None:
    """A reload (SIGHUP) reads the interfaces again, for rules and protection."""
    addresses = ["192.0.2.10"]

    def read() -> List[Any]:
        import ipaddress

        return [ipaddress.ip_address(a) for a in addresses]

    host = HostAddresses(read=read)
    from twisted_socks5.server import SOCKS5ServerFactory
    from twisted_socks5.tap import RulesFile

    rules = RulesFile(_rules_file(tmp_path, "deny to self\ndefault allow\n"), host)
    factory = SOCKS5ServerFactory(reactor=reactor, policy=rules, protect_host=host)
    dest = Address.from_host("192.0.2.11", 80)
    assert rules.check_resolved("127.0.0.1", None, 1, dest, "192.0.2.11").allowed
    addresses.append("192.0.2.11")
    factory.reload()
    assert not rules.check_resolved("127.0.0.1", None, 1, dest, "192.0.2.11").allowed
    assert "192.0.2.11" in host


@pytest.mark.parametrize(
    "rules",
    [
        "deny from 198.51.100.0/24\ndefault allow\n",
        "allow from 192.168.0.0/16\ndeny from 0.0.0.0/0\ndefault allow\n",
    ],
)
@pytest_twisted.ensureDeferred
async def test_twistd_socks5_refuses_to_start_an_open_relay(
    tmp_path: Any, rules: str
) -> None:
    """As users start it: the process stops at once, naming the open range."""
    from test_twistd import Twistd

    # Listening on all interfaces too, which makes it reachable from others.
    rules_file = _rules_file(tmp_path, rules)
    process = Twistd.start(tmp_path, "--listen", "tcp:0", "--rules", rules_file)
    try:
        await process.listening
    except RuntimeError as e:
        assert "refusing to start an open proxy" in str(e)
        assert "outside 'allow from' networks" in str(e)
    else:  # pragma: no cover - the guard failed
        process.transport.signalProcess("KILL")
        pytest.fail("an open relay started")
    assert await process.ended != 0


@pytest_twisted.ensureDeferred
async def test_the_udp_refusal_event_escapes_the_name(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
    events: Any,
) -> None:
    rules = RuleSet.parse("deny to self\ndefault allow\n")
    factory, port = make_proxy(policy=rules)
    client, me, bound = await associate(port, udp_ports)
    name = "evil\n2026 forged line\x1b[31m.test"
    target = Address(AddressType.DOMAIN, name, 9)
    me.transport.write(UDPDatagram(target, b"x").to_bytes(), (bound.host, bound.port))
    (server_side,) = factory.active
    await until(lambda: server_side.udp.counters.drops["denied"] == 1, "drop")
    (denied,) = [e for e in events if e.get("event") == "socks5.udp_denied"]
    assert "\n" not in denied["destination"] and "\x1b" not in denied["destination"]
    client.transport.loseConnection()
    await all_closed(factory, 30)
