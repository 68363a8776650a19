"""
Fuzz targets: every parser of ``twisted_socks5.codec``, and the whole
server protocol fed arbitrary byte streams split arbitrarily.

Each target is a plain function that takes one input and raises
``AssertionError`` when an invariant breaks; :func:`hypothesis_test` wraps
one in ``@given`` for pytest (``tests/test_fuzz.py``, a bounded number of
examples) and :func:`fuzz_for` runs one for a time budget (``stress/run.py
--fuzz-seconds``).  :data:`COUNTS` counts the inputs each target has tried.

Server invariants, checked after every chunk and at the end:

- no exception escapes the protocol, and nothing is logged as an error;
- the transport is either closed (or closing) or open with at most
  ``MAX_EARLY_DATA`` bytes buffered;
- what the server wrote is exactly what a reference model, built on the
  codec, says it must have written for the input so far (method selection,
  RFC 1929 status, the reply and its code), so it is always a valid prefix
  of the protocol;
- a connect (CONNECT), a listen (BIND) or a UDP port (UDP ASSOCIATE) is
  attempted only once a complete, valid, authenticated request of that
  command has arrived, for exactly its address, and then always;
- the same stream unsplit gives the same bytes and the same attempts;
- a handshake never outlives the handshake timeout, and once the
  connection is lost no timer, port, connect or outbound socket is left.
"""

# The invariants are asserts: AssertionError is how a target reports a bug
# (to Hypothesis and to pytest).  Not to be run with python -O.
# ruff: noqa: S101
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, error
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_socks5 import codec, httpproxy, socks4
from twisted_socks5.auth import NoAuthAuthenticator, UsernamePasswordAuthenticator
from twisted_socks5.codec import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    MAX_USERPASS_SIZE,
    Address,
    Command,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
)
from twisted_socks5.htpasswd import parse_htpasswd
from twisted_socks5.outbound import IOutboundConnector
from twisted_socks5.rules import RulesError, RuleSet
from twisted_socks5.rules.rule import PROTOCOL_WORDS
from twisted_socks5.selfnet import unspecified
from twisted_socks5.server import MAX_EARLY_DATA, SOCKS5ServerFactory, State
from twisted_socks5.testing import HalfCloseTransport

#: Inputs tried, by target.
COUNTS: Dict[str, int] = {}

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
SERVER = IPv4Address("TCP", "127.0.0.1", 1080)
OUTBOUND = IPv4Address("TCP", "127.0.0.1", 50000)
USERS = {b"alice": b"s3cret"}
HANDSHAKE_TIMEOUT = 10.0


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


# --------------------------------------------------------------------------
# Codec targets

#: Each parser and the most bytes it may ever need to decide.
PARSERS: Dict[str, Tuple[Callable[[Any], Any], int]] = {
    "greeting": (codec.parse_greeting, MAX_GREETING_SIZE),
    "method_selection": (codec.parse_method_selection, 2),
    "userpass_request": (codec.parse_userpass_request, MAX_USERPASS_SIZE),
    "userpass_status": (codec.parse_userpass_status, 2),
    "request": (codec.parse_request, MAX_REQUEST_SIZE),
    "reply": (codec.parse_reply, MAX_REQUEST_SIZE),
}


def _outcome(parser: Callable[[Any], Any], buf: Any) -> Any:
    """The parser's answer; ProtocolError becomes ("error", reply)."""
    try:
        result = parser(buf)
    except ProtocolError as e:
        assert e.reply is None or type(e.reply) is ReplyCode, e.reply
        return ("error", e.reply)
    # Anything else escaping (IndexError, struct.error, ValueError...) is a
    # bug: the caller would crash on malformed input.
    assert result is None or (type(result) is tuple and len(result) == 2), result
    return result


def check_parser(name: str, buf: bytes) -> None:
    """One input for one stream parser."""
    _count(f"codec.{name}")
    parser, most = PARSERS[name]
    outcome = _outcome(parser, buf)
    assert _outcome(parser, bytearray(buf)) == outcome
    assert _outcome(parser, memoryview(buf)) == outcome
    if outcome is None:
        assert len(buf) < most, f"needs more than {most} bytes"
        return
    if outcome[0] == "error":
        return
    message, consumed = outcome
    assert type(consumed) is int and 0 < consumed <= min(len(buf), most)
    # The message serializes back to what it was parsed from (a reply's
    # RSV byte is not checked), and parses again the same.
    wire = message.to_bytes()
    if name == "reply":
        assert wire[:2] + wire[3:] == buf[:2] + buf[3:consumed]
    else:
        assert wire == buf[:consumed]
    assert parser(wire) == (message, len(wire))
    # Every shorter prefix needs more bytes or fails; none yields another message.
    for size in range(consumed):
        early = _outcome(parser, buf[:size])
        assert early is None or early[0] == "error", (size, early)


def check_udp_datagram(buf: bytes) -> None:
    """One input for the UDP datagram parser (a whole datagram, never partial)."""
    _count("codec.udp_datagram")
    try:
        datagram = codec.parse_udp_datagram(buf)
    except ProtocolError as e:
        assert e.reply is None or type(e.reply) is ReplyCode
        return
    assert type(datagram) is codec.UDPDatagram
    assert datagram.to_bytes() == buf
    assert len(datagram.data) <= len(buf)


def check_address(host: str, port: int) -> None:
    """
    Address.from_host takes any host text: an IP literal, or a name of 1 to
    255 UTF-8 bytes (anything else is a ValueError, and only that).
    """
    _count("codec.address")
    try:
        address = Address.from_host(host, port)
    except ValueError:
        assert not 1 <= len(host.encode("utf-8")) <= 255, host
        return
    wire = address.to_bytes() if address.type is not codec.AddressType.DOMAIN else b""
    if wire:
        parsed = codec.parse_request(b"\x05\x01\x00" + wire)
        assert parsed is not None and parsed[0].address == address


# --------------------------------------------------------------------------
# Server target: doubles


class _Port:
    """A listening port (TCP for BIND, UDP for ASSOCIATE) that knows if it stopped."""

    def __init__(self, kind: str, host: str) -> None:
        self.host = IPv4Address(kind, host or "127.0.0.1", 30000)
        self.listening = True

    def getHost(self) -> Any:
        return self.host

    def stopListening(self) -> Any:
        self.listening = False
        return defer.succeed(None)

    def write(self, data: bytes, addr: Any) -> None:
        pass


class _Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.ports: List[_Port] = []
        self.udpServers: List[Any] = []

    def listenTCP(
        self, port: int, factory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:  # type: ignore[override]
        self.tcpServers.append((port, factory, backlog, interface))
        fake = _Port("TCP", interface)
        self.ports.append(fake)
        return fake

    def listenUDP(
        self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192
    ) -> Any:  # type: ignore[override]
        self.udpServers.append((port, protocol, interface, maxPacketSize))
        fake = _Port("UDP", interface)
        protocol.transport = fake
        self.ports.append(fake)
        return fake


@implementer(IOutboundConnector)
class _Connector:
    timeout = 10.0

    def __init__(self) -> None:
        self.calls: List[Tuple[Address, Any, defer.Deferred[Any]]] = []
        self.lookups: List[Tuple[str, defer.Deferred[Any]]] = []
        self.cancelled = 0

    def _cancel(self, d: defer.Deferred[Any]) -> None:
        self.cancelled += 1

    def connect(self, address: Address, factory: Any, check: Any = None) -> Any:
        d: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.calls.append((address, factory, d))
        return d

    def resolve(self, name: str) -> Any:
        d: defer.Deferred[Any] = defer.Deferred(self._cancel)
        self.lookups.append((name, d))
        return d


# --------------------------------------------------------------------------
# Server target: the reference model


@dataclass
class Expected:
    """What the server must have done for the bytes received so far."""

    output: bytes = b""
    #: "open" (waiting for more), "closed" (it must be closing) or a command.
    status: str = "open"
    request: Optional[Request] = None


def model(buf: bytes, methods: List[int]) -> Expected:
    """The server's required behaviour for ``buf``, from the codec alone."""
    out = Expected()
    try:
        parsed = codec.parse_greeting(buf[:MAX_GREETING_SIZE])
    except ProtocolError:
        out.status = "closed"
        return out
    if parsed is None:
        return out
    greeting, used = parsed
    rest = buf[used:]
    method = next((m for m in methods if m in greeting.methods), None)
    if method is None:
        out.output = b"\x05\xff"
        out.status = "closed"
        return out
    out.output = bytes((5, method))
    if method == codec.Method.USERNAME_PASSWORD:
        try:
            auth = codec.parse_userpass_request(rest[:MAX_USERPASS_SIZE])
        except codec.EmptyCredentials:
            out.output += b"\x01\x01"  # RFC 1929: a status, then the close
            out.status = "closed"
            return out
        except ProtocolError:
            out.status = "closed"
            return out
        if auth is None:
            return out
        credentials, used = auth
        rest = rest[used:]
        if USERS.get(credentials.username) != credentials.password:
            out.output += b"\x01\x01"
            out.status = "closed"
            return out
        out.output += b"\x01\x00"
    try:
        request = codec.parse_request(rest[:MAX_REQUEST_SIZE])
    except ProtocolError as e:
        if e.reply is not None:
            out.output += Reply(e.reply).to_bytes()
        out.status = "closed"
        return out
    if request is None:
        return out
    out.request = request[0]
    out.status = request[0].command.phrase
    return out


# --------------------------------------------------------------------------
# Server target: one run


@dataclass
class ServerInput:
    """A byte stream, where it is cut, and how the outbound connect ends."""

    stream: bytes
    cuts: List[int] = field(default_factory=list)
    #: "pending", "succeed", "refused", "dns" or "timeout".
    connect: str = "pending"
    #: The connect ends after this many chunks (clamped to the last).
    at: int = 0
    #: What the destination sends once connected.
    down: bytes = b""


_FAILURES = {
    "refused": (error.ConnectionRefusedError(), ReplyCode.CONNECTION_REFUSED),
    "dns": (error.DNSLookupError("no such name"), ReplyCode.HOST_UNREACHABLE),
    "timeout": (error.TimeoutError(), ReplyCode.TTL_EXPIRED),
}


class _Run:
    """One server protocol on a StringTransport, and what it did."""

    def __init__(
        self, userpass: bool, protocols: Tuple[str, ...] = ("socks5",)
    ) -> None:
        self.reactor = _Reactor()
        self.connector = _Connector()
        authenticators: List[Any] = [NoAuthAuthenticator()]
        if userpass:
            checker = InMemoryUsernamePasswordDatabaseDontUse()
            checker.users = dict(USERS)
            authenticators = [
                UsernamePasswordAuthenticator.from_checkers(checker),
                NoAuthAuthenticator(),
            ]
        self.factory = SOCKS5ServerFactory(
            authenticators,
            reactor=self.reactor,
            connector=self.connector,
            handshake_timeout=HANDSHAKE_TIMEOUT,
            protocols=protocols,
        )
        self.methods = self.factory.methods
        self.protocol = self.factory.buildProtocol(CLIENT)
        self.transport = HalfCloseTransport(SERVER, CLIENT)
        self.outbound: Optional[HalfCloseTransport] = None
        self.received = b""
        self.resolved: Optional[str] = None
        self.protocol.makeConnection(self.transport)

    @property
    def attempts(self) -> int:
        """Outbound steps taken: connects, listening ports, look-ups."""
        return (
            len(self.connector.calls)
            + len(self.reactor.ports)
            + len(self.connector.lookups)
        )

    @property
    def closing(self) -> bool:
        return bool(self.transport.disconnecting or self.transport.disconnected)

    def feed(self, chunk: bytes) -> None:
        self.received += chunk
        self.protocol.dataReceived(chunk)

    def resolve(self, how: str, down: bytes) -> None:
        """End the pending connect, if there is one, as ``how`` says."""
        if how == "pending" or not self.connector.calls:
            return
        _, factory, d = self.connector.calls[0]
        if d.called:
            return
        self.resolved = how
        if how == "succeed":
            protocol = factory.buildProtocol(OUTBOUND)
            self.outbound = HalfCloseTransport(OUTBOUND, OUTBOUND)
            protocol.makeConnection(self.outbound)
            d.callback(protocol)
            if down and not self.closing:
                protocol.dataReceived(down)
        else:
            d.errback(Failure(_FAILURES[how][0]))

    def check(self, whole: bool = False) -> None:
        """The invariants that hold after every chunk."""
        expected = model(self.received, self.methods)
        written = self.transport.value()
        protocol = self.protocol
        assert self.closing or len(protocol._buffer) <= MAX_EARLY_DATA
        attempts = self.attempts
        request = expected.request
        if request is None:
            assert attempts == 0, "an attempt before a complete, valid request"
            assert written == expected.output, (written, expected.output)
            if expected.status == "closed":
                assert self.closing, "a protocol error left the connection open"
            return
        address = request.address
        if (
            request.command is not Command.UDP_ASSOCIATE
            and address.type is not codec.AddressType.DOMAIN
            and unspecified(address.host)
            and not (request.command is Command.BIND and address.is_unspecified)
        ):
            # No destination (nor BIND peer) is ever unspecified: refused.
            assert attempts == 0, "an attempt toward an unspecified address"
            refused = Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes()
            assert written == expected.output + refused, written
            assert self.closing
            return
        assert attempts == 1, f"{attempts} attempts for one request"
        assert written.startswith(expected.output), (written, expected.output)
        reply = written[len(expected.output) :]
        if request.command is Command.CONNECT:
            assert self.connector.calls[0][0] == request.address
            self._check_connect_reply(reply)
        elif request.command is Command.BIND:
            if self.connector.lookups:
                assert self.connector.lookups[0][0] == request.address.host
                assert reply == b""
            else:
                assert self.reactor.tcpServers, "BIND without a listening port"
                self._check_success(reply, Command.BIND)
        else:
            assert self.reactor.udpServers, "UDP ASSOCIATE without a UDP port"
            self._check_success(reply, Command.UDP_ASSOCIATE)

    def _check_connect_reply(self, reply: bytes) -> None:
        if self.resolved is None:
            assert reply == b"", "a reply before the connect ended"
            return
        if self.resolved == "succeed":
            self._check_success(reply, Command.CONNECT)
            return
        assert reply == Reply(_FAILURES[self.resolved][1]).to_bytes(), reply
        assert self.closing

    def _check_success(self, reply: bytes, command: Command) -> None:
        parsed = codec.parse_reply(reply)
        assert parsed is not None, f"incomplete reply {reply!r}"
        message, used = parsed
        assert message.reply is ReplyCode.SUCCEEDED, message
        rest = reply[used:]
        if command is Command.CONNECT:
            assert rest in (b"", self._down), "relayed bytes differ"
        else:
            assert rest == b"", rest

    _down = b""

    def finish(self, data: ServerInput) -> None:
        """Time passes, then the client goes: nothing may be left behind."""
        state_before = self.protocol.state
        self.reactor.advance(HANDSHAKE_TIMEOUT + 0.5)
        if state_before in (State.GREETING, State.AUTHENTICATING, State.REQUEST):
            assert self.closing, f"handshake in {state_before} outlived its timeout"
        self.protocol.connectionLost(Failure(error.ConnectionDone()))
        assert not self.factory.active, "factory.active not empty"
        pending = [c for c in self.reactor.getDelayedCalls() if c.active()]
        assert not pending, f"timers left: {pending}"
        assert all(not p.listening for p in self.reactor.ports), "a port left open"
        for _, _, d in self.connector.calls:
            assert d.called, "a connect left running"
        for _, d in self.connector.lookups:
            assert d.called, "a lookup left running"
        if self.outbound is not None:
            assert self.outbound.disconnecting or self.outbound.disconnected


class _ErrorLog:
    """Collects events logged as failures or errors while a target runs."""

    def __init__(self) -> None:
        self.events: List[Dict[str, Any]] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        level = getattr(event.get("log_level"), "name", "")
        if event.get("log_failure") is not None or level in ("error", "critical"):
            self.events.append(event)

    def __enter__(self) -> _ErrorLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        globalLogPublisher.removeObserver(self)


def _chunks(stream: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(stream)})
    bounds = [0, *points, len(stream)]
    return [stream[a:b] for a, b in zip(bounds, bounds[1:])]


def _drive(
    data: ServerInput,
    userpass: bool,
    chunks: List[bytes],
    make: Callable[[bool], _Run] = _Run,
) -> _Run:
    run = make(userpass)
    run._down = data.down
    at = min(data.at, max(0, len(chunks) - 1))
    for index, chunk in enumerate(chunks):
        if chunk:
            run.feed(chunk)
        if index == at:
            run.resolve(data.connect, data.down)
        run.check()
    return run


def check_server(data: ServerInput, userpass: bool = False) -> None:
    """One input for the whole server protocol."""
    _count("server.userpass" if userpass else "server.noauth")
    with _ErrorLog() as errors:
        chunks = _chunks(data.stream, data.cuts) or [b""]
        run = _drive(data, userpass, chunks)
        if data.connect == "pending":
            # Split or whole, the same bytes and the same attempts.
            whole = _drive(data, userpass, [data.stream])
            assert whole.transport.value() == run.transport.value()
            assert [c[0] for c in whole.connector.calls] == [
                c[0] for c in run.connector.calls
            ]
            whole.finish(data)
        run.finish(data)
    assert not errors.events, [e.get("log_format") for e in errors.events]


# --------------------------------------------------------------------------
# SOCKS4 and 4a: the codec and the server


def check_socks4_request(buf: bytes) -> None:
    """One input for the SOCKS4/4a request parser."""
    _count("socks4.request")
    outcome = _outcome(socks4.parse_request, buf)
    assert _outcome(socks4.parse_request, bytearray(buf)) == outcome
    assert _outcome(socks4.parse_request, memoryview(buf)) == outcome
    if outcome is None:
        assert len(buf) <= socks4.MAX_REQUEST_SIZE, "pending past the bounds"
        return
    if outcome[0] == "error":
        return
    message, consumed = outcome
    assert 0 < consumed <= min(len(buf), socks4.MAX_REQUEST_SIZE)
    assert b"\x00" not in message.userid
    assert len(message.userid) <= socks4.MAX_USERID
    wire = message.to_bytes()
    # The same bytes, but 4a's 0.0.0.x, which says only "a name follows".
    if message.request.address.type is codec.AddressType.DOMAIN:
        assert wire[:7] + wire[8:] == buf[:7] + buf[8:consumed]
    else:
        assert wire == buf[:consumed]
    assert socks4.parse_request(wire) == (message, len(wire))
    for size in range(consumed):
        early = _outcome(socks4.parse_request, buf[:size])
        assert early is None or early[0] == "error", (size, early)


def check_socks4_reply(buf: bytes) -> None:
    """One input for the client's SOCKS4 reply parser."""
    _count("socks4.reply")
    outcome = _outcome(socks4.parse_reply, buf)
    if outcome is None:
        assert len(buf) < 8
    elif outcome[0] != "error":
        (code, address), used = outcome
        assert used == 8 and 0 <= code <= 255
        if code in (socks4.GRANTED, socks4.REJECTED):
            wire = socks4.reply_bytes(
                ReplyCode.SUCCEEDED
                if code == socks4.GRANTED
                else ReplyCode.GENERAL_FAILURE,
                address,
            )
            assert wire == buf[:8]


_SOCKS4_GRANTED_CONNECT = b"\x00\x5a\xc3\x50\x7f\x00\x00\x01"  # OUTBOUND
_SOCKS4_GRANTED_BIND = b"\x00\x5a\x75\x30\x7f\x00\x00\x01"  # _Port's
_SOCKS4_REJECTED = b"\x00\x5b" + bytes(6)


class _Socks4Run(_Run):
    """A server speaking SOCKS5 and SOCKS4, fed a stream meant as SOCKS4."""

    def __init__(self, userpass: bool) -> None:
        super().__init__(userpass, ("socks5", "socks4"))

    def check(self, whole: bool = False) -> None:
        received = self.received
        written = self.transport.value()
        attempts = self.attempts
        if not received or received[0] != 4:
            return  # SOCKS5 (the other targets) or garbage: closed
        assert self.closing or len(self.protocol._buffer) <= MAX_EARLY_DATA
        try:
            parsed = socks4.parse_request(received[: socks4.MAX_REQUEST_SIZE])
        except ProtocolError:
            assert attempts == 0 and written == _SOCKS4_REJECTED and self.closing
            return
        if parsed is None:
            assert attempts == 0 and written == b"" and not self.closing
            return
        request = parsed[0].request
        address = request.address
        if (
            address.type is codec.AddressType.IPV4
            and unspecified(address.host)
            and not (request.command is Command.BIND and address.is_unspecified)
        ):
            assert attempts == 0 and written == _SOCKS4_REJECTED and self.closing
            return
        assert attempts == 1, f"{attempts} attempts for one request"
        if request.command is Command.BIND:
            if self.connector.lookups:
                assert self.connector.lookups[0][0] == address.host
                assert written == b""
            else:
                assert written == _SOCKS4_GRANTED_BIND, written
            return
        assert self.connector.calls[0][0] == address
        if self.resolved is None:
            assert written == b"", "a reply before the connect ended"
        elif self.resolved == "succeed":
            assert written in (
                _SOCKS4_GRANTED_CONNECT,
                _SOCKS4_GRANTED_CONNECT + self._down,
            ), written
            payload = received[parsed[1] :]
            assert self.outbound is not None
            assert self.closing or self.outbound.value() == payload
        else:
            assert written == _SOCKS4_REJECTED and self.closing


def check_socks4_server(data: ServerInput) -> None:
    """One input for the server protocol, speaking SOCKS4."""
    _count("server.socks4")
    with _ErrorLog() as errors:
        chunks = _chunks(data.stream, data.cuts) or [b""]
        run = _drive(data, False, chunks, _Socks4Run)
        if data.connect == "pending":
            whole = _drive(data, False, [data.stream], _Socks4Run)
            assert whole.transport.value() == run.transport.value()
            whole.finish(data)
        run.finish(data)
    assert not errors.events, [e.get("log_format") for e in errors.events]


# --------------------------------------------------------------------------
# The HTTP proxy: its request targets and the server speaking HTTP


def check_http_target(buf: bytes) -> None:
    """
    One input for the HTTP proxy's target parsers: a CONNECT authority and
    an absolute URI either raise ``BadTarget`` or give an address that reads
    back the same from its own text, and an origin-form path of printable
    ASCII.
    """
    _count("http.target")
    for parse in (httpproxy.parse_authority, httpproxy.parse_absolute_uri):
        try:
            parsed = parse(buf)
        except httpproxy.BadTarget:
            continue
        if isinstance(parsed, tuple):
            address, path = parsed
            assert path.startswith(b"/") and all(0x20 < c < 0x7F for c in path)
            again = httpproxy.parse_absolute_uri(
                b"http://%s%s" % (str(address).encode(), path)
            )
            assert again == (address, path), (buf, again)
        else:
            address = parsed
        assert 0 < address.port < 65536
        assert httpproxy.parse_authority(str(address).encode()) == address


#: Every status line the proxy writes starts so.
_HTTP_ANSWER = (b"HTTP/1.1 ", b"HTTP/1.0 ")


def _named_targets(received: bytes) -> List[Address]:
    """The addresses the request lines of ``received`` name (any of them)."""
    found: List[Address] = []
    for line in received.split(b"\r\n"):
        words = line.split(b" ")
        if len(words) != 3:
            continue
        for parse in (httpproxy.parse_authority, httpproxy.parse_absolute_uri):
            try:
                parsed = parse(words[1])
            except httpproxy.BadTarget:
                continue
            found.append(parsed[0] if isinstance(parsed, tuple) else parsed)
    return found


class _HttpRun(_Run):
    """A server speaking SOCKS5 and HTTP, fed a stream meant as HTTP."""

    def __init__(self, userpass: bool) -> None:
        super().__init__(userpass, ("socks5", "http"))

    def check(self, whole: bool = False) -> None:
        received = self.received
        if not received or received[0] in (4, 5):
            return  # the SOCKS targets' business
        written = self.transport.value()
        assert self.closing or len(self.protocol._buffer) <= MAX_EARLY_DATA
        assert not written or written.startswith(_HTTP_ANSWER), written[:40]
        assert not self.reactor.ports and not self.connector.lookups
        calls = self.connector.calls
        if calls:
            # Only once a head is complete, only where a request line said.
            assert b"\r\n\r\n" in received, "a connect before a whole head"
            named = _named_targets(received)
            for address, _, _ in calls:
                assert address in named, (address, named)
        if self.resolved == "succeed" and written.startswith(b"HTTP/1.1 200 C"):
            head = b"HTTP/1.1 200 Connection established\r\n\r\n"
            assert written in (head, head + self._down), written

    def finish(self, data: ServerInput) -> None:
        protocol = self.protocol
        self.reactor.advance(httpproxy.KEEPALIVE_TIMEOUT + HANDSHAKE_TIMEOUT + 1)
        busy = getattr(protocol, "phase", None) == "busy"
        if protocol.state not in (State.CONNECTING, State.RELAYING) and not busy:
            assert self.closing, (
                f"an HTTP connection outlived its timeouts: {protocol.state}"
            )
        protocol.connectionLost(Failure(error.ConnectionDone()))
        assert not self.factory.active, "factory.active not empty"
        pending = [c for c in self.reactor.getDelayedCalls() if c.active()]
        assert not pending, f"timers left: {pending}"
        for _, _, d in self.connector.calls:
            assert d.called, "a connect left running"
        if self.outbound is not None:
            assert self.outbound.disconnecting or self.outbound.disconnected


def check_http_server(data: ServerInput) -> None:
    """One input for the server protocol, speaking HTTP."""
    _count("server.http")
    with _ErrorLog() as errors:
        chunks = _chunks(data.stream, data.cuts) or [b""]
        run = _drive(data, False, chunks, _HttpRun)
        if data.connect == "pending":
            whole = _drive(data, False, [data.stream], _HttpRun)
            assert whole.transport.value() == run.transport.value()
            assert [c[0] for c in whole.connector.calls] == [
                c[0] for c in run.connector.calls
            ]
            whole.finish(data)
        run.finish(data)
    assert not errors.events, [e.get("log_format") for e in errors.events]


# --------------------------------------------------------------------------
# Configuration parsers: the rules file and htpasswd files

#: Client and destination addresses the rule-set invariants are checked at:
#: loopback, unspecified, private, documentation, IPv4-mapped and IPv6.
PROBE_IPS = (
    "127.0.0.1",
    "0.0.0.0",
    "10.1.2.3",
    "192.168.7.9",
    "198.51.100.7",
    "203.0.113.1",
    "::1",
    "::",
    "::ffff:10.1.2.3",
    "2001:db8::1",
    "fd00::5",
)
PROBE_USERS = (None, "alice", "bob", "-", "*")
PROBE_NAMES = ("localhost", "www.example.com", "example.com", "x.test")


def check_rules(text: str, seed: int = 0) -> None:
    """
    One input for the rules-file parser.  It raises :class:`RulesError`
    (naming a line of the input) or returns a rule set that renders to text
    parsing back to an equal set; and its staged decisions never contradict
    each other: a final answer to a client holds for each of its requests,
    a final answer to a request holds for every address it resolves to, and
    an address check is always final.  ``seed`` picks the probes (a few
    clients, requests and resolved addresses) so that each input stays cheap.
    """
    _count("config.rules")
    try:
        rules = RuleSet.parse(text, "fuzz.rules")
    except RulesError as e:
        lines = text.count("\n") + 1
        assert e.line is None or 1 <= e.line <= lines, (e.line, lines)
        assert str(e)
        return
    rendered = rules.render()
    again = RuleSet.parse(rendered, "rendered")
    assert again == rules, (rendered, text)
    assert again.render() == rendered
    rules.warnings  # noqa: B018 - must not raise
    rules.describe()
    destinations = _probe_destinations()
    commands = list(Command)
    for k in range(3):
        pick = seed >> (8 * k)
        client = PROBE_IPS[pick % len(PROBE_IPS)]
        by_client = rules.check_client(client)
        for j in range(3):
            user = PROBE_USERS[(pick >> 1 + j) % len(PROBE_USERS)]
            command = commands[(pick >> 3 + j) % len(commands)]
            destination = destinations[(pick + 5 * j) % len(destinations)]
            # The protocol, and a client without the password the server
            # wants (SOCKS4), whom only explicit rules may allow.
            kw = {
                "protocol": PROTOCOL_WORDS[(pick >> 5 + j) % len(PROTOCOL_WORDS)],
                "explicit": bool((pick >> 7 + j) & 1),
            }
            request = rules.check_request(client, user, command, destination, **kw)
            if by_client.final and not kw["explicit"]:
                assert request.allowed == by_client.allowed, (
                    client, user, command, destination, by_client, request
                )  # fmt: skip
            for i in range(2):
                ip = (
                    PROBE_IPS[(pick + 7 * j + 3 * i) % len(PROBE_IPS)]
                    if destination.type is codec.AddressType.DOMAIN
                    else destination.host
                )
                resolved = rules.check_resolved(
                    client, user, command, destination, ip, **kw
                )
                assert resolved.final, resolved
                if request.final:
                    assert resolved.allowed == request.allowed, (
                        client, user, command, destination, ip, request, resolved
                    )  # fmt: skip


def _probe_destinations() -> List[Address]:
    found = _PROBE_DESTINATIONS
    if not found:
        found.extend(Address.from_host(ip, 443) for ip in PROBE_IPS[::3])
        found.extend(Address.from_host(name, 80) for name in PROBE_NAMES[:2])
    return found


_PROBE_DESTINATIONS: List[Address] = []


def check_htpasswd(data: bytes) -> None:
    """
    One input for the htpasswd parser: never raises; each entry is a
    non-empty user name without ``:`` or line break and a bcrypt hash; entries
    and skipped lines together are at most the non-blank lines; and the
    entries written back as ``user:hash`` lines parse to the same entries.
    """
    _count("config.htpasswd")
    users, skipped = parse_htpasswd(data)
    assert type(users) is dict and type(skipped) is int and skipped >= 0
    lines = [line.strip() for line in data.splitlines()]
    assert len(users) + skipped <= sum(1 for line in lines if line), (users, skipped)
    for user, hashed in users.items():
        assert type(user) is bytes and type(hashed) is bytes
        assert user and b":" not in user, user
        assert not set(user) & set(b"\r\n"), user
        assert hashed[:4] in (b"$2y$", b"$2b$", b"$2a$"), hashed
    rewritten = b"".join(user + b":" + hashed + b"\n" for user, hashed in users.items())
    assert parse_htpasswd(rewritten) == (users, 0)


# --------------------------------------------------------------------------
# Strategies


def _frame(prefix: bytes, body: bytes) -> bytes:
    return prefix + bytes((len(body) & 0xFF,)) + body


names = st.sampled_from(
    [b"localhost", b"x.test", b"\xff\xfe", b"a\x00b", b""]
) | st.binary(max_size=12)
addresses = st.one_of(
    st.binary(min_size=4, max_size=4).map(lambda b: b"\x01" + b),
    st.binary(min_size=16, max_size=16).map(lambda b: b"\x04" + b),
    names.map(lambda n: _frame(b"\x03", n)),
    st.tuples(st.integers(0, 255), st.binary(max_size=20)).map(
        lambda t: bytes((t[0],)) + t[1]
    ),
)
requests = st.tuples(
    st.sampled_from([1, 2, 3]) | st.integers(0, 255),
    st.just(0) | st.integers(0, 255),
    addresses,
    st.binary(min_size=2, max_size=2),
).map(lambda t: bytes((5, t[0], t[1])) + t[2] + t[3])
greetings = st.one_of(
    st.sampled_from([[0], [2], [0, 2], [2, 0], [1], []]),
    st.lists(st.integers(0, 255), max_size=8),
).map(lambda m: bytes((5, len(m), *m)))
credentials = st.tuples(
    st.sampled_from([b"alice", b"bob", b""]) | st.binary(max_size=6),
    st.sampled_from([b"s3cret", b"wrong", b""]) | st.binary(max_size=6),
).map(lambda t: b"\x01" + _frame(b"", t[0]) + _frame(b"", t[1]))


def _mutate(t: Tuple[bytes, int, int]) -> bytes:
    piece, where, value = t
    if not piece:
        return piece
    i = where % len(piece)
    return piece[:i] + bytes((value,)) + piece[i + 1 :]


valid_pieces = st.one_of(greetings, credentials, requests)
pieces = st.one_of(
    valid_pieces,
    st.tuples(valid_pieces, st.integers(0, 300), st.integers(0, 255)).map(_mutate),
    st.binary(max_size=40),
)
#: Mostly well-formed sequences (greeting, maybe credentials, request,
#: payload), each piece possibly mutated; sometimes anything at all.
streams = st.one_of(
    st.tuples(
        greetings, credentials | st.just(b""), requests, st.binary(max_size=30)
    ).map(b"".join),
    st.lists(pieces, max_size=6).map(b"".join),
    st.binary(max_size=300),
)


@st.composite
def server_inputs(draw: Any, of: Any = streams) -> ServerInput:
    stream = draw(of)
    cuts = draw(st.lists(st.integers(0, max(0, len(stream))), max_size=10))
    return ServerInput(
        stream=stream,
        cuts=cuts,
        connect=draw(
            st.sampled_from(["pending", "succeed", "refused", "dns", "timeout"])
        ),
        at=draw(st.integers(0, 10)),
        down=draw(st.sampled_from([b"", b"hello from the destination"])),
    )


socks4_requests = st.tuples(
    st.sampled_from([1, 2]) | st.integers(0, 255),
    st.binary(min_size=2, max_size=2),
    st.sampled_from([b"\x7f\x00\x00\x01", b"\x00\x00\x00\x01", b"\x00" * 4])
    | st.binary(min_size=4, max_size=4),
    st.sampled_from([b"", b"alice", b"x" * 255, b"x" * 256]) | st.binary(max_size=8),
    names,
).map(lambda t: bytes((4, t[0])) + t[1] + t[2] + t[3] + b"\x00" + t[4] + b"\x00")
socks4_pieces = st.one_of(
    socks4_requests,
    st.tuples(socks4_requests, st.integers(0, 600), st.integers(0, 255)).map(_mutate),
    socks4_requests.map(lambda r: r[:-1]),  # its last NUL missing
)
socks4_streams = st.one_of(
    st.tuples(socks4_pieces, st.binary(max_size=30)).map(b"".join),
    st.binary(max_size=300).map(lambda b: b"\x04" + b),
)

http_targets = st.sampled_from(
    [
        b"127.0.0.1:443",
        b"[::1]:8443",
        b"localhost:22",
        b"x.test",
        b"x.test:0",
        b"http://127.0.0.1:8080/p?q",
        b"http://[::1]/",
        b"https://x.test/",
        b"/origin-form",
        b"http://u@x.test/",
    ]
) | st.binary(max_size=20).filter(lambda b: not any(c in b for c in b" \r\n"))
http_fields = st.sampled_from(
    [
        b"Host: x.test",
        b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0",
        b"Proxy-Authorization: Basic !!",
        b"Content-Length: 3",
        b"Content-Length: x",
        b"Transfer-Encoding: chunked",
        b"Connection: close",
        b"Expect: 100-continue",
        b"X: " + b"y" * 9000,
        b" continued",
    ]
) | st.binary(max_size=20)
http_heads = st.tuples(
    st.sampled_from([b"CONNECT", b"GET", b"POST", b"HEAD", b"G\x00T"]),
    http_targets,
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2"]),
    st.lists(http_fields, max_size=4),
).map(lambda t: b"%s %s %s\r\n" % t[:3] + b"".join(f + b"\r\n" for f in t[3]) + b"\r\n")
http_pieces = st.one_of(
    http_heads,
    st.tuples(http_heads, st.integers(0, 300), st.integers(0, 255)).map(_mutate),
    st.sampled_from([b"abc", b"3\r\nabc\r\n0\r\n\r\n", b"\r\n"]),
)
#: A head or two (maybe mutated), a body or tunnel bytes; sometimes anything.
http_streams = st.one_of(
    st.lists(http_pieces, min_size=1, max_size=3).map(b"".join),
    st.binary(max_size=300).map(lambda b: b"G" + b),
)


fuzz_bytes = st.one_of(
    st.binary(max_size=600),
    st.tuples(
        st.sampled_from(
            [b"\x05", b"\x05\x01", b"\x05\x01\x00", b"\x01", b"\x00\x00\x00"]
        ),
        st.binary(max_size=300),
    ).map(b"".join),
    requests,
    greetings,
    credentials,
)

#: Words of the rules grammar, valid values and near misses, for rules lines
#: that are mostly almost valid.
_RULE_WORDS = [
        "allow", "deny", "default", "from", "to", "port", "command", "user",
        "via", "self", "connect", "bind", "udp", "*", "-", "alice", "tor",
        "direct", "127.0.0.0/8", "0.0.0.0/0", "::/0", "::1", "10.0.0.0/8",
        "192.168.0.0/16", "::ffff:10.0.0.0/104", "2001:db8::/32", "fd00::/8",
        "198.51.100.7", ".example.com", "example.com", "*.example.com",
        "localhost", "0x0", "0", "443", "80-443", "0-65535", "70000",
        "1-", ",", "#", "ALLOW", "allow,", ",deny", "10.0.0.0/33", "xn--",
        "protocol", "socks4", "SOCKS5", "http", "socks6",
]  # fmt: skip
rule_words = st.sampled_from(_RULE_WORDS)
_RULE_VALUES = {
    "from": ["127.0.0.0/8", "0.0.0.0/0", "::/0", "10.0.0.0/8", "192.168.0.0/16",
             "::ffff:10.0.0.0/104", "fd00::/8", "198.51.100.7", "::1", "self"],
    "to": ["127.0.0.0/8", "0.0.0.0/8", "::1", "::", "2001:db8::/32", "self",
           ".example.com", "example.com", "localhost", "x.test", "0x0", "0"],
    "port": ["443", "80-443", "0-65535", "0", "22"],
    "command": ["connect", "bind", "udp"],
    "user": ["*", "-", "alice", "bob"],
    "via": ["tor", "direct"],
    "protocol": ["socks5", "socks4", "http"],
}  # fmt: skip
#: One condition: a keyword and a comma-separated list of its values.
rule_conditions = st.sampled_from(sorted(_RULE_VALUES)).flatmap(
    lambda key: st.lists(
        st.sampled_from(_RULE_VALUES[key]), min_size=1, max_size=3
    ).map(lambda values: f"{key} {', '.join(values)}")
)
good_rule_lines = st.tuples(
    st.sampled_from(["allow", "deny", "ALLOW"]),
    st.lists(rule_conditions, max_size=4, unique_by=lambda c: c.split()[0]),
).map(lambda t: " ".join([t[0], *t[1]]))
noise_lines = st.one_of(
    st.lists(rule_words, max_size=9).map(" ".join),
    st.lists(rule_words | st.text(max_size=6), max_size=6).map(" ".join),
    st.text(max_size=40),
)
#: Files of mostly well-formed rules, a default line, sometimes noise.
rules_texts = st.tuples(
    st.lists(
        st.one_of(*[good_rule_lines] * 9, noise_lines),
        max_size=6,
    ),
    st.sampled_from(["default allow", "default deny", "", "# end"]),
).map(lambda t: "\n".join([*t[0], t[1]]))
htpasswd_lines = st.one_of(
    st.tuples(
        st.sampled_from([b"alice", b"bob", b"", b"a:b", b" carol", b"#x"])
        | st.binary(max_size=8),
        st.sampled_from([b":", b"", b"::"]),
        st.sampled_from([b"$2y$05$", b"$2b$12$", b"$2a$04$", b"$apr1$", b"{SHA}"])
        | st.binary(max_size=4),
        st.binary(max_size=20),
    ).map(b"".join),
    st.binary(max_size=40),
)
htpasswd_files = st.lists(htpasswd_lines, max_size=6).flatmap(
    lambda lines: st.sampled_from([b"\n", b"\r\n", b"\r"]).map(
        lambda sep: sep.join(lines)
    )
)

# --------------------------------------------------------------------------
# Targets


@dataclass(frozen=True)
class Target:
    name: str
    strategy: Any
    check: Callable[..., None]
    #: The check on raw fuzzer bytes, for a coverage-guided fuzzer that
    #: mutates bytes itself (much faster than through Hypothesis); ``None``
    #: for targets whose input is structured (the server's).
    raw: Optional[Callable[[bytes], None]] = None


def _parser_target(name: str) -> Target:
    def check(buf: bytes) -> None:
        check_parser(name, buf)

    return Target(f"codec.{name}", fuzz_bytes, check, raw=check)


def _raw_address(data: bytes) -> None:
    port = int.from_bytes(data[:2], "big")
    check_address(data[2:].decode("utf-8", "replace"), port)


def _raw_rules(data: bytes) -> None:
    check_rules(data[3:].decode("utf-8", "replace"), int.from_bytes(data[:3], "big"))


TARGETS: Dict[str, Target] = {
    t.name: t
    for t in [
        *(_parser_target(name) for name in PARSERS),
        Target(
            "codec.udp_datagram",
            fuzz_bytes,
            check_udp_datagram,
            raw=check_udp_datagram,
        ),
        Target(
            "codec.address",
            st.tuples(st.text(max_size=40), st.integers(0, 0xFFFF)),
            lambda t: check_address(*t),
            raw=_raw_address,
        ),
        Target(
            "config.rules",
            st.tuples(rules_texts, st.integers(0, 1 << 24)),
            lambda t: check_rules(*t),
            raw=_raw_rules,
        ),
        Target("config.htpasswd", htpasswd_files, check_htpasswd, raw=check_htpasswd),
        Target(
            "socks4.request",
            socks4_pieces | fuzz_bytes,
            check_socks4_request,
            raw=check_socks4_request,
        ),
        Target("socks4.reply", fuzz_bytes, check_socks4_reply, raw=check_socks4_reply),
        Target("server.socks4", server_inputs(socks4_streams), check_socks4_server),
        Target(
            "http.target",
            http_targets | fuzz_bytes,
            check_http_target,
            raw=check_http_target,
        ),
        Target("server.http", server_inputs(http_streams), check_http_server),
        Target("server.noauth", server_inputs(), check_server),
        Target(
            "server.userpass",
            server_inputs(),
            lambda data: check_server(data, userpass=True),
        ),
    ]
}


def hypothesis_test(
    name: str, max_examples: int, phases: Optional[List[Phase]] = None
) -> Callable[[], None]:
    """A zero-argument ``@given`` test running one target."""
    target = TARGETS[name]

    @settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=phases or [Phase.explicit, Phase.generate, Phase.shrink],
    )
    @given(target.strategy)
    def test(value: Any) -> None:
        target.check(value)

    test.__name__ = test.__qualname__ = "fuzz_" + name.replace(".", "_")
    return test


def fuzz_for(name: str, seconds: float) -> Dict[str, Any]:
    """
    Run one target for about ``seconds``, in batches of fresh random
    examples sized from the rate so far; the inputs tried, and the first
    failure (as Hypothesis reports it after shrinking) as text.
    """
    before = COUNTS.get(name, 0)
    start = time.monotonic()
    deadline = start + seconds
    failure: Optional[str] = None
    batch = 20
    while failure is None:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done = COUNTS.get(name, 0) - before
        if done:
            rate = done / max(time.monotonic() - start, 1e-3)
            batch = int(min(5000, max(10, rate * left)))
        test = hypothesis_test(name, batch, [Phase.generate, Phase.shrink])
        try:
            test()
        except Exception as e:  # noqa: BLE001 - the failure is the result
            notes = "\n".join(getattr(e, "__notes__", []))
            failure = f"{type(e).__name__}: {e}\n{notes}"[:4000]
    return {
        "inputs": COUNTS.get(name, 0) - before,
        "seconds": round(time.monotonic() - start, 2),
        "failure": failure,
    }


def _instrument(atheris: Any) -> None:
    """Coverage for the package's own functions only (instrument_all is slow)."""
    import inspect
    import sys

    for module in list(sys.modules.values()):
        if not getattr(module, "__name__", "").startswith("twisted_socks5"):
            continue
        for obj in list(vars(module).values()):
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            functions = [obj] if inspect.isfunction(obj) else []
            if inspect.isclass(obj):
                functions = [f for f in vars(obj).values() if inspect.isfunction(f)]
            for function in functions:
                atheris.instrument_func(function)


#: Words a byte-mutating fuzzer splices into inputs (a libFuzzer dictionary).
DICTIONARY: Dict[str, List[str]] = {
    "config.rules": sorted(
        {*_RULE_WORDS, *(v for vs in _RULE_VALUES.values() for v in vs)}
    ),
    "config.htpasswd": ["$2y$05$", "$2b$12$", "$2a$04$", "alice:", "\\n", "#"],
}


def main(argv: Optional[List[str]] = None) -> None:
    """
    ``python stress/fuzz_targets.py TARGET [libFuzzer options]``: one target
    under atheris (coverage-guided, when it is installed): on raw bytes where
    the target takes them, else through Hypothesis's ``fuzz_one_input``; e.g.
    ``-max_total_time=600`` or ``-runs=1000000``.  libFuzzer prints the inputs
    tried ("Done N runs").  ``--list`` names the targets;
    ``--dictionary`` prints the target's libFuzzer dictionary.
    ``stress/fuzz_campaign.py`` runs them all.
    """
    import sys

    args = list(sys.argv if argv is None else argv)
    if len(args) < 2 or args[1] not in TARGETS:
        print("targets:", ", ".join(TARGETS))
        raise SystemExit(0 if "--list" in args else 2)
    name = args.pop(1)
    if "--dictionary" in args:
        for word in DICTIONARY.get(name, []):
            print(json.dumps(word))
        return
    try:
        import atheris  # type: ignore[import-not-found]
    except ImportError:
        raise SystemExit("atheris is not installed: pip install atheris") from None
    target = TARGETS[name]
    one_input: Callable[[bytes], None]
    if target.raw is not None:
        one_input = target.raw
    else:
        one_input = hypothesis_test(name, 1).hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    _instrument(atheris)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
