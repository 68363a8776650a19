"""Access rules enforced by the running server, on loopback."""

from __future__ import annotations

from typing import Any, List

import pytest_twisted
from conftest import Echo, all_closed, closed_port
from test_bind_udp import (
    UDPEcho,
    associate,
    control,
    peer_connect,
    udp_ports,  # noqa: F401 - fixture
)
from test_clients import userpass
from test_errors import connect_request, exchange, failure

from twisted_socks5.auth import NoAuthAuthenticator
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
    UserPassRequest,
)
from twisted_socks5.rules import RuleSet
from twisted_socks5.tap import RulesFile

DENIED = b"\x05\x00" + failure(ReplyCode.CONNECTION_NOT_ALLOWED)


def _connection_events(events: Any, factory: Any) -> List[Any]:
    """This factory's connection events (an earlier test's may still arrive)."""
    return [
        e
        for e in events
        if e.get("event") == "socks5.connection" and e.get("log_source") is factory
    ]


@pytest_twisted.ensureDeferred
async def test_denied_destination_gets_0x02_and_the_rule_is_logged(
    make_proxy: Any, tcp_target: Any, events: Any
) -> None:
    rules = RuleSet.parse("deny to 127.0.0.2/32\ndefault allow\n", "test.rules")
    factory, port = make_proxy(policy=rules)
    target = tcp_target(Echo)
    out = await exchange(port, b"\x05\x01\x00" + connect_request("127.0.0.2", target))
    assert out == DENIED
    await all_closed(factory, 30)
    (event,) = _connection_events(events, factory)
    assert event["reply"] == 2
    assert event["rule"] == "test.rules:1: deny to 127.0.0.2/32"


@pytest_twisted.ensureDeferred
async def test_a_name_cannot_smuggle_a_denied_address(
    make_proxy: Any, tcp_target: Any, resolver: Any, events: Any
) -> None:
    rules = RuleSet.parse("deny to 127.0.0.0/8, ::1/128\ndefault allow\n", "r")
    factory, port = make_proxy(policy=rules)
    target = tcp_target(Echo)
    request = connect_request("innocent.test", target, AddressType.DOMAIN)
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED
    assert resolver.asked == ["innocent.test"]  # it was resolved, then judged
    await all_closed(factory, 30)
    (event,) = _connection_events(events, factory)
    assert event["rule"] == "r:1: deny to 127.0.0.0/8, ::1/128"


@pytest_twisted.ensureDeferred
async def test_a_denied_name_is_not_even_resolved(
    make_proxy: Any, resolver: Any
) -> None:
    rules = RuleSet.parse("deny to .blocked.test\ndefault allow\n")
    _, port = make_proxy(policy=rules)
    request = connect_request("www.blocked.test", 80, AddressType.DOMAIN)
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED
    assert resolver.asked == []


@pytest_twisted.ensureDeferred
async def test_denied_client_is_closed_before_any_byte(make_proxy: Any) -> None:
    rules = RuleSet.parse("deny from 127.0.0.0/8\ndefault allow\n")
    _, port = make_proxy(policy=rules)
    assert await exchange(port, b"\x05\x01\x00") == b""


@pytest_twisted.ensureDeferred
async def test_user_rules(make_proxy: Any, tcp_target: Any) -> None:
    rules = RuleSet.parse("allow user alice\ndefault deny\n")
    auths = [userpass(alice="pw", bob="pw"), NoAuthAuthenticator()]
    _, port = make_proxy(policy=rules, authenticators=auths)
    target = tcp_target(Echo)
    request = connect_request("127.0.0.1", target)

    async def as_user(name: bytes) -> bytes:
        login = UserPassRequest(name, b"pw").to_bytes()
        return await exchange(port, b"\x05\x01\x02" + login + request + b"ping")

    assert (await as_user(b"bob")).endswith(failure(ReplyCode.CONNECTION_NOT_ALLOWED))
    assert await exchange(port, b"\x05\x01\x00" + request) == DENIED


@pytest_twisted.ensureDeferred
async def test_udp_datagrams_to_denied_destinations_are_dropped(
    make_proxy: Any,
    udp_ports: Any,  # noqa: F811
) -> None:
    rules = RuleSet.parse("deny command udp to 127.0.0.3/32\ndefault allow\n")
    factory, port = make_proxy(policy=rules)
    echo = udp_ports(UDPEcho(), "127.0.0.1").getHost().port
    client, me, bound = await associate(port, udp_ports)
    to = (bound.host, bound.port)
    me.transport.write(
        UDPDatagram(Address.from_host("127.0.0.3", echo), b"no").to_bytes(), to
    )
    me.transport.write(
        UDPDatagram(Address.from_host("127.0.0.1", echo), b"ok").to_bytes(), to
    )
    data, _ = await me.next()
    assert data.endswith(b"ok")
    (server_side,) = factory.active
    assert server_side.udp.counters.drops["denied"] == 1
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_bind_peer_from_a_denied_address_is_refused(make_proxy: Any) -> None:
    rules = RuleSet.parse("deny command bind to 127.0.0.5/32\ndefault allow\n")
    _, port = make_proxy(policy=rules)
    client = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("0.0.0.0", 0))
    )
    first = await client.reply(1)
    connected, peer = peer_connect("127.0.0.1", first.address.port, "127.0.0.5")
    await connected
    await peer.closed
    ok, _ = peer_connect("127.0.0.1", first.address.port, "127.0.0.6")
    await ok
    assert (await client.reply(2)).address.host == "127.0.0.6"
    client.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_reload_swaps_rules_and_a_broken_file_keeps_them(
    make_proxy: Any, tcp_target: Any, tmp_path: Any
) -> None:
    path = tmp_path / "rules"
    path.write_text("default allow\n")
    policy = RulesFile(str(path))
    factory, port = make_proxy(policy=policy)
    request = b"\x05\x01\x00" + connect_request("127.0.0.1", closed_port())
    refused = b"\x05\x00" + failure(ReplyCode.CONNECTION_REFUSED)
    assert await exchange(port, request) == refused  # allowed: it was tried
    path.write_text("deny to 127.0.0.1/32\ndefault allow\n")
    factory.reload()
    assert await exchange(port, request) == DENIED
    path.write_text("this is not a rule\n")
    factory.reload()  # logged, and the old rules stay
    assert await exchange(port, request) == DENIED


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_the_rules_see_the_real_client(events: Any) -> None:
    """The PROXY header's source, not HAProxy's address, is the client."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString

    from twisted_socks5.server import SOCKS5ServerFactory

    rules = RuleSet.parse("deny from 198.51.100.0/24\ndefault allow\n")
    factory = SOCKS5ServerFactory(reactor=reactor, policy=rules)
    endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
    port = await endpoint.listen(factory)
    try:
        number = port.getHost().port
        header = b"PROXY TCP4 198.51.100.9 127.0.0.1 5555 1080\r\n"
        assert await exchange(number, header + b"\x05\x01\x00") == b""
        header = b"PROXY TCP4 192.0.2.9 127.0.0.1 5555 1080\r\n"
        out = await exchange(
            number,
            header
            + b"\x05\x01\x00"
            + b"\x05\x09\x00\x01"
            + b"\x7f\x00\x00\x01\x00\x50",
        )
        assert out.startswith(b"\x05\x00")
        await all_closed(factory, 30)
        refused = [e for e in events if e.get("event") == "socks5.refused"]
        assert [e["client"] for e in refused] == ["198.51.100.9"]
        (event,) = _connection_events(events, factory)
        assert event["client"] == "192.0.2.9:5555"
    finally:
        await port.stopListening()
