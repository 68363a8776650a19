"""The server protocol driven in memory: exact bytes in, exact bytes out."""

from __future__ import annotations

import errno
from typing import Any, Optional

import pytest
from helpers import CLIENT, SERVER, HalfCloseTransport, Harness
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, error
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_socks5.auth import NoAuthAuthenticator, UsernamePasswordAuthenticator
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
    UserPassRequest,
)
from twisted_socks5.interfaces import (
    AuthResult,
    AuthStep,
    IAuthenticator,
    IAuthNegotiation,
)
from twisted_socks5.replies import reply_for_failure
from twisted_socks5.server import EARLY_DATA_PAUSE, MAX_EARLY_DATA, State

GREET_NOAUTH = b"\x05\x01\x00"
GREET_USERPASS = b"\x05\x01\x02"
TARGET = Address(AddressType.IPV4, "127.0.0.1", 8080)
CONNECT = Request(Command.CONNECT, TARGET).to_bytes()
BOUND = Address(AddressType.IPV4, "127.0.0.1", 50000)
SUCCESS = Reply(ReplyCode.SUCCEEDED, BOUND).to_bytes()
AUTH_OK = UserPassRequest(b"alice", b"s3cret").to_bytes()
AUTH_BAD = UserPassRequest(b"alice", b"wrong").to_bytes()


def failure_reply(code: ReplyCode) -> bytes:
    return Reply(code).to_bytes()


def userpass_harness(**kw: Any) -> Harness:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"s3cret")
    checker.users = {b"alice": b"s3cret"}
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    return Harness(authenticators=[auth, NoAuthAuthenticator()], **kw)


def relaying(h: Harness) -> Any:
    h.send(GREET_NOAUTH + CONNECT)
    outbound, out_transport = h.connector.succeed()
    return outbound, out_transport


# --------------------------------------------------------------------------
# Method negotiation


def test_no_auth_connect_success_reply_carries_outbound_local_address() -> None:
    h = Harness()
    h.send(GREET_NOAUTH)
    assert h.take() == b"\x05\x00"
    h.send(CONNECT)
    assert [c[0] for c in h.connector.calls] == [TARGET]
    assert h.take() == b""  # never "succeeded" before the connect succeeds
    h.connector.succeed()
    assert h.take() == SUCCESS
    assert h.protocol.state is State.RELAYING


def test_no_acceptable_method_answers_ff_and_closes() -> None:
    h = Harness()  # offers only 0x00
    h.send(b"\x05\x02\x01\x02")
    assert h.take() == b"\x05\xff"
    assert h.closing


def test_server_preference_wins_over_client_order() -> None:
    h = userpass_harness()
    h.send(b"\x05\x02\x00\x02")  # client prefers no-auth; we prefer 0x02
    assert h.take() == b"\x05\x02"


@pytest.mark.parametrize(
    "greeting",
    [b"\x04\x01\x00", b"\x05\x00", b"\x00", b"GET / HTTP/1.1\r\n\r\n"],
    ids=["socks4", "nmethods-0", "version-0", "http"],
)
def test_bad_greeting_closes_without_reply(greeting: bytes) -> None:
    h = Harness()
    h.send(greeting)
    assert h.take() == b""
    assert h.closing


# --------------------------------------------------------------------------
# RFC 1929


def test_userpass_success_then_request() -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + AUTH_OK + CONNECT)
    assert h.take() == b"\x05\x02\x01\x00"
    assert h.protocol.user == "alice"
    h.connector.succeed()
    assert h.take() == SUCCESS


def test_userpass_wrong_password_status_1_and_close() -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + AUTH_BAD + CONNECT)
    assert h.take() == b"\x05\x02\x01\x01"
    assert h.closing
    assert h.connector.calls == []  # the pipelined request is never honoured


def test_userpass_unknown_user_fails() -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + UserPassRequest(b"mallory", b"s3cret").to_bytes())
    assert h.take() == b"\x05\x02\x01\x01"
    assert h.closing


def test_userpass_malformed_closes_without_status() -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS)
    h.take()
    h.send(b"\x05\x05alice\x06s3cret")
    assert h.take() == b""
    assert h.closing


@pytest.mark.parametrize(
    "message",
    [b"\x01\x00\x06s3cret", b"\x01\x05alice\x00", b"\x01\x00", b"\x01\x00\x00"],
    ids=["empty-user", "empty-password", "empty-user-alone", "both-empty"],
)
def test_userpass_empty_credentials_get_status_1_then_close(message: bytes) -> None:
    """RFC 1929: a failed authentication is answered before the close."""
    h = userpass_harness()
    h.send(GREET_USERPASS)
    h.take()
    h.send(message + CONNECT)
    assert h.take() == b"\x01\x01"
    assert h.closing
    assert h.connector.calls == []
    assert h.protocol.outcome == "authentication failed"


def test_slow_checker_holds_client_until_it_answers() -> None:
    d: defer.Deferred[Any] = defer.Deferred()

    @implementer(IAuthNegotiation)
    class Slow:
        max_message_size = 16

        def start(self) -> Optional[AuthResult]:
            return None

        def data_received(self, data: bytes) -> Optional[AuthStep]:
            return AuthStep(1, d) if data else None

    @implementer(IAuthenticator)
    class SlowAuth:
        method = 0x80
        name = "slow"

        def negotiate(self, client: Any) -> IAuthNegotiation:
            return Slow()

    h = Harness(authenticators=[SlowAuth()])
    h.send(b"\x05\x01\x80" + b"X" + CONNECT)
    assert h.take() == b"\x05\x80"
    # Held, not paused: a client that goes away meanwhile must be noticed
    # (see test_auth.py), but nothing it sent is acted on before the answer.
    assert h.protocol.state is State.AUTHENTICATING
    assert h.connector.calls == []
    d.callback(AuthResult.granted(reply=b"OK", user="bob"))
    assert h.take() == b"OK"
    assert [c[0] for c in h.connector.calls] == [TARGET]
    assert h.protocol.user == "bob"


def test_third_party_multi_round_method() -> None:
    """A private method (0x81) with a challenge and a response."""

    @implementer(IAuthNegotiation)
    class ChallengeResponse:
        max_message_size = 8

        def __init__(self) -> None:
            self.round = 0

        def start(self) -> Optional[AuthResult]:
            return None

        def data_received(self, data: bytes) -> Optional[AuthStep]:
            if len(data) < 4:
                return None
            self.round += 1
            if self.round == 1:
                return AuthStep(4, AuthResult(reply=b"CHAL", done=False))
            ok = data[:4] == b"RESP"
            return AuthStep(4, AuthResult(reply=b"DONE", success=ok, user="carol"))

    @implementer(IAuthenticator)
    class CR:
        method = 0x81
        name = "cr"

        def negotiate(self, client: Any) -> IAuthNegotiation:
            return ChallengeResponse()

    assert verifyObject(IAuthenticator, CR())
    h = Harness(authenticators=[CR()])
    h.send(b"\x05\x01\x81HELO")
    assert h.take() == b"\x05\x81CHAL"
    h.send(b"RESP" + CONNECT)
    assert h.take() == b"DONE"
    assert len(h.connector.calls) == 1


def test_auth_message_beyond_the_method_bound_closes() -> None:
    @implementer(IAuthNegotiation)
    class NeverEnough:
        max_message_size = 8

        def start(self) -> Optional[AuthResult]:
            return None

        def data_received(self, data: bytes) -> Optional[AuthStep]:
            return None

    @implementer(IAuthenticator)
    class Auth:
        method = 0x82
        name = "never"

        def negotiate(self, client: Any) -> IAuthNegotiation:
            return NeverEnough()

    h = Harness(authenticators=[Auth()])
    h.send(b"\x05\x01\x82" + b"x" * 7)
    assert not h.closing
    h.send(b"x")
    assert h.closing


# --------------------------------------------------------------------------
# Requests


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", ReplyCode.COMMAND_NOT_SUPPORTED),
        (
            b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50",
            ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
        ),
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", ReplyCode.GENERAL_FAILURE),
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", ReplyCode.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x00\x00\x50", ReplyCode.HOST_UNREACHABLE),
    ],
    ids=["unknown-cmd", "unknown-atyp", "rsv", "version", "empty-domain"],
)
def test_bad_request_gets_its_reply_code_then_close(
    request_bytes: bytes, code: ReplyCode
) -> None:
    h = Harness()
    h.send(GREET_NOAUTH + request_bytes)
    assert h.take() == b"\x05\x00" + failure_reply(code)
    assert h.closing
    assert h.connector.calls == []


@pytest.mark.parametrize(
    "address",
    [
        Address(AddressType.IPV6, "::1", 443),
        Address(AddressType.DOMAIN, "localhost", 80),
        Address(AddressType.DOMAIN, "x" * 255, 1),
    ],
)
def test_connect_passes_every_address_type(address: Address) -> None:
    h = Harness()
    h.send(GREET_NOAUTH + Request(Command.CONNECT, address).to_bytes())
    assert h.connector.calls[0][0] == address


# --------------------------------------------------------------------------
# Connect failures


@pytest.mark.parametrize(
    ("exception", "code"),
    [
        (error.ConnectionRefusedError(), ReplyCode.CONNECTION_REFUSED),
        (error.DNSLookupError("nope"), ReplyCode.HOST_UNREACHABLE),
        (error.NoRouteError(), ReplyCode.NETWORK_UNREACHABLE),
        (
            error.getConnectError((errno.ENETUNREACH, "x")),
            ReplyCode.NETWORK_UNREACHABLE,
        ),
        (error.getConnectError((errno.EHOSTUNREACH, "x")), ReplyCode.HOST_UNREACHABLE),
        (
            error.getConnectError((errno.ECONNREFUSED, "x")),
            ReplyCode.CONNECTION_REFUSED,
        ),
        (error.TCPTimedOutError(), ReplyCode.TTL_EXPIRED),
        (error.TimeoutError(), ReplyCode.TTL_EXPIRED),
        (defer.TimeoutError(), ReplyCode.TTL_EXPIRED),
        (error.getConnectError((errno.EACCES, "x")), ReplyCode.CONNECTION_NOT_ALLOWED),
        (RuntimeError("surprise"), ReplyCode.GENERAL_FAILURE),
    ],
)
def test_connect_failure_reply_codes(exception: Exception, code: ReplyCode) -> None:
    assert reply_for_failure(Failure(exception)) is code
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    h.take()
    h.connector.fail(exception)
    assert h.take() == failure_reply(code)
    assert h.closing


def test_client_leaving_while_connecting_cancels_the_connect() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    h.lose()
    assert h.connector.cancelled == 1


# --------------------------------------------------------------------------
# Pipelining and arbitrary splits


def _run_split(chunks: list[bytes]) -> tuple[bytes, bytes]:
    h = userpass_harness()
    for chunk in chunks:
        h.send(chunk)
        if h.connector.calls and h.protocol.state is State.CONNECTING:
            h.connector.succeed()
    out_transport = None
    if h.protocol.state is State.RELAYING:
        out_transport = h.protocol.tunnel.outbound.transport  # type: ignore[union-attr]
    return h.take(), out_transport.value() if out_transport else b""


PIPELINE = GREET_USERPASS + AUTH_OK + CONNECT + b"payload: first bytes"


def test_pipelined_everything_in_one_segment() -> None:
    to_client, to_target = _run_split([PIPELINE])
    assert to_client == b"\x05\x02\x01\x00" + SUCCESS
    assert to_target == b"payload: first bytes"


@pytest.mark.parametrize("cut", range(1, len(PIPELINE)))
def test_split_at_every_byte_boundary(cut: int) -> None:
    assert _run_split([PIPELINE[:cut], PIPELINE[cut:]]) == _run_split([PIPELINE])


def test_byte_by_byte() -> None:
    chunks = [PIPELINE[i : i + 1] for i in range(len(PIPELINE))]
    assert _run_split(chunks) == _run_split([PIPELINE])


def test_data_while_connecting_is_kept_in_order() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT + b"one,")
    h.send(b"two,")
    _, out = h.connector.succeed()
    h.send(b"three")
    assert out.value() == b"one,two,three"
    assert h.protocol.counters.bytes_up == len(b"one,two,three")


def test_too_much_early_data_aborts() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    h.send(b"x" * (MAX_EARLY_DATA + 1))
    assert h.transport.aborted


# --------------------------------------------------------------------------
# Timeouts


def test_handshake_timeout_drops_a_stalled_client_only() -> None:
    h = Harness(handshake_timeout=5)
    other = h.factory.buildProtocol(None)
    from helpers import CLIENT, SERVER, HalfCloseTransport

    other_transport = HalfCloseTransport(SERVER, CLIENT)
    other.makeConnection(other_transport)
    h.send(b"\x05")  # stalls mid-greeting
    h.reactor.advance(4)
    other.dataReceived(GREET_NOAUTH + CONNECT)
    h.connector.succeed()
    h.reactor.advance(1)
    assert h.transport.aborted
    assert h.protocol.outcome.startswith("handshake timeout")
    h.reactor.advance(100)
    assert not other_transport.aborted  # relaying: no handshake timeout any more


def test_connect_timeout_not_handshake_timeout_bounds_the_connect() -> None:
    """Once the request is in, a slow connect gets its 0x06 reply."""
    h = Harness(handshake_timeout=5)
    h.send(GREET_NOAUTH + CONNECT)
    h.take()
    h.reactor.advance(60)
    assert not h.transport.aborted  # the (fake) connector decides
    h.connector.fail(error.TimeoutError())
    assert h.take() == failure_reply(ReplyCode.TTL_EXPIRED)


def test_idle_timeout_off_by_default() -> None:
    h = Harness()
    relaying(h)
    h.reactor.advance(10_000)
    assert not h.closing


def test_idle_timeout_closes_a_silent_tunnel() -> None:
    h = Harness(idle_timeout=30)
    outbound, _ = relaying(h)
    for _ in range(5):
        h.reactor.pump([1] * 20)
        h.send(b"ping")
        outbound.dataReceived(b"pong")
    assert not h.closing
    # Checked every idle_timeout: a silent tunnel closes within 2 x idle_timeout.
    # never before idle_timeout of silence, always by twice that.
    h.reactor.pump([1] * 29)
    assert not h.closing
    h.reactor.pump([1] * 31)
    assert h.transport.aborted
    assert h.protocol.outcome == "idle timeout"


def _another_tunnel(h: Harness) -> tuple[Any, Any]:
    """One more client of the harness's factory, relaying."""
    protocol = h.factory.buildProtocol(CLIENT)
    transport = HalfCloseTransport(SERVER, CLIENT)
    protocol.makeConnection(transport)
    protocol.dataReceived(GREET_NOAUTH + CONNECT)
    h.connector.succeed()
    return protocol, transport


def test_one_watch_timer_for_all_tunnels_gone_with_the_last() -> None:
    h = Harness(idle_timeout=30, stall_timeout=60)
    relaying(h)
    others = [_another_tunnel(h) for _ in range(2)]
    assert len(h.reactor.getDelayedCalls()) == 1
    h.lose()
    for protocol, transport in others:
        assert len(h.reactor.getDelayedCalls()) == 1
        transport.disconnected = True
        protocol.connectionLost(Failure(error.ConnectionDone()))
    assert h.reactor.getDelayedCalls() == []
    # A new tunnel starts the watch again.
    protocol, transport = _another_tunnel(h)
    h.reactor.pump([1] * 61)
    assert transport.aborted and protocol.outcome == "idle timeout"


def test_the_watch_closes_the_silent_tunnel_and_keeps_the_busy_one() -> None:
    h = Harness(idle_timeout=30)
    relaying(h)
    quiet, quiet_transport = _another_tunnel(h)
    aborts = []
    abort = quiet_transport.abortConnection

    def counted_abort() -> None:
        aborts.append(h.reactor.seconds())
        abort()

    quiet_transport.abortConnection = counted_abort  # type: ignore[method-assign]
    for _ in range(3):
        h.reactor.pump([1] * 20)
        h.send(b"ping")
    assert quiet_transport.aborted and quiet.outcome == "idle timeout"
    assert not h.closing
    h.reactor.pump([1] * 61)  # the busy one falls silent in turn
    assert h.transport.aborted and h.protocol.outcome == "idle timeout"
    # The quiet one was given up once, not checked (and aborted) again
    # while its close was on its way.
    assert len(aborts) == 1


# --------------------------------------------------------------------------
# Relay


def test_relay_both_ways_counts_bytes_and_registers_producers() -> None:
    h = Harness()
    outbound, out = relaying(h)
    h.take()
    h.send(b"hello")
    outbound.dataReceived(b"world!")
    assert out.value() == b"hello"
    assert h.take() == b"world!"
    assert (h.protocol.counters.bytes_up, h.protocol.counters.bytes_down) == (5, 6)
    # Flow control: each transport throttles the other.
    assert h.transport.producer is out
    assert out.producer is h.transport


def test_half_close_client_first() -> None:
    h = Harness()
    outbound, out = relaying(h)
    h.protocol.readConnectionLost()
    assert out.write_closed
    assert not h.closing
    outbound.dataReceived(b"late response")
    assert h.take().endswith(b"late response")
    outbound.readConnectionLost()
    assert h.transport.write_closed
    assert h.transport.disconnecting and out.disconnecting


def test_half_close_target_first() -> None:
    h = Harness()
    outbound, out = relaying(h)
    outbound.readConnectionLost()
    assert h.transport.write_closed
    h.send(b"still uploading")
    assert out.value() == b"still uploading"
    h.protocol.readConnectionLost()
    assert out.write_closed
    assert h.transport.disconnecting and out.disconnecting


def test_client_eof_while_connecting_is_forwarded_after_connect() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT + b"request")
    h.protocol.readConnectionLost()
    _, out = h.connector.succeed()
    assert out.value() == b"request"
    assert out.write_closed


def test_target_reset_aborts_the_client() -> None:
    h = Harness()
    outbound, _ = relaying(h)
    outbound.connectionLost(Failure(error.ConnectionLost()))
    assert h.transport.aborted


def test_target_clean_close_closes_the_client() -> None:
    h = Harness()
    outbound, _ = relaying(h)
    outbound.connectionLost(Failure(error.ConnectionDone()))
    assert h.transport.disconnecting and not h.transport.aborted


def test_client_reset_aborts_the_target() -> None:
    h = Harness()
    _, out = relaying(h)
    h.lose(error.ConnectionLost())
    assert out.aborted


# --------------------------------------------------------------------------
# Logging


def _connection_events(events: Any) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "socks5.connection"]


def test_one_log_event_per_connection_with_its_facts(events: Any) -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + AUTH_OK + CONNECT)
    outbound, _ = h.connector.succeed()
    h.send(b"12345")
    outbound.dataReceived(b"123")
    h.reactor.advance(2.5)
    h.lose()
    (event,) = _connection_events(events)
    assert event["client"] == "127.0.0.1:40000"
    assert event["user"] == "alice"
    assert event["command"] == "connect"
    assert event["target"] == "127.0.0.1:8080"
    assert event["reply"] == 0
    assert (event["bytes_up"], event["bytes_down"]) == (5, 3)
    assert event["duration"] == pytest.approx(2.5)
    # The event Logger.info would have built (the server builds it itself).
    assert isinstance(event["log_logger"], Logger)
    assert event["log_level"] is LogLevel.info
    assert event["log_namespace"] == "twisted_socks5.server.SOCKS5ServerFactory"
    assert event["log_source"] is h.factory
    assert event["log_format"] == "{summary}"
    assert event["log_time"] > 1e9  # wall-clock time, not the test clock's
    # What a text log (twistd's) shows of it.
    assert formatEvent(event) == (
        "127.0.0.1:40000 alice connect 127.0.0.1:8080 -> succeeded: closed; "
        "up 5 B, down 3 B in 2.500 s"
    )


def test_failed_login_is_logged_without_the_password(events: Any) -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + AUTH_BAD)
    h.lose()
    (event,) = _connection_events(events)
    assert event["outcome"] == "authentication failed"
    assert event["user"] == "alice"
    for e in events:
        assert "wrong" not in repr(e)


def test_stall_timeout_reclaims_a_tunnel_stuck_behind_a_non_reader() -> None:
    h = Harness(stall_timeout=60)
    outbound, out = relaying(h)
    h.send(b"data the target does not read")
    # Simulate Twisted's write buffer holding what the target will not take.
    out.dataBuffer, out.offset, out._tempDataLen = b"x" * 1000, 0, 0
    h.reactor.pump([1] * 59)
    assert not h.closing
    h.reactor.pump([1] * 62)
    assert h.transport.aborted
    assert h.protocol.outcome.startswith("stalled")


def test_stall_timeout_leaves_a_quiet_tunnel_alone() -> None:
    h = Harness(stall_timeout=60)
    relaying(h)
    h.reactor.pump([1] * 600)
    assert not h.closing


def test_the_client_is_still_read_while_connecting() -> None:
    """
    Not paused while the outbound connection is made: data sent ahead is
    kept for the destination, and back-pressure starts only past
    EARLY_DATA_PAUSE bytes.
    """
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    assert h.protocol.state is State.CONNECTING
    assert h.transport.producerState == "producing"
    h.send(b"a" * 1000)
    assert h.transport.producerState == "producing"
    h.send(b"b" * EARLY_DATA_PAUSE)
    assert h.transport.producerState == "paused"
    _, out = h.connector.succeed()
    assert h.transport.producerState == "producing"
    assert out.value() == b"a" * 1000 + b"b" * EARLY_DATA_PAUSE


def test_a_client_leaving_while_connecting_cancels_the_attempt_at_once() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    assert h.transport.producerState == "producing"  # so its reset is seen
    h.lose(error.ConnectionLost("reset by peer"))
    assert h.connector.cancelled == 1
    assert h.protocol.outcome == "client went away while connecting"


def test_a_client_eof_while_connecting_is_relayed_after_the_reply() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT + b"last words")
    h.protocol.readConnectionLost()
    assert h.connector.cancelled == 0  # a half-close is not a departure
    _, out = h.connector.succeed()
    assert out.value() == b"last words"
    assert out.write_closed
