"""
The rules' ``limit`` lines hold for SOCKS4 and HTTP clients as for SOCKS5
ones: a SOCKS4 or HTTP CONNECT tunnel is a session, and every forwarded
HTTP request counts against ``rate`` and holds a session while it is
answered.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, List, Tuple

from helpers import CLIENT, SERVER, HalfCloseTransport, Harness
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, Cooperator
from twisted.internet.testing import StringTransport

from twisted_socks5.bandwidth import UP, Meter
from twisted_socks5.codec import ReplyCode
from twisted_socks5.httpproxy import _MeteredBody
from twisted_socks5.limitstore import MemoryLimitStore
from twisted_socks5.rules import RuleSet
from twisted_socks5.rules.limit import BandwidthLimit

HTTP = ("socks5", "socks4", "http")
CONNECT = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n"
GET = b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"


def limited(rules: str) -> Harness:
    h = Harness(protocols=HTTP, protect_host=None, policy=RuleSet.parse(rules))
    h.factory.enable_limits(MemoryLimitStore(h.reactor)).start()
    return h


def another(h: Harness) -> Tuple[Any, HalfCloseTransport]:
    """One more client connection to the same server."""
    protocol = h.factory.buildProtocol(CLIENT)
    transport = HalfCloseTransport(SERVER, CLIENT)
    protocol.makeConnection(transport)
    return protocol, transport


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    return int(data[9:12])


def test_an_http_connect_over_its_sessions_is_403_until_one_closes() -> None:
    h = limited("limit from 127.0.0.0/8 sessions 1\nallow")
    h.send(CONNECT)
    assert len(h.connector.calls) == 1
    protocol, transport = another(h)
    protocol.dataReceived(CONNECT)
    assert status_of(transport.value()) == 403
    assert protocol.reply is ReplyCode.CONNECTION_NOT_ALLOWED
    assert "sessions 1" in (protocol.rule or "")
    assert len(h.connector.calls) == 1
    h.lose()  # the first tunnel's client goes: its session is released
    protocol, transport = another(h)
    protocol.dataReceived(CONNECT)
    assert len(h.connector.calls) == 2


def test_forwarded_requests_count_against_the_rate() -> None:
    h = limited("limit from 127.0.0.0/8 rate 2/1h\nallow")
    for n in (1, 2):
        h.send(GET)
        assert len(h.connector.calls) == n
        origin, _ = h.connector.succeed()
        origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert status_of(h.take()) == 200
    h.send(GET)
    assert status_of(h.take()) == 403
    assert len(h.connector.calls) == 2


def test_a_forwarded_request_holds_a_session_while_it_is_answered() -> None:
    h = limited("limit from 127.0.0.0/8 sessions 1\nallow")
    h.send(GET)
    origin, _ = h.connector.succeed()
    # Answered in part: the session is held, another client is refused.
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nok")
    protocol, transport = another(h)
    protocol.dataReceived(GET)
    assert status_of(transport.value()) == 403
    assert len(h.connector.calls) == 1
    # Answered whole: released, so the next request on the kept-alive
    # connection is admitted.
    origin.dataReceived(b"ok")
    assert status_of(h.take()) == 200
    h.send(GET)
    assert len(h.connector.calls) == 2


SOCKS4_CONNECT = b"\x04\x01\x01\xbb\x7f\x00\x00\x01bob\x00"


def test_a_socks4_connect_over_its_sessions_is_refused_0x5b() -> None:
    h = limited("limit from 127.0.0.0/8 sessions 1\nallow")
    h.send(SOCKS4_CONNECT)
    assert len(h.connector.calls) == 1
    protocol, transport = another(h)
    protocol.dataReceived(SOCKS4_CONNECT)
    assert transport.value()[:2] == b"\x00\x5b"
    assert "sessions 1" in (protocol.rule or "")
    assert len(h.connector.calls) == 1


def test_a_limit_line_can_name_the_protocol() -> None:
    h = limited("limit protocol http sessions 1\nallow")
    h.send(SOCKS4_CONNECT)
    protocol, transport = another(h)
    protocol.dataReceived(SOCKS4_CONNECT)  # not HTTP: not limited
    assert len(h.connector.calls) == 2
    protocol, transport = another(h)
    protocol.dataReceived(CONNECT)
    assert len(h.connector.calls) == 3
    protocol, transport = another(h)
    protocol.dataReceived(CONNECT)
    assert status_of(transport.value()) == 403


class LaterStore(MemoryLimitStore):
    """A store that answers on a later turn (as Redis does): :meth:`answer`."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock)
        self.waiting: List[Tuple[Deferred[Any], Any]] = []

    def open_session(self, key: str, maximum: int) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.waiting.append((d, super().open_session(key, maximum)))
        return d

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for d, answer in waiting:
            answer.chainDeferred(d)


def test_a_forwarded_request_releases_its_session_with_a_remote_store() -> None:
    # The session was only released when the store had answered within the
    # request's own call: with a remote store it stayed held (and the
    # request in the limiter's live set) once the answer was sent.
    h = Harness(
        protocols=HTTP,
        protect_host=None,
        policy=RuleSet.parse("limit from 127.0.0.0/8 sessions 1\nallow"),
    )
    store = LaterStore(h.reactor)
    h.factory.enable_limits(store).start()
    for n in (1, 2):
        h.send(GET)
        store.answer()
        assert len(h.connector.calls) == n, h.take()
        origin, _ = h.connector.succeed()
        origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        assert status_of(h.take()) == 200
    assert not h.factory.limiter.live


def test_a_forwarded_request_body_counts_against_the_quota() -> None:
    # The body was counted before the request was admitted, so into the
    # baseline the quota's bytes are reckoned from: uploads went uncounted.
    h = limited("limit from 127.0.0.0/8 quota 1000B/day\nallow")
    post = b"POST http://127.0.0.1:8080/ HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"
    h.send(post + b"x" * 5000)
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert status_of(h.take()) == 204
    h.send(GET)
    assert status_of(h.take()) == 403
    assert len(h.connector.calls) == 1


# --------------------------------------------------------------------------
# Bandwidth lines hold forwarded requests too (the origin's reads paused)

BURST = 64 * 1024  # bandwidth.MIN_BURST: what a 64KiB/s bucket holds
HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n"


def forwarding(h: Harness, size: int) -> Tuple[Any, HalfCloseTransport]:
    """A forwarded GET, its origin's response head sent: (origin, its transport)."""
    h.send(GET)
    origin, transport = h.connector.succeed()
    origin.dataReceived(HEAD % size)
    return origin, transport


def test_a_forwarded_download_is_held_by_a_bandwidth_line_then_arrives_whole() -> None:
    h = limited("limit from 127.0.0.0/8 bandwidth 64KiB/s per-connection\nallow")
    size = 3 * BURST
    origin, transport = forwarding(h, size)
    origin.dataReceived(b"a" * (BURST - 1000))  # within the burst
    assert transport.producerState == "producing"
    origin.dataReceived(b"b" * 2000)  # the burst spent: the origin is not read
    assert transport.producerState == "paused"
    h.reactor.advance(1.0)  # the debt is paid
    assert transport.producerState == "producing"
    sent = BURST + 1000
    while sent < size:
        assert transport.producerState == "producing"
        chunk = min(16384, size - sent)
        origin.dataReceived(b"c" * chunk)
        sent += chunk
        for _ in range(20):  # bounded: a gate never released fails below
            if transport.producerState != "paused":
                break
            h.reactor.advance(0.25)
    answer = h.take()
    assert status_of(answer) == 200
    body = answer.split(b"\r\n\r\n", 1)[1]
    assert len(body) == size and body.startswith(b"a" * (BURST - 1000))
    assert h.protocol.forward is None  # its meter stopped with it
    assert not h.reactor.getDelayedCalls() or all(
        "Meter" not in repr(call) for call in h.reactor.getDelayedCalls()
    )


def test_without_a_bandwidth_line_a_forward_has_no_meter() -> None:
    h = limited("limit from 127.0.0.0/8 sessions 5\nallow")
    origin, transport = forwarding(h, 4 * BURST)
    forward = h.protocol.forward
    assert forward is not None and forward.meter is None
    origin.dataReceived(b"x" * 4 * BURST)
    assert transport.producerState == "producing"
    assert status_of(h.take()) == 200


def test_a_connect_tunnel_and_a_forward_of_one_client_share_its_bucket() -> None:
    h = limited("limit from 127.0.0.0/8 bandwidth 64KiB/s per-user\nallow")
    h.send(CONNECT)
    target, _ = h.connector.succeed()
    assert status_of(h.take()) == 200
    tunnel_meter = h.protocol.tunnel.counters.meter
    protocol, client = another(h)
    protocol.dataReceived(GET)
    origin, transport = h.connector.succeed()
    forward = protocol.forward
    assert forward is not None and forward.meter is not None
    assert forward.meter.buckets[0][0] is tunnel_meter.buckets[0][0]
    # The tunnel's download spends the client's budget...
    target.dataReceived(b"t" * (BURST + 1000))
    assert tunnel_meter.buckets[0][0].tokens < 0, tunnel_meter.buckets[0][0].tokens
    # ...so the forward's origin is held from its first bytes on.
    origin.dataReceived(HEAD % 1000 + b"0123456789")
    assert transport.producerState == "paused"
    h.reactor.advance(1.0)
    assert transport.producerState == "producing"
    origin.dataReceived(b"x" * 990)
    assert status_of(client.value()) == 200


def test_a_reload_lowering_then_removing_the_line_reaches_a_live_forward() -> None:
    h = limited("limit from 127.0.0.0/8 bandwidth 64KiB/s per-connection\nallow")
    origin, transport = forwarding(h, 4 * BURST)
    forward = h.protocol.forward
    meter = forward.meter
    assert meter is not None and meter.buckets[0][0].rate == BURST
    h.factory.policy = RuleSet.parse(
        "limit from 127.0.0.0/8 bandwidth 16KiB/s per-connection\nallow"
    )
    h.factory.limiter.reload()
    assert forward.meter is meter and meter.buckets[0][0].rate == 16 * 1024
    origin.dataReceived(b"x" * (BURST + 32 * 1024))  # 2 s of debt at 16KiB/s
    assert transport.producerState == "paused"
    h.reactor.advance(1.0)  # enough at 64KiB/s, not at 16KiB/s
    assert transport.producerState == "paused"
    h.factory.policy = RuleSet.parse("allow")
    h.factory.limiter.reload()
    assert forward.meter is None
    assert transport.producerState == "producing"  # at once, no timer
    origin.dataReceived(b"x" * (3 * BURST - 32 * 1024))
    assert transport.producerState == "producing"
    assert status_of(h.take()) == 200


class _Metered:
    """What a request body asks of its forward: the meter."""

    def __init__(self, meter: Any) -> None:
        self.meter = meter


def test_a_forwarded_request_body_is_booked_and_its_sending_paused() -> None:
    clock = Clock()
    meter = Meter(clock, None)
    meter.set_limits([BandwidthLimit(float(BURST), "per-connection", "c")])
    cooperator = Cooperator(
        terminationPredicateFactory=lambda: lambda: True,  # one chunk a tick
        scheduler=lambda step: clock.callLater(0, step),
    )
    size = 4 * BURST
    body = _MeteredBody(BytesIO(b"u" * size), _Metered(meter), cooperator)
    origin = StringTransport()
    origin.registerProducer(body, True)  # as the Agent does
    meter.feed(UP, body, origin)
    done: List[Any] = []
    body.startProducing(origin).addBoth(done.append)
    for _ in range(5):
        clock.advance(0)
    sent = len(origin.value())
    assert BURST < sent < size  # the burst and one read, then held
    for _ in range(5):
        clock.advance(0)
    assert len(origin.value()) == sent
    for _ in range(40):
        if done:
            break
        clock.advance(0.5)
    assert done == [None] and origin.value() == b"u" * size
