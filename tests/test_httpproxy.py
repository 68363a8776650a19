"""
The HTTP proxy on the SOCKS port, in memory: CONNECT through the CONNECT
handler, forwarded requests through the Agent, Proxy-Authorization, the
bounds on heads and their timeouts, and property tests of the request side.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from helpers import CLIENT, SERVER, HalfCloseTransport, Harness
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import (
    ICredentialsChecker,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, error
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import Address, AddressType
from twisted_socks5.connection import State
from twisted_socks5.httpproxy import (
    HTTP_STATUS,
    MAX_HEAD,
    MAX_HEADERS,
    MAX_REQUEST_LINE,
    BadTarget,
    HTTPProxyConnection,
    basic_credentials,
    parse_absolute_uri,
    parse_authority,
)
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.rules import RuleSet

HTTP = ("socks5", "http")
GOOD = b"Basic " + __import__("base64").b64encode(b"alice:secret")
BAD = b"Basic " + __import__("base64").b64encode(b"alice:wrong")


def harness(**kw: Any) -> Harness:
    kw.setdefault("protocols", HTTP)
    kw.setdefault("protect_host", None)
    return Harness(**kw)


def with_auth(**kw: Any) -> Harness:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    return harness(authenticators=[auth], **kw)


def status_of(data: bytes) -> int:
    assert data.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")), data[:80]
    return int(data[9:12])


def head_of(data: bytes) -> bytes:
    return data.split(b"\r\n\r\n", 1)[0].lower()


# ----------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    "text, address",
    [
        (b"127.0.0.1:443", Address(AddressType.IPV4, "127.0.0.1", 443)),
        (b"[::1]:8443", Address(AddressType.IPV6, "::1", 8443)),
        (b"example.test:22", Address(AddressType.DOMAIN, "example.test", 22)),
        (b"[::ffff:127.0.0.1]:80", Address(AddressType.IPV4, "127.0.0.1", 80)),
    ],
)
def test_connect_targets(text: bytes, address: Address) -> None:
    assert parse_authority(text) == address


@pytest.mark.parametrize(
    "text",
    [
        b"example.test",
        b"example.test:",
        b"example.test:0",
        b"example.test:65536",
        b"example.test:+80",
        b"::1:80",
        b"[::1",
        b"[::1]x:80",
        b"[fe80::1%eth0]:80",
        b"[127.0.0.1]:80",
        b"user@example.test:80",
        b"exa mple.test:80",
        b"example.test:80/x",
        b"-example.test:80",
        b"\xff:80",
        b":80",
    ],
)
def test_bad_connect_targets(text: bytes) -> None:
    with pytest.raises(BadTarget):
        parse_authority(text)


def test_absolute_uris() -> None:
    assert parse_absolute_uri(b"http://a.test/x?y=1") == (
        Address(AddressType.DOMAIN, "a.test", 80),
        b"/x?y=1",
    )
    assert parse_absolute_uri(b"HTTP://[::1]:8080") == (
        Address(AddressType.IPV6, "::1", 8080),
        b"/",
    )
    assert parse_absolute_uri(b"http://a.test?q")[1] == b"/?q"
    for bad in (
        b"https://a.test/",
        b"/relative",
        b"ftp://a.test/",
        b"http://u:p@a.test/",
        b"http://a.test:99999/",
        b"http:///path",
    ):
        with pytest.raises(BadTarget):
            parse_absolute_uri(bad)


def test_basic_credentials() -> None:
    assert basic_credentials(GOOD) == (b"alice", b"secret")
    assert basic_credentials(b"basic YTpi") == (b"a", b"b")
    assert basic_credentials(b"Bearer x") is None
    assert basic_credentials(b"Basic !!!") is None
    assert basic_credentials(b"Basic YWxpY2U=") is None  # no colon


def test_status_table_covers_every_reply_code() -> None:
    from twisted_socks5.codec import ReplyCode

    assert set(HTTP_STATUS) == set(ReplyCode)
    assert HTTP_STATUS[ReplyCode.CONNECTION_NOT_ALLOWED][0] == 403
    assert HTTP_STATUS[ReplyCode.TTL_EXPIRED][0] == 504
    assert HTTP_STATUS[ReplyCode.CONNECTION_REFUSED][0] == 502


# ----------------------------------------------------------------------
# CONNECT


def test_connect_tunnel_with_pipelined_data() -> None:
    h = harness()
    h.send(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\nearly")
    assert isinstance(h.protocol, HTTPProxyConnection)
    assert h.protocol.protocol == "http"
    h.send(b" and more")
    assert h.take() == b""
    (address, _, _) = h.connector.calls[0]
    assert address == Address(AddressType.IPV4, "127.0.0.1", 443)
    outbound, target = h.connector.succeed()
    assert h.take() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert target.value() == b"early and more"
    assert h.protocol.state is State.RELAYING
    h.send(b"up")
    assert target.value().endswith(b"up")
    outbound.dataReceived(b"down")
    assert h.take() == b"down"


def test_connect_ipv6_and_names() -> None:
    h = harness()
    h.send(b"CONNECT [::1]:8443 HTTP/1.1\r\n\r\n")
    assert h.connector.calls[-1][0] == Address(AddressType.IPV6, "::1", 8443)
    h = harness()
    h.send(b"CONNECT localhost:22 HTTP/1.0\r\n\r\n")
    assert h.connector.calls[-1][0] == Address(AddressType.DOMAIN, "localhost", 22)
    h.connector.succeed()
    assert h.take() == b"HTTP/1.0 200 Connection established\r\n\r\n"


@pytest.mark.parametrize(
    "failure, status",
    [
        (error.ConnectionRefusedError(), 502),
        (error.DNSLookupError(), 502),
        (error.TimeoutError(), 504),
        (error.NoRouteError(), 502),
    ],
)
def test_connect_failures(failure: Exception, status: int) -> None:
    h = harness()
    h.send(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\nearly")
    h.connector.fail(failure)
    answer = h.take()
    assert status_of(answer) == status
    assert b"connection: close" in head_of(answer)
    assert h.closing


@pytest.mark.parametrize(
    "target", [b"nohost", b"a.test:0", b"[::1", b"u@a.test:1", b"a b:80"]
)
def test_bad_connect_target_is_400(target: bytes) -> None:
    h = harness()
    h.send(b"CONNECT " + target + b" HTTP/1.1\r\n\r\n")
    assert status_of(h.take()) == 400
    assert h.closing
    assert not h.connector.calls


def test_rules_deny_connect_with_403() -> None:
    rules = RuleSet.parse("deny to 127.0.0.2\nallow")
    h = harness(policy=rules)
    h.send(b"CONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\n")
    assert status_of(h.take()) == 403
    assert h.protocol.rule is not None
    assert not h.connector.calls
    h = harness(policy=rules)
    h.send(b"CONNECT 127.0.0.3:443 HTTP/1.1\r\n\r\n")
    assert h.connector.calls


def test_rules_deny_forwarded_request_with_403() -> None:
    h = harness(policy=RuleSet.parse("deny to 127.0.0.2 port 80\nallow"))
    h.send(b"GET http://127.0.0.2/ HTTP/1.1\r\nHost: 127.0.0.2\r\n\r\n")
    answer = h.take()
    assert status_of(answer) == 403
    assert not h.connector.calls
    assert not h.closing  # the request was read whole: the client may go on


# ----------------------------------------------------------------------
# Forwarding


def forward(h: Harness, head: bytes) -> Tuple[Any, Any, bytes]:
    """Send ``head``, let the origin connect: its protocol, transport, request."""
    h.send(head)
    origin, transport = h.connector.succeed()
    return origin, transport, transport.value()


def test_forwarded_request_headers() -> None:
    h = harness()
    origin, transport, sent = forward(
        h,
        b"GET http://127.0.0.1:8080/p?q=1 HTTP/1.1\r\n"
        b"Host: elsewhere.test\r\n"
        b"Proxy-Authorization: Basic YTpi\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: hop\r\n"
        b"Keep-Alive: 300\r\n"
        b"TE: trailers\r\n"
        b"Upgrade: h2c\r\n"
        b"Accept: */*\r\n\r\n",
    )
    head = sent.lower()
    assert sent.startswith(b"GET /p?q=1 HTTP/1.1\r\n")
    assert b"host: 127.0.0.1:8080\r\n" in head
    assert b"accept: */*" in head
    assert b"via: 1.1 twisted-socks5" in head
    for gone in (
        b"proxy-authorization",
        b"proxy-connection",
        b"x-secret",
        b"keep-alive",
        b"te:",
        b"upgrade",
        b"elsewhere",
    ):
        assert gone not in head, gone
    assert b"connection: close" in head
    origin.dataReceived(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, X-Hop\r\n"
        b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
        b"X-Kept: 2\r\n\r\nhello"
    )
    answer = h.take()
    response = head_of(answer)
    assert status_of(answer) == 200
    assert answer.endswith(b"\r\n\r\nhello")
    assert b"content-length: 5" in response
    assert b"x-kept: 2" in response
    assert b"via: 1.1 twisted-socks5" in response
    for gone in (b"x-hop", b"keep-alive", b"proxy-authenticate", b"connection:"):
        assert gone not in response, gone


def test_keep_alive_to_different_hosts() -> None:
    h = harness()
    origin, _, _ = forward(h, b"GET http://a.test/1 HTTP/1.1\r\nHost: a.test\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
    assert h.take().endswith(b"\r\n\r\n1")
    assert h.protocol.state is State.REQUEST
    origin, _, sent = forward(
        h, b"GET http://b.test:81/2 HTTP/1.1\r\nHost: b.test:81\r\n\r\n"
    )
    assert h.connector.calls[-1][0] == Address(AddressType.DOMAIN, "b.test", 81)
    assert b"host: b.test:81" in sent.lower()
    # Chunked from the origin, re-framed for the client.
    origin.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    answer = h.take()
    assert b"transfer-encoding: chunked" in head_of(answer)
    assert answer.endswith(b"3\r\nabc\r\n0\r\n\r\n")
    assert not h.closing


def test_pipelined_requests_are_answered_in_order() -> None:
    h = harness()
    h.send(
        b"GET http://a.test/1 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET http://b.test/2 HTTP/1.1\r\nHost: b\r\n\r\n"
    )
    assert len(h.connector.calls) == 1
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert len(h.connector.calls) == 2
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    answer = h.take()
    assert answer.startswith(b"HTTP/1.1 204")
    assert answer.endswith(b"ok")


def test_origin_unreachable_is_502_and_keeps_the_client() -> None:
    h = harness()
    h.send(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    h.connector.fail(error.ConnectionRefusedError())
    assert status_of(h.take()) == 502
    assert not h.closing


def test_origin_response_head_is_bounded() -> None:
    h = harness()
    origin, transport, _ = forward(h, b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\n")
    for _ in range(100):
        origin.dataReceived(b"X-Filler: " + b"x" * 1000 + b"\r\n")
        if transport.aborted:
            break
    assert transport.aborted


def test_https_absolute_uri_and_origin_form_are_400() -> None:
    for line in (b"GET https://a.test/ HTTP/1.1", b"GET / HTTP/1.1"):
        h = harness()
        h.send(line + b"\r\nHost: a.test\r\n\r\n")
        assert status_of(h.take()) == 400
        assert not h.connector.calls


# ----------------------------------------------------------------------
# Bounds and timeouts


def test_long_request_line_is_414() -> None:
    h = harness()
    h.send(b"GET http://a.test/" + b"x" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n")
    assert status_of(h.take()) == 414
    assert h.closing
    h = harness()
    h.send(b"GET http://a.test/" + b"x" * (MAX_REQUEST_LINE + 10))  # no CRLF yet
    assert status_of(h.take()) == 414


def test_too_many_headers_is_431() -> None:
    h = harness()
    h.send(b"GET http://a.test/ HTTP/1.1\r\n")
    h.send(b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS + 1)))
    assert status_of(h.take()) == 431
    assert h.closing


def test_long_header_and_large_head_are_431() -> None:
    h = harness()
    h.send(b"GET http://a.test/ HTTP/1.1\r\nX: " + b"y" * MAX_REQUEST_LINE + b"\r\n")
    assert status_of(h.take()) == 431
    h = harness()
    h.send(b"GET http://a.test/ HTTP/1.1\r\n")
    line = b"X: " + b"y" * 4000 + b"\r\n"
    h.send(line * (MAX_HEAD // len(line) + 1))
    assert status_of(h.take()) == 431


def test_slow_head_gets_408() -> None:
    h = harness(handshake_timeout=10.0)
    h.send(b"GET http://a.test/ HTTP/1.1\r\nHost: a")
    h.reactor.advance(5)
    h.send(b".test\r\n")  # trickling does not extend the deadline
    h.reactor.advance(5.1)
    assert status_of(h.take()) == 408
    assert h.closing


def test_idle_keep_alive_is_closed() -> None:
    h = harness()
    origin, _, _ = forward(h, b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    h.take()
    h.reactor.advance(59)
    assert not h.closing
    h.reactor.advance(2)
    assert h.closing
    assert h.take() == b""
    assert "keep-alive idle timeout" in h.protocol.outcome


def test_garbage_is_400() -> None:
    h = harness()
    h.send(b"\x00\x01garbage\r\n\r\n")
    assert status_of(h.take()) == 400
    assert h.closing


def test_http_not_enabled_closes() -> None:
    h = Harness(protect_host=None)
    h.send(b"GET http://a.test/ HTTP/1.1\r\n\r\n")
    assert h.take() == b""
    assert h.closing
    assert not isinstance(h.protocol, HTTPProxyConnection)


# ----------------------------------------------------------------------
# Proxy-Authorization


def test_no_credentials_is_407_and_keeps_the_connection() -> None:
    h = with_auth()
    h.send(b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    answer = h.take()
    assert status_of(answer) == 407
    assert b'proxy-authenticate: basic realm="twisted-socks5"' in head_of(answer)
    assert not h.closing
    assert not h.connector.calls
    # The browser's retry on the same connection.
    h.send(
        b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + GOOD
        + b"\r\n\r\n"
    )
    assert h.connector.calls
    assert h.protocol.user == "alice"
    origin, transport = h.connector.succeed()
    assert b"proxy-authorization" not in transport.value().lower()


def test_connect_needs_credentials() -> None:
    h = with_auth()
    h.send(b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n")
    assert status_of(h.take()) == 407
    assert h.closing
    assert not h.connector.calls
    h = with_auth()
    h.send(
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nProxy-Authorization: " + GOOD + b"\r\n\r\n"
    )
    assert h.connector.calls
    h.connector.succeed()
    assert h.take().startswith(b"HTTP/1.1 200 ")
    assert h.protocol.user == "alice"


@pytest.mark.parametrize(
    "value", [BAD, b"Basic !!", b"Digest x", b"Basic " + b"A" * 800]
)
def test_wrong_credentials_are_407_counted_and_closed(value: bytes) -> None:
    h = with_auth()
    h.send(
        b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + value
        + b"\r\n\r\n"
    )
    assert status_of(h.take()) == 407
    assert h.closing
    assert not h.connector.calls
    assert h.factory.limits._recent_failures("127.0.0.1") == 1


def test_throttled_client_is_refused_even_with_the_right_password() -> None:
    limits_kw = {"auth_failures": 2}
    h = with_auth()
    h.factory.limits = ConnectionLimits(h.reactor.seconds, **limits_kw)  # type: ignore[arg-type]
    for _ in range(2):
        h.factory.limits.auth_failed("127.0.0.1")
    h.send(
        b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
        + GOOD
        + b"\r\n\r\n"
    )
    assert status_of(h.take()) == 407
    assert not h.connector.calls
    assert "throttled" in h.protocol.outcome or "too many" in h.protocol.outcome


def test_anonymous_server_ignores_credentials() -> None:
    h = harness()
    h.send(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nProxy-Authorization: " + BAD + b"\r\n\r\n")
    assert h.connector.calls
    assert h.protocol.user is None


# ----------------------------------------------------------------------
# Property tests of the request side


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=600), st.integers(1, 50))
def test_any_bytes_answer_http_or_nothing(data: bytes, cut: int) -> None:
    h = harness()
    if data[0] in (4, 5):
        data = b"G" + data
    h.send(data[:cut])
    if data[cut:] and not h.closing:
        h.send(data[cut:])
    h.reactor.advance(120)
    out = h.transport.value()
    if out:
        assert out[:9] in (b"HTTP/1.1 ", b"HTTP/1.0 ")
        assert 100 <= status_of(out) < 600
    assert h.protocol.state is not State.RELAYING
    for address, _, _ in h.connector.calls:
        assert isinstance(address, Address)


@settings(max_examples=200, deadline=None)
@given(
    st.binary(max_size=3000),
    st.lists(st.integers(1, 400), max_size=8),
)
def test_pipelined_tunnel_bytes_arrive_whole(early: bytes, cuts: list[int]) -> None:
    """However the client's segments fall, what follows the head is the tunnel's."""
    stream = b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: x\r\n\r\n" + early
    h = harness()
    at = 0
    for size in cuts:
        h.send(stream[at : at + size])
        at += size
    h.send(stream[at:])
    assert len(h.connector.calls) == 1
    _, target = h.connector.succeed()
    assert h.take() == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert target.value() == early


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"CONNECT", b"GET"]),
    st.binary(min_size=0, max_size=80).filter(
        lambda b: b"\r" not in b and b"\n" not in b
    ),
)
def test_bad_targets_never_reach_the_connector(method: bytes, target: bytes) -> None:
    h = harness()
    h.send(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    for address, _, _ in h.connector.calls:
        text = target.decode("latin-1")
        assert str(address.port) in text or (method == b"GET" and address.port == 80)
    if not h.connector.calls:
        out = h.take()
        assert out == b"" or status_of(out) in (400, 414, 431)


def test_rules_see_the_authenticated_user() -> None:
    rules = RuleSet.parse("allow user alice\ndefault deny")
    for request in (
        b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: a\r\n",
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n",
    ):
        h = with_auth(policy=rules)
        h.send(request + b"Proxy-Authorization: " + GOOD + b"\r\n\r\n")
        assert h.connector.calls, request
        assert h.take() == b""


def test_throttled_client_costs_no_credential_check() -> None:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
    asked = []
    check = checker.requestAvatarId
    checker.requestAvatarId = lambda c: asked.append(c) or check(c)  # type: ignore[method-assign]
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    h = harness(authenticators=[auth])
    for _ in range(h.factory.limits.auth_failures):
        h.factory.limits.auth_failed("127.0.0.1")
    h.send(b"GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: " + GOOD + b"\r\n\r\n")
    assert status_of(h.take()) == 407
    assert asked == []


@implementer(ICredentialsChecker)
class _SlowChecker:
    """Answers when the test says: the checks it was asked for, in order."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.waiting: List[Tuple[Any, defer.Deferred[Any]]] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.waiting.append((credentials, d))
        return d


def test_one_credential_check_at_a_time_per_client() -> None:
    checker = _SlowChecker()
    h = harness(authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)])
    second = h.factory.buildProtocol(CLIENT)
    transport = HalfCloseTransport(SERVER, CLIENT)
    second.makeConnection(transport)
    request = b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nProxy-Authorization: " + GOOD
    h.send(request + b"\r\n\r\n")
    second.dataReceived(request + b"\r\n\r\n")
    assert len(checker.waiting) == 1  # the second waits its turn
    checker.waiting[0][1].callback(b"alice")
    assert len(h.connector.calls) == 1
    assert len(checker.waiting) == 2  # now the second is checked
    checker.waiting[1][1].errback(UnauthorizedLogin())
    assert status_of(transport.value()) == 407
    assert len(h.connector.calls) == 1


def test_client_leaving_during_a_check_is_forgotten() -> None:
    checker = _SlowChecker()
    h = harness(authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)])
    h.send(b"GET http://a.test/ HTTP/1.1\r\nProxy-Authorization: " + GOOD + b"\r\n\r\n")
    h.lose()
    assert checker.waiting[0][1].called  # cancelled with the connection
    assert not h.connector.calls


@pytest.mark.parametrize(
    "request_head",
    [
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\n\r\n",
        b"GET http://127.0.0.1/ HTTP/1.1\r\n\r\n",
    ],
)
def test_rules_protocol_condition(request_head: bytes) -> None:
    h = harness(policy=RuleSet.parse("allow protocol socks5\ndefault deny"))
    h.send(request_head)
    assert status_of(h.take()) == 403
    assert not h.connector.calls
    h = harness(policy=RuleSet.parse("allow protocol http\ndefault deny"))
    h.send(request_head)
    assert h.connector.calls


def test_refusals_tell_the_client_the_meaning_not_the_rule() -> None:
    h = harness(policy=RuleSet.parse("deny to 127.0.0.2 # secret-net\nallow"))
    h.send(b"CONNECT 127.0.0.2:443 HTTP/1.1\r\n\r\n")
    answer = h.take()
    assert status_of(answer) == 403
    assert b"127.0.0.2" not in answer and b"line" not in answer
    assert h.protocol.state is State.CLOSING
    assert "denied by" in h.protocol.outcome  # the log has it


def test_client_leaving_mid_response_aborts_the_origin() -> None:
    h = harness()
    origin, transport, _ = forward(h, b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
    assert h.take().endswith(b"first")
    h.lose()
    assert transport.aborted


def test_origin_cutting_its_answer_short_cuts_the_client() -> None:
    h = harness()
    origin, _, _ = forward(h, b"GET http://a.test/ HTTP/1.1\r\nHost: a\r\n\r\n")
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
    origin.connectionLost(Failure(error.ConnectionLost()))
    assert h.transport.aborted  # never passed off as a whole answer


def test_log_line_and_metrics_say_http(events: Any) -> None:
    pytest.importorskip("prometheus_client")
    h = with_auth()
    metrics = h.factory.enable_metrics()
    h.send(b"GET http://127.0.0.1:81/ HTTP/1.1\r\nProxy-Authorization: " + GOOD)
    h.send(b"\r\n\r\n")
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    h.lose()
    (line,) = [e for e in events if e.get("event") == "socks5.connection"]
    assert line["protocol"] == "http"
    assert line["user"] == "alice"
    assert line["target"] == "127.0.0.1:81"
    assert "forwarded: 1 request(s), last 200" in line["summary"]
    assert line["summary"].endswith("over http")
    sample = metrics.registry.get_sample_value(
        "socks5_connections_total",
        {"command": "connect", "reply": "succeeded", "protocol": "http"},
    )
    assert sample == 1


def test_each_answered_request_is_logged_escaped(events: Any) -> None:
    h = harness()
    h.send(b"GET https://a.test/'x\\y HTTP/1.1\r\nHost: a\r\n\r\n")
    assert status_of(h.take()) == 400
    (line,) = [e for e in events if e.get("event") == "http.request"]
    assert line["status"] == 400
    assert "GET https://a.test/\\x27x\\\\y -> 400" in line["summary"]


def test_bodies_are_bounded(monkeypatch: Any) -> None:
    import twisted_socks5.httpproxy as httpproxy

    monkeypatch.setattr(httpproxy, "MAX_BODY", 1000)
    h = harness()
    h.send(
        b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: 1001\r\n\r\n"
    )
    answer = h.take()
    assert status_of(answer) == 413
    assert b"100 Continue" not in answer
    assert h.closing
    h = harness()
    h.send(b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\n")
    h.send(b"Transfer-Encoding: chunked\r\n\r\n")
    h.send(
        b"200\r\n" + b"x" * 512 + b"\r\n" + b"200\r\n" + b"x" * 512 + b"\r\n0\r\n\r\n"
    )
    assert status_of(h.take()) == 413
    assert not h.connector.calls
    h = harness()
    h.send(b"POST http://a.test/ HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n")
    h.send(b"x" * 1000)
    assert h.connector.calls  # at the bound: forwarded


def test_other_credentials_on_the_same_connection_are_checked_again() -> None:
    h = with_auth()
    get = b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: a\r\nProxy-Authorization: "
    h.send(get + GOOD + b"\r\n\r\n")
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert status_of(h.take()) == 204
    h.send(get + GOOD + b"\r\n\r\n")  # the same: not checked again, served
    assert len(h.connector.calls) == 2
    origin, _ = h.connector.succeed()
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    h.take()
    h.send(get + BAD + b"\r\n\r\n")
    assert status_of(h.take()) == 407
    assert len(h.connector.calls) == 2
    assert h.closing


@pytest.mark.parametrize("auth", [b"", b"Proxy-Authorization: " + BAD + b"\r\n"])
def test_a_body_is_not_read_before_its_credentials_are_checked(auth: bytes) -> None:
    # A body was read whole (to a temporary file past 100 kB, up to
    # MAX_BODY) before Proxy-Authorization was looked at: anyone could
    # fill the proxy's disk, a connection at a time.
    h = with_auth()
    h.send(
        b"POST http://127.0.0.1/ HTTP/1.1\r\nContent-Length: 50000000\r\n"
        + auth
        + b"\r\n"
    )
    answer = h.take()
    assert status_of(answer) == 407
    assert b"proxy-authenticate" in answer.lower()
    assert h.closing
    h.send(b"x" * 100000)
    assert not h.connector.calls


def test_a_body_is_held_until_its_credentials_are_good() -> None:
    h = with_auth()
    h.send(
        b"POST http://127.0.0.1/ HTTP/1.1\r\nContent-Length: 5\r\n"
        b"Proxy-Authorization: " + GOOD + b"\r\n\r\nhello"
    )
    origin, transport = h.connector.succeed()
    assert b"Content-Length: 5\r\n" in transport.value()  # its body follows
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert status_of(h.take()) == 204
    # Accepted on this connection: the next body is not held.
    h.send(
        b"POST http://127.0.0.1/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"
        b"Proxy-Authorization: " + GOOD + b"\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    )
    assert len(h.connector.calls) == 2


def test_a_body_sent_during_a_slow_check_is_held_then_read() -> None:
    checker = _SlowChecker()
    h = harness(authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)])
    size = 200 * 1024
    h.send(
        b"POST http://127.0.0.1/ HTTP/1.1\r\nContent-Length: %d\r\n"
        b"Proxy-Authorization: %s\r\n\r\n" % (size, GOOD)
    )
    h.send(b"x" * size)
    assert h.transport.producerState == "paused"  # past what it holds
    assert not h.connector.calls
    checker.waiting[0][1].callback(b"alice")
    assert h.transport.producerState == "producing"
    assert len(h.connector.calls) == 1
    assert h.protocol.current.body_size == size
