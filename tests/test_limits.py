"""Connection limits, failed-login throttling and graceful drain, in memory."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import SERVER, HalfCloseTransport, Harness
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.python.usage import UsageError

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import Address, Command, Request, UserPassRequest
from twisted_socks5.limits import (
    ConnectionLimits,
    client_key,
    default_max_connections,
)
from twisted_socks5.tap import Options, build_factory


def connect(h: Harness, ip: str = "127.0.0.1", port: int = 40000) -> Any:
    """Accept a client from ``ip``; None when the factory refused it."""
    addr = IPv4Address("TCP", ip, port)
    protocol = h.factory.buildProtocol(addr)
    transport = HalfCloseTransport(SERVER, addr)
    protocol.makeConnection(transport)
    if protocol.refused:
        assert transport.aborted
        return None
    return protocol


def limited(**kw: Any) -> Harness:
    h = Harness()
    h.factory.limits = ConnectionLimits(h.reactor.seconds, **kw)
    return h


def test_default_limit_follows_the_descriptor_limit() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 1 <= default_max_connections() <= max(1, soft // 2)


def test_global_limit_refuses_new_clients_only() -> None:
    h = limited(max_connections=2)  # fresh limits: the harness client is not counted
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    try:
        first = connect(h, "127.0.0.2")
        second = connect(h, "127.0.0.3")
        assert connect(h, "127.0.0.4") is None
    finally:
        globalLogPublisher.removeObserver(observer)
    assert not first.transport.disconnecting and not second.transport.disconnecting
    (event,) = [e for e in observer if e.get("event") == "socks5.refused"]
    assert event["client"] == "127.0.0.4"
    first.connectionLost(None)
    assert connect(h, "127.0.0.4") is not None


def test_per_client_limit() -> None:
    h = limited(max_connections=0, max_per_client=2)
    assert connect(h, "127.0.0.9") is not None
    assert connect(h, "127.0.0.9") is not None
    assert connect(h, "127.0.0.9") is None
    assert connect(h, "127.0.0.8") is not None


def test_ipv4_mapped_clients_count_as_ipv4() -> None:
    h = limited(max_connections=0, max_per_client=1)
    assert connect(h, "127.0.0.9") is not None
    assert connect(h, "::ffff:127.0.0.9") is None


def _fail_login(h: Harness, ip: str) -> None:
    protocol = connect(h, ip)
    protocol.dataReceived(b"\x05\x01\x02" + UserPassRequest(b"u", b"bad").to_bytes())
    protocol.connectionLost(None)


def test_failed_logins_throttle_that_address_for_a_while() -> None:
    h = limited(max_connections=0, auth_failures=3, auth_window=60)
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {b"u": b"good"}
    h.factory.authenticators = [UsernamePasswordAuthenticator.from_checkers(checker)]
    for _ in range(3):
        _fail_login(h, "127.0.0.66")
    assert connect(h, "127.0.0.66") is None
    assert connect(h, "127.0.0.67") is not None  # others are not affected
    h.reactor.advance(61)
    assert connect(h, "127.0.0.66") is not None


def test_drain_waits_for_open_tunnels_then_cuts_them() -> None:
    h = Harness()
    d = h.factory.drain(10)
    assert not d.called
    assert connect(h, "127.0.0.5") is None  # no new clients while draining
    h.reactor.advance(10)
    assert h.transport.aborted
    h.lose()
    assert d.called


def test_drain_finishes_as_soon_as_the_last_tunnel_closes() -> None:
    h = Harness()
    d = h.factory.drain(10)
    h.lose()
    assert d.called
    assert h.reactor.getDelayedCalls() == []


def test_raise_fd_limit_lifts_the_soft_limit_to_the_hard_one() -> None:
    import resource

    from twisted_socks5.limits import raise_fd_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        now = raise_fd_limit()
        assert now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        assert now == min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_splice_pipes_only_take_descriptors_no_connection_needs() -> None:
    # 64 descriptors: 10 connections at 3 each leave 34, room for 8 pipe pairs.
    limits = ConnectionLimits(lambda: 0.0, max_connections=1000)
    limits.fd_budget = 64
    for i in range(10):
        limits.opened(f"10.0.0.{i}")
    spliced = 0
    while limits.may_splice():
        limits.splice_started()
        spliced += 1
    assert spliced == 8
    assert limits._fds_in_use() == 10 * 3 + 8 * 4 == 62
    # A new client would need 3 more: refused rather than left to EMFILE.
    kind, why = limits.refusal("10.0.0.99")  # type: ignore[misc]
    assert kind == "server_full" and "descriptors" in why
    limits.splice_ended()
    assert limits.refusal("10.0.0.99") is None
    limits.opened("10.0.0.99")  # 33 connection descriptors + 28 in pipes
    assert not limits.may_splice()


def test_default_cap_no_longer_reserves_pipes_for_idle_tunnels() -> None:
    limits = ConnectionLimits(lambda: 0.0)
    # The last one admitted may still become a UDP association (four).
    assert limits.max_connections == (limits.fd_budget - 1) // 3
    limits.total = limits.max_connections - 1
    assert limits.refusal("10.9.9.9") is None


def test_no_limit_means_no_descriptor_check_either() -> None:
    """``--max-connections 0``: the process meets EMFILE itself (it survives it)."""
    limits = ConnectionLimits(lambda: 0.0, max_connections=0)
    limits.fd_budget = 6
    for i in range(5):
        limits.opened(f"10.0.0.{i}")
    assert limits.refusal("10.0.0.9") is None
    assert not limits.may_splice()  # pipes still never take the last ones


def _associate(h: Harness, ip: str) -> Any:
    """A client from ``ip`` that asks for a UDP association (None if refused)."""
    protocol = connect(h, ip)
    if protocol is not None:
        request = Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0))
        protocol.dataReceived(b"\x05\x01\x00" + request.to_bytes())
    return protocol


def test_udp_associations_count_the_four_descriptors_they_may_hold() -> None:
    h = limited(max_connections=1000, max_per_client=0)
    limits = h.factory.limits
    # Room for three associations of four descriptors, and three more.
    limits.fd_budget = 3 * 4 + 3
    held = [_associate(h, f"127.0.0.{i}") for i in range(1, 4)]
    assert all(p is not None and p.udp is not None for p in held)
    assert limits._fds_in_use() == 12
    # A fourth client (who could become an association) is refused at
    # accept, not left to fail with EMFILE.
    assert _associate(h, "127.0.0.9") is None
    held[0].connectionLost(Failure(ConnectionDone()))
    assert limits._fds_in_use() == 8 and limits.extra_fds == 2
    assert _associate(h, "127.0.0.9") is not None


def test_an_association_without_room_for_its_sockets_is_answered_0x01() -> None:
    h = limited(max_connections=1000, max_per_client=0)
    limits = h.factory.limits
    limits.fd_budget = 3 * 3 + 1  # three handshakes, then room for one more socket
    clients = [connect(h, f"127.0.0.{i}") for i in range(1, 4)]
    request = Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0))
    replies = []
    for protocol in clients:
        protocol.dataReceived(b"\x05\x01\x00" + request.to_bytes())
        replies.append(protocol.transport.value()[2:4])
    assert replies == [b"\x05\x00", b"\x05\x01", b"\x05\x01"]
    assert limits.extra_fds == 1
    assert limits._fds_in_use() <= limits.fd_budget


def test_one_client_gets_a_quarter_of_the_connections_by_default() -> None:
    limits = ConnectionLimits(lambda: 0.0, max_connections=100)
    assert limits.max_per_client == 25
    assert ConnectionLimits(lambda: 0.0, max_connections=2).max_per_client == 1
    assert ConnectionLimits(lambda: 0.0, max_connections=0).max_per_client == 0
    derived = ConnectionLimits(lambda: 0.0)
    assert derived.max_per_client == derived.max_connections // 4
    h = limited(max_connections=8)
    assert [connect(h, "127.0.0.7") is not None for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert connect(h, "127.0.0.8") is not None


def test_an_idle_udp_association_is_closed_by_default() -> None:
    h = Harness()
    assert h.factory.udp_idle_timeout == 300
    h.send(
        b"\x05\x01\x00"
        + Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)).to_bytes()
    )
    assert h.protocol.udp is not None
    h.reactor.pump([10] * 29)
    assert not h.transport.aborted
    h.reactor.pump([10] * 32)
    assert h.transport.aborted
    assert h.protocol.outcome == "idle timeout"


def test_a_busy_udp_association_stays() -> None:
    h = Harness()
    h.send(
        b"\x05\x01\x00"
        + Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)).to_bytes()
    )
    udp = h.protocol.udp
    assert udp is not None and udp.on_activity is not None
    for _ in range(20):
        udp.on_activity()  # what the association calls for each datagram
        h.reactor.advance(100)
    assert not h.transport.aborted


def test_twistd_socks5_defaults_keep_one_client_from_starving_the_rest() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from twisted_socks5.tap import Options, build_factory

    options = Options()
    options.parseOptions([])
    factory = build_factory(options, MemoryReactorClock())
    limits = factory.limits
    assert limits.max_per_client == limits.max_connections // 4 > 0
    assert factory.udp_idle_timeout == 300
    assert factory.bind_ports is None
    options = Options()
    options.parseOptions(
        ["--max-connections", "40", "--udp-idle-timeout", "off", "--bind-ports", "5-9"]
    )
    factory = build_factory(options, MemoryReactorClock())
    assert factory.limits.max_per_client == 10
    assert factory.udp_idle_timeout is None
    assert factory.bind_ports == (5, 9)


def test_client_key_groups_ipv6_by_prefix() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert (
        client_key("2001:db8::1") == client_key("2001:db8::ffff:2") == ("2001:db8::/64")
    )
    assert client_key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert client_key("2001:db8::1", 128) == "2001:db8::1"
    assert client_key("2001:db8:0:1::1", 48) == "2001:db8::/48"
    assert client_key("/run/socks.sock") == "/run/socks.sock"
    assert client_key("") == ""
    with pytest.raises(ValueError):
        ConnectionLimits(lambda: 0.0, ipv6_client_prefix=129)


def test_per_client_limit_counts_an_ipv6_network_as_one_client() -> None:
    h = limited(max_connections=0, max_per_client=2)
    assert connect(h, "2001:db8::1") is not None
    assert connect(h, "2001:db8::2") is not None
    assert connect(h, "2001:db8::3") is None  # same /64, another address
    assert connect(h, "2001:db8:0:1::1") is not None  # the next /64
    assert h.factory.limits.per_client == {"2001:db8::/64": 2, "2001:db8:0:1::/64": 1}
    each = limited(max_connections=0, max_per_client=1, ipv6_client_prefix=128)
    assert connect(each, "2001:db8::1") is not None
    assert connect(each, "2001:db8::2") is not None


def test_failed_logins_throttle_the_whole_ipv6_network() -> None:
    h = limited(max_connections=0, auth_failures=3, auth_window=60)
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {b"u": b"good"}
    h.factory.authenticators = [UsernamePasswordAuthenticator.from_checkers(checker)]
    for host in ("2001:db8::a", "2001:db8::b", "2001:db8::c"):
        _fail_login(h, host)
    assert connect(h, "2001:db8::d") is None  # a new address of that /64
    assert connect(h, "2001:db8:1::1") is not None


def test_ipv6_client_prefix_option() -> None:
    options = Options()
    options.parseOptions(["--ipv6-client-prefix", "48"])
    factory = build_factory(options, MemoryReactorClock())
    assert factory.limits.ipv6_client_prefix == 48
    assert factory.limits.key("2001:db8:0:5::1") == "2001:db8::/48"
    options = Options()
    options.parseOptions([])
    assert build_factory(options, MemoryReactorClock()).limits.ipv6_client_prefix == 64
    with pytest.raises(UsageError):
        Options().parseOptions(["--ipv6-client-prefix", "129"])
