"""
Enforcing the rules' limit lines in memory: sessions counted while open and
released once, rates, quotas (refused, and live tunnels cut), reloads, the
store's failures (open/closed), metrics, and no cost without limit lines.
"""

from __future__ import annotations

import pathlib
import socket
import struct
import sys
from typing import Any, List, Optional

import pytest
from helpers import SERVER, FakeConnector, UDPReactor
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from zope.interface import implementer

from twisted_socks5.auth import ProxyRealm, UsernamePasswordAuthenticator
from twisted_socks5.limiting import Limiter
from twisted_socks5.limitstore import (
    ILimitStore,
    LimitStoreUnavailable,
    MemoryLimitStore,
)
from twisted_socks5.rules import BandwidthLimit, RuleSet, RulesFile
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.testing import HalfCloseTransport

GRANTED = b"\x05\x00\x00\x01\x7f\x00\x00\x01\xc3\x50"


def _authenticator() -> UsernamePasswordAuthenticator:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw", bob=b"pw")
    return UsernamePasswordAuthenticator(Portal(ProxyRealm(), [checker]))


class Server:
    """One factory with its limits, and clients connected to it in memory."""

    def __init__(self, rules: Any, store: Optional[ILimitStore] = None, **kw: Any):
        self.reactor = UDPReactor()
        self.connector = FakeConnector()
        if isinstance(rules, str):
            rules = RuleSet.parse(rules, "limits.rules")
        self.factory = SOCKS5ServerFactory(
            [_authenticator()],
            reactor=self.reactor,
            connector=self.connector,
            policy=rules,
        )
        self.store = store or MemoryLimitStore(self.reactor)
        self.limiter: Limiter = self.factory.enable_limits(self.store, **kw)
        self.limiter.start()
        self.clients = 0

    def request(self, user: str = "alice", port: int = 8080) -> Client:
        self.clients += 1
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + self.clients)
        protocol = self.factory.buildProtocol(peer)
        transport = HalfCloseTransport(SERVER, peer)
        protocol.makeConnection(transport)
        name = user.encode()
        protocol.dataReceived(b"\x05\x01\x02")
        protocol.dataReceived(b"\x01" + bytes([len(name)]) + name + b"\x02pw")
        transport.clear()
        destination = socket.inet_aton("127.0.0.1") + struct.pack("!H", port)
        protocol.dataReceived(b"\x05\x01\x00\x01" + destination)
        return Client(self, protocol, transport)


class Client:
    def __init__(self, server: Server, protocol: Any, transport: Any) -> None:
        self.server = server
        self.protocol = protocol
        self.transport = transport

    def connected(self) -> Client:
        """The outbound connect succeeds: the tunnel relays."""
        self.server.connector.succeed()
        return self

    @property
    def reply(self) -> int:
        value = self.transport.value()
        return value[1] if len(value) > 1 else -1

    def close(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.transport.disconnected = True
        self.protocol.connectionLost(Failure(ConnectionDone()))


def test_the_third_session_is_refused_until_one_closes(events: Any) -> None:
    server = Server("limit user alice sessions 2\nallow user *\n")
    first = server.request().connected()
    second = server.request().connected()
    assert first.transport.value() == second.transport.value() == GRANTED
    third = server.request()
    assert third.reply == 2
    assert "limits.rules:1: limit user alice sessions 2 (2 open)" in third.protocol.rule
    # Bob is counted apart.
    assert server.request("bob").connected().reply == 0
    first.close()
    assert server.request().connected().reply == 0
    # Bob's requests match no sessions line: not counted.
    assert server.store.sessions == {"user:alice": 2}  # type: ignore[attr-defined]


def test_a_session_is_released_exactly_once() -> None:
    server = Server("limit user * sessions 5\nallow user *\n")
    clients = [server.request() for _ in range(3)]
    clients[0].connected()
    server.connector.fail(ConnectionRefusedError(), 1)  # a failed connect
    clients[2].close()  # gone while connecting
    for client in clients:
        client.close()
        client.close()
    assert server.store.sessions == {}  # type: ignore[attr-defined]
    assert server.limiter.live == set()


def test_refused_requests_hold_no_session() -> None:
    server = Server("limit user * rate 1/1h\nlimit user * sessions 5\nallow user *\n")
    server.request().connected()
    refused = server.request()
    assert refused.reply == 2
    assert "rate 1/3600s" in refused.protocol.rule
    assert server.store.sessions == {"user:alice": 1}  # type: ignore[attr-defined]


def test_rate_refuses_the_twenty_first_request_in_its_second() -> None:
    server = Server("limit user alice rate 20/1s\nallow user *\n")
    replies = [server.request().reply for _ in range(21)]
    # Allowed ones wait for their connect (no reply yet); the 21st is refused.
    assert replies == [-1] * 20 + [2]
    server.reactor.advance(1)
    assert server.request().reply == -1
    assert server.request("bob").reply == -1


def test_only_the_first_matching_line_of_a_kind_applies() -> None:
    server = Server(
        "limit user alice port 8080 sessions 1\n"
        "limit user alice sessions 3\n"
        "allow user *\n"
    )
    server.request().connected()
    assert server.request().reply == 2
    assert server.request(port=9090).connected().reply == 0


def test_a_used_up_quota_refuses_and_cuts_live_tunnels(events: Any) -> None:
    server = Server("limit user alice quota 1KiB/day\nallow user *\n")
    live = server.request().connected()
    other = server.request("bob").connected()
    live.protocol.counters.bytes_down += 600
    other.protocol.counters.bytes_down += 5000
    server.reactor.advance(5)
    assert not live.transport.disconnecting
    live.protocol.counters.bytes_up += 500
    server.reactor.advance(5)
    assert live.transport.disconnecting
    assert "quota used up" in live.protocol.outcome
    assert [e for e in events if e.get("event") == "socks5.quota_cut"]
    assert not other.transport.disconnecting  # bob has no quota line
    live.close()
    assert server.request().reply == 2
    assert server.request("bob").reply == -1


def test_the_last_bytes_count_at_close() -> None:
    server = Server("limit user alice quota 1000B/hour\nallow user *\n")
    client = server.request().connected()
    client.protocol.counters.bytes_up += 999
    client.close()
    assert server.store.usage[("user:alice", "hour")][1] == 999  # type: ignore[attr-defined]
    assert server.request().reply == -1


def test_udp_datagram_bytes_count_too() -> None:
    from twisted_socks5.limiting import _bytes_of

    class Counters:
        bytes_up = 3
        bytes_down = 4

    class Ctx:
        counters = Counters()

        class udp:  # noqa: N801
            counters = Counters()

    assert _bytes_of(Ctx()) == 14


@implementer(ILimitStore)
class DownStore(MemoryLimitStore):
    """A memory store whose backend goes down and comes back."""

    down = False

    def _maybe(self, call: Any, *args: Any) -> defer.Deferred[Any]:
        if self.down:
            return defer.fail(LimitStoreUnavailable("connection refused"))
        result: defer.Deferred[Any] = call(*args)
        return result

    def open_session(self, key: str, maximum: int) -> defer.Deferred[bool]:
        return self._maybe(super().open_session, key, maximum)

    def hit_rate(self, key: str, maximum: int, interval: float) -> defer.Deferred[bool]:
        return self._maybe(super().hit_rate, key, maximum, interval)

    def quota_used(self, key: str, period: str) -> defer.Deferred[int]:
        return self._maybe(super().quota_used, key, period)

    def close_session(self, key: str) -> defer.Deferred[None]:
        return self._maybe(super().close_session, key)

    def add_usage(self, key: str, period: str, nbytes: int) -> defer.Deferred[int]:
        return self._maybe(super().add_usage, key, period, nbytes)


@pytest.mark.parametrize("line", ["sessions 5", "quota 1GiB/day"])
def test_store_down_closed_refuses(line: str, events: Any) -> None:
    store = DownStore(UDPReactor())
    server = Server(f"limit user * {line}\nallow user *\n", store)
    store.down = True
    for _ in range(3):
        client = server.request()
        assert client.reply == 2
        assert "limits store unavailable" in client.protocol.rule
    down = [e for e in events if e.get("event") == "socks5.limits_store_down"]
    assert len(down) == 1
    store.down = False
    assert server.request().reply == -1
    assert [e for e in events if e.get("event") == "socks5.limits_store_up"]


@pytest.mark.parametrize("line", ["sessions 5", "quota 1GiB/day"])
def test_store_down_open_admits(line: str) -> None:
    store = DownStore(UDPReactor())
    server = Server(
        f"limit user * {line}\nallow user *\n", store, on_store_failure="open"
    )
    store.down = True
    client = server.request()
    assert client.reply == -1
    client.connected().close()
    assert store.sessions == {}


def test_store_down_rate_admits_even_closed() -> None:
    store = DownStore(UDPReactor())
    server = Server("limit user * rate 1/1h\nallow user *\n", store)
    store.down = True
    assert [server.request().reply for _ in range(3)] == [-1, -1, -1]


def test_an_asynchronous_store_holds_the_request_until_it_answers() -> None:
    class Later(MemoryLimitStore):
        def __init__(self, clock: Any) -> None:
            super().__init__(clock)
            self.waiting: List[defer.Deferred[Any]] = []

        def open_session(self, key: str, maximum: int) -> defer.Deferred[bool]:
            d: defer.Deferred[bool] = defer.Deferred()
            answer = super().open_session(key, maximum)
            self.waiting.append(d)
            answer.addCallback(d.callback)
            return d

    store = Later(UDPReactor())
    server = Server("limit user * sessions 1\nallow user *\n", store)
    # The Deferred fired at once above: make one that has not.
    pending: defer.Deferred[bool] = defer.Deferred()
    store.open_session = lambda key, maximum: pending  # type: ignore[method-assign]
    client = server.request()
    assert server.connector.calls == []
    pending.callback(True)
    assert len(server.connector.calls) == 1
    assert client.connected().reply == 0


def test_no_limit_lines_no_store_call_no_state() -> None:
    class Counting(MemoryLimitStore):
        calls = 0

        def __getattribute__(self, name: str) -> Any:
            if name in ("open_session", "hit_rate", "quota_used", "add_usage"):
                type(self).calls += 1
            return super().__getattribute__(name)

    store = Counting(UDPReactor())
    server = Server("allow user *\n", store)
    client = server.request().connected()
    client.protocol.counters.bytes_up += 10
    server.reactor.advance(60)
    client.close()
    assert Counting.calls == 0
    assert client.protocol.limited is None
    assert "limited" not in vars(client.protocol)


def test_refusals_are_counted_in_metrics() -> None:
    pytest.importorskip("prometheus_client")
    server = Server("limit user * sessions 1\nallow user *\n", per_user_metrics=True)
    metrics = server.factory.enable_metrics()
    server.request().connected()
    server.request()
    server.request("bob").connected()
    text = metrics.render().decode()
    assert 'socks5_limit_refusals_total{limit="sessions"} 1.0' in text
    assert (
        'socks5_limit_refusals_by_user_total{limit="sessions",user="alice"} 1.0' in text
    )


def test_without_per_user_metrics_no_user_label() -> None:
    pytest.importorskip("prometheus_client")
    server = Server("limit user * sessions 1\nallow user *\n")
    metrics = server.factory.enable_metrics()
    server.request().connected()
    server.request()
    text = metrics.render().decode()
    assert 'socks5_limit_refusals_total{limit="sessions"} 1.0' in text
    assert "user=" not in text


def test_reload_applies_new_limits_to_new_requests_and_live_quotas(
    tmp_path: pathlib.Path,
) -> None:
    path = tmp_path / "rules"
    path.write_text("allow user *\n")
    server = Server(RulesFile(str(path)))
    live = server.request().connected()
    live.protocol.counters.bytes_up += 4096
    path.write_text(
        "limit user alice quota 1KiB/hour\nlimit user * sessions 1\nallow user *\n"
    )
    server.factory.reload()
    # Bytes before the reload are not charged; new ones are.
    assert not live.transport.disconnecting
    assert server.request("bob").connected().reply == 0
    assert server.request("bob").reply == 2
    live.protocol.counters.bytes_up += 2048
    server.reactor.advance(5)
    assert live.transport.disconnecting

    # A broken file keeps the limits in force.
    path.write_text("limit user * sessions 0\nallow user *\n")
    server.factory.reload()
    assert server.request("bob").reply == 2


def test_reload_lowering_a_quota_cuts_at_once(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "rules"
    path.write_text("limit user alice quota 1MiB/day\nallow user *\n")
    server = Server(RulesFile(str(path)))
    live = server.request().connected()
    live.protocol.counters.bytes_up += 2000
    server.reactor.advance(5)
    assert not live.transport.disconnecting
    path.write_text("limit user alice quota 1000B/day\nallow user *\n")
    server.factory.reload()
    assert live.transport.disconnecting


def test_the_bandwidth_keys() -> None:
    server = Server(
        "limit user * bandwidth 1MiB/s per-user\n"
        "limit user * bandwidth 2KiB/s per-connection\n"
        "limit user * bandwidth 3MB/s per-rule\n"
        "allow user *\n"
    )
    client = server.request().connected()
    limits = server.limiter.bandwidth_limits(client.protocol, client.protocol.limited)
    assert [(b.rate_bytes_per_s, b.scope) for b in limits] == [
        (1048576.0, "per-user"),
        (2048.0, "per-connection"),
        (3e6, "per-rule"),
    ]
    assert limits[0].key == "user:alice"
    assert limits[1].key.startswith("connection:")
    assert limits[2].key == "rule:3"


def test_anonymous_clients_count_by_address() -> None:
    from twisted_socks5.auth import NoAuthAuthenticator

    reactor = UDPReactor()
    factory = SOCKS5ServerFactory(
        [NoAuthAuthenticator()],
        reactor=reactor,
        connector=FakeConnector(),
        policy=RuleSet.parse(
            "limit from 127.0.0.0/8 sessions 1\nallow from 127.0.0.1\n"
        ),
    )
    factory.enable_limits(MemoryLimitStore(reactor))
    replies = []
    for port in (1, 2):
        peer = IPv4Address("TCP", "127.0.0.1", port)
        protocol = factory.buildProtocol(peer)
        transport = HalfCloseTransport(SERVER, peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x05\x01\x00")
        transport.clear()
        protocol.dataReceived(b"\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90")
        replies.append(transport.value()[1:2])
    assert replies == [b"", b"\x02"]
    assert factory.limiter.store.sessions == {"client:127.0.0.1": 1}


def test_udp_associations_and_binds_hold_a_session_while_open() -> None:
    server = Server("limit user alice sessions 2\nallow user *\n")
    clients = []
    for command in (b"\x03", b"\x02", b"\x03"):
        server.clients += 1
        peer = IPv4Address("TCP", "127.0.0.1", 41000 + server.clients)
        protocol = server.factory.buildProtocol(peer)
        transport = HalfCloseTransport(SERVER, peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x05\x01\x02\x01\x05alice\x02pw")
        transport.clear()
        protocol.dataReceived(b"\x05" + command + b"\x00\x01\x00\x00\x00\x00\x00\x00")
        clients.append(Client(server, protocol, transport))
    udp, bind, refused = clients
    assert udp.reply == 0 and udp.protocol.udp is not None
    assert bind.reply == 0  # BIND's first reply: listening
    assert refused.reply == 2
    assert server.store.sessions == {"user:alice": 2}  # type: ignore[attr-defined]
    udp.close()
    bind.close()
    assert server.store.sessions == {}  # type: ignore[attr-defined]


def test_a_quota_reached_exactly_is_used_up() -> None:
    server = Server("limit user alice quota 1000B/hour\nallow user *\n")
    client = server.request().connected()
    client.protocol.counters.bytes_up += 1000
    client.close()
    assert server.request().reply == 2


def test_a_live_tunnel_reaching_its_quota_exactly_is_cut() -> None:
    server = Server("limit user alice quota 1000B/hour\nallow user *\n")
    client = server.request().connected()
    client.protocol.counters.bytes_up += 999
    server.reactor.advance(5)
    assert not client.transport.disconnecting
    client.protocol.counters.bytes_down += 1
    server.reactor.advance(5)
    assert client.transport.disconnecting


def test_a_store_down_at_close_and_flush_is_logged_once(events: Any) -> None:
    store = DownStore(UDPReactor())
    server = Server(
        "limit user * sessions 5\nlimit user * quota 1GiB/day\nallow user *\n", store
    )
    clients = [server.request().connected() for _ in range(2)]
    store.down = True
    for client in clients:
        client.protocol.counters.bytes_up += 10
    server.reactor.advance(5)
    for client in clients:
        client.close()
    down = [e for e in events if e.get("event") == "socks5.limits_store_down"]
    assert len(down) == 1
    assert server.limiter.live == set()


def test_bytes_a_failed_flush_did_not_add_are_sent_again() -> None:
    store = DownStore(UDPReactor())
    server = Server("limit user * quota 1GiB/day\nallow user *\n", store)
    client = server.request().connected()
    client.protocol.counters.bytes_up += 10
    store.down = True
    server.reactor.advance(5)
    client.protocol.counters.bytes_up += 5
    server.reactor.advance(5)
    store.down = False
    client.protocol.counters.bytes_down += 1
    client.close()
    assert list(store.usage.values())[0][1] == 16


def test_each_user_has_a_count_of_their_own() -> None:
    server = Server("limit user * sessions 1\nallow user *\n")
    assert server.request().connected().reply == 0
    assert server.request("bob").connected().reply == 0
    assert server.request().reply == 2


def test_bandwidth_lines_reach_the_bandwidth_module(
    monkeypatch: Any, tmp_path: pathlib.Path
) -> None:
    """throttle() at tunnel start, update() on reload (a stand-in module)."""
    import types

    calls: List[Any] = []
    module = types.ModuleType("twisted_socks5.bandwidth")
    module.throttle = lambda tunnel, limits, store: calls.append(  # type: ignore[attr-defined]
        ("throttle", tunnel, limits, store)
    )
    module.update = lambda tunnel, limits: calls.append(("update", tunnel, limits))  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "twisted_socks5.bandwidth", module)
    path = tmp_path / "rules"
    path.write_text("limit user * bandwidth 1MiB/s per-user\nallow user *\n")
    server = Server(RulesFile(str(path)))
    client = server.request().connected()
    plain = server.request("bob", port=9090)
    ((kind, tunnel, limits, store),) = calls
    assert (kind, tunnel, store) == ("throttle", client.protocol.tunnel, server.store)
    assert limits == [BandwidthLimit(1048576.0, "per-user", "user:alice")]
    path.write_text("limit user alice bandwidth 512KiB/s per-user\nallow user *\n")
    server.factory.reload()
    assert calls[1] == (
        "update",
        client.protocol.tunnel,
        [BandwidthLimit(524288.0, "per-user", "user:alice")],
    )
    assert plain.protocol.tunnel is None and len(calls) == 2


def test_the_console_sees_what_the_limits_hold_of_a_user() -> None:
    server = Server(
        "limit user alice sessions 3\n"
        "limit user alice quota 1MiB/day\n"
        "limit user alice bandwidth 1MiB/s per-user\n"
        "allow user *\n"
    )
    assert server.factory.user_limits("alice") == {
        "sessions": 0,
        "quotas": [],
        "bandwidth": [],
    }
    first = server.request().connected()
    server.request().connected()
    first.protocol.counters.bytes_down += 1000
    server.limiter.flush()
    view = server.factory.user_limits("alice")
    assert view["sessions"] == 2
    (quota,) = view["quotas"]
    assert quota["limit"] == 1 << 20 and quota["used"] == 1000
    assert quota["line"] == "limits.rules:2: limit user alice quota 1MiB/day"
    assert len(view["bandwidth"]) == 1
    assert server.factory.user_limits("bob")["sessions"] == 0
    first.close()
    assert server.factory.user_limits("alice")["sessions"] == 1


def test_a_factory_without_limits_shows_none() -> None:
    factory = SOCKS5ServerFactory(reactor=UDPReactor())
    assert factory.user_limits("alice") is None
