"""
The HTTP proxy on the SOCKS port: ``CONNECT host:port`` tunnels and
absolute-URI requests (``GET http://host/path``) forwarded.

The protocol front (:mod:`twisted_socks5.connection`) hands over a client
whose first byte is not a SOCKS version with :func:`take_over` (through its
factory's ``take_over_http``: this module builds on that one).  The
connection stays the same object (admitted, counted, logged at close as
every other), turned into an :class:`HTTPProxyConnection`; its requests are
parsed by ``twisted.web``'s :class:`~twisted.web.http.HTTPChannel`, bounded
here (request line 414, header fields 431, slow heads 408).

Both kinds of request go through the SOCKS CONNECT path, so the same access
rules (``command connect``, ``protocol http``), outbound connectors, routes
and resolver filter apply: a CONNECT is the connection itself as the
:class:`~twisted_socks5.commands.connect.ConnectHandler`'s context, its
replies mapped to HTTP statuses (:data:`HTTP_STATUS`), and its tunnel the
same :class:`~twisted_socks5.tunnel.Tunnel`, copying relay and splice path
as a SOCKS5 one.  A forwarded request is one more context
(``_Forward``) whose connected destination is handed to a
``twisted.web.client.Agent`` as its endpoint: one origin connection per
request (``Connection: close`` toward it), the client's connection kept
alive.

``Proxy-Authorization: Basic`` is checked by the server's username/password
:class:`~twisted_socks5.interfaces.IAuthenticator` (the ``twisted.cred``
checkers of ``--auth``), under the same login throttle and per-client cap
on concurrent checks as a SOCKS5 login (:mod:`twisted_socks5.admission`).
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from .bandwidth import DOWN, UP, Meter
from .codec import Address, Command, Method, ReplyCode, Request
from .commands import handler_for
from .connection import EARLY_DATA_PAUSE, SOCKS5ServerProtocol, State
from .handshake import MAX_EARLY_DATA
from .interfaces import AuthResult
from .limiting import within_limits
from .logs import escape_word
from .relay import OutboundProtocol, RelayCounters
from .udp import UDPAssociation
from .writenow import write_now

__all__ = ["HTTP_STATUS", "HTTPProxyConnection", "take_over"]

#: The longest request line (a longer one: 414).
MAX_REQUEST_LINE = 8192
#: The most header lines in a request, and bytes in its head (431 past them).
MAX_HEADERS = 100
MAX_HEAD = 32 * 1024
#: The largest request body (413): ``twisted.web`` receives a body whole
#: (into a temporary file past 100 kB) before the request is forwarded.
MAX_BODY = 100 * 1024 * 1024
#: The most bytes an origin may send before its response's head ends.
MAX_RESPONSE_HEAD = 64 * 1024
#: The most of a request's URI its log line shows.
MAX_LOGGED_URI = 512
#: Seconds an idle keep-alive connection waits for its next request.
KEEPALIVE_TIMEOUT = 60.0
#: What ``Via`` names this proxy (a pseudonym, RFC 9110 section 7.6.3).
VIA_NAME = b"twisted-socks5"
REALM = "twisted-socks5"

#: The one table from a SOCKS reply code to the HTTP status a client of
#: the HTTP proxy gets (CONNECT and forwarded requests alike).
HTTP_STATUS: Dict[ReplyCode, Tuple[int, bytes]] = {
    ReplyCode.SUCCEEDED: (200, b"Connection established"),
    ReplyCode.GENERAL_FAILURE: (502, b"Bad Gateway"),
    ReplyCode.CONNECTION_NOT_ALLOWED: (403, b"Forbidden"),
    ReplyCode.NETWORK_UNREACHABLE: (502, b"Bad Gateway"),
    ReplyCode.HOST_UNREACHABLE: (502, b"Bad Gateway"),
    ReplyCode.CONNECTION_REFUSED: (502, b"Bad Gateway"),
    ReplyCode.TTL_EXPIRED: (504, b"Gateway Timeout"),
    ReplyCode.COMMAND_NOT_SUPPORTED: (501, b"Not Implemented"),
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: (400, b"Bad Request"),
}

#: Hop-by-hop fields (RFC 9110 section 7.6.1), never passed on, with
#: those a proxy answers itself or recomputes (Host, Content-Length, Expect).
_HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    )
)
_RECOMPUTED = frozenset((b"host", b"content-length", b"expect"))

_NAME = re.compile(rb"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?")
_PORT = re.compile(rb"[0-9]{1,5}")


class BadTarget(ValueError):
    """A request target the proxy does not serve (answered 400)."""


def parse_authority(authority: bytes, default_port: Optional[int] = None) -> Address:
    """
    ``host:port`` (a name, an IPv4 address or ``[IPv6]``) as an
    :class:`Address`; :class:`BadTarget` for anything else (no user info,
    no zone, a port in 1-65535).
    """
    host: bytes
    port: Optional[bytes]
    if authority.startswith(b"["):
        end = authority.find(b"]")
        if end < 0:
            raise BadTarget("unclosed [")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(b":"):
            raise BadTarget("junk after ]")
        port = rest[1:] if rest else None
        if b"%" in host:
            raise BadTarget("a zone in an address")
        try:
            ip = ipaddress.IPv6Address(host.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise BadTarget("not an IPv6 address") from None
        text = str(ip)
    else:
        host, colon, after = authority.rpartition(b":")
        if not colon:
            host, port = authority, None
        else:
            port = after
        if not _NAME.fullmatch(host):
            raise BadTarget("not a host name or address")
        text = host.decode("ascii")
    if port is None:
        if default_port is None:
            raise BadTarget("no port")
        number = default_port
    else:
        if not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
            raise BadTarget("bad port")
        number = int(port)
    try:
        return Address.from_host(text, number)
    except ValueError:
        raise BadTarget("bad address") from None


def parse_absolute_uri(uri: bytes) -> Tuple[Address, bytes]:
    """
    An ``http://`` absolute URI: the origin's address and the origin-form
    target (path and query) to send it.  ``https://`` is refused too:
    clients reach TLS origins through CONNECT.
    """
    scheme, sep, rest = uri.partition(b"://")
    if not sep or scheme.lower() != b"http":
        raise BadTarget("not an http:// absolute URI")
    cut = len(rest)
    for stop in (b"/", b"?", b"#"):
        at = rest.find(stop)
        if 0 <= at < cut:
            cut = at
    authority, path = rest[:cut], rest[cut:]
    if b"@" in authority:
        raise BadTarget("user info in the URI")
    path = path.split(b"#", 1)[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    if any(c <= 0x20 or c >= 0x7F for c in path):
        raise BadTarget("bad characters in the path")
    return parse_authority(authority, 80), path


def basic_credentials(value: bytes) -> Optional[Tuple[bytes, bytes]]:
    """``Basic base64(user:password)`` as (user, password); ``None`` if not."""
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    if not colon:
        return None
    return user, password


def _userpass_message(user: bytes, password: bytes) -> Optional[bytes]:
    """The RFC 1929 request the username/password method checks."""
    if len(user) > 255 or len(password) > 255:
        return None
    return bytes((1, len(user))) + user + bytes((len(password),)) + password


def _reason(code: int) -> bytes:
    return http.RESPONSES.get(code, b"Error")


def _status_text(status: int, why: str) -> str:
    return f"{status} {_reason(status).decode()}: {why}"


# ----------------------------------------------------------------------
# The client side: twisted.web's channel, bounded


#: The versions a client may speak to the proxy.
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


class _ProxyRequest(http.Request):
    """One request on the channel; the connection handles it."""

    channel: _Channel
    #: The client went away (``http.Request`` keeps that private).
    gone = False
    body_size = 0
    #: Its credentials are checked before its body is read (see
    #: :meth:`HTTPProxyConnection.check_before_body`).
    early_check = False

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        super().connectionLost(reason)

    def handleContentChunk(self, data: bytes) -> None:
        self.body_size += len(data)
        if self.body_size > MAX_BODY:
            self.channel.refuse(413, "request body too large")
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # Not http.Request's: a proxy parses no query and no form.
        if self.content is not None:
            self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri, self.path = command, path, path
        if version not in _VERSIONS:
            # Answered in HTTP/1.1 whatever it claimed (Twisted before 24
            # would echo "HTTP/2" or anything else in the status line).
            self.clientproto = b"HTTP/1.1"
            self.channel.refuse(505, f"HTTP version {version[:16]!r} not supported")
            return
        self.clientproto = version
        self.process()

    def process(self) -> None:
        self.channel.proxy.http_request(self)


class _Channel(http.HTTPChannel):
    """
    ``HTTPChannel`` with bounds that answer as RFC 9110 says (414, 431)
    rather than a bare 400 or close, and no idle timeout of its own: the
    connection times heads and idle keep-alives (:class:`HTTPProxyConnection`).
    """

    requestFactory = _ProxyRequest
    MAX_LENGTH = MAX_REQUEST_LINE
    maxHeaders = MAX_HEADERS
    totalHeadersSize = MAX_HEAD
    timeOut = None

    def __init__(self, proxy: HTTPProxyConnection) -> None:
        super().__init__()
        self.proxy = proxy
        #: Lines and bytes of the head being read (0: none begun).
        self.head_lines = 0
        self.head_bytes = 0
        #: A CONNECT's head is in: what follows is for its tunnel.
        self.tunneling = False
        #: A body's bytes held while its request's credentials are checked.
        self.held: Optional[List[bytes]] = None
        self.held_size = 0

    def callLater(self, delay: float, f: Any, *a: Any) -> Any:  # type: ignore[override]
        return self.proxy.factory.reactor.callLater(delay, f, *a)

    def dataReceived(self, data: bytes) -> None:
        if self.tunneling:
            self.proxy.early_data(data)
            return
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not line and not self.head_lines:
            super().lineReceived(line)  # a stray CRLF before a request
            return
        self.proxy.head_begun()
        self.head_bytes += len(line) + 2
        if not self.head_lines and len(line) > MAX_REQUEST_LINE:
            self.refuse(414, "request line too long")
            return
        if self.head_bytes > MAX_HEAD or self.head_lines > MAX_HEADERS:
            self.refuse(431, "request header fields too large")
            return
        if line:
            self.head_lines += 1
        else:
            self.head_lines = self.head_bytes = 0
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.head_lines:
            self.refuse(431, "request header field too long")
        else:
            self.refuse(414, "request line too long")

    def rawDataReceived(self, data: bytes) -> None:
        if self.tunneling:
            self.proxy.early_data(data)
            return
        self.proxy.body_data()
        held = self.held
        if held is not None:
            held.append(data)
            self.held_size += len(data)
            if self.held_size > EARLY_DATA_PAUSE:
                self.proxy.transport.pauseProducing()
            return
        super().rawDataReceived(data)

    def release_body(self) -> None:
        """The credentials are good: read the body held meanwhile, and on."""
        held, self.held = self.held, None
        if held is None:
            return
        if self.held_size > EARLY_DATA_PAUSE:
            self.proxy.transport.resumeProducing()
        self.held_size = 0
        data = b"".join(held)
        if data:
            self.rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        if self.length is not None and self.length > MAX_BODY:
            # Before twisted.web answers an Expect: 100-continue.
            self.refuse(413, "request body too large")
            return
        super().allHeadersReceived()
        self.proxy.head_ended()
        if self.length != 0:  # a body follows: read only once authorized
            request = self.requests[-1]
            # What requestReceived sets, for an answer before it.
            request.method, request.uri = self._command, self._path
            request.path, request.clientproto = self._path, self._version
            self.proxy.check_before_body(request)

    def requestDone(self, request: Any) -> None:
        self.proxy.request_done(request, bool(self.persistent))
        super().requestDone(request)

    def refuse(self, code: int, why: str) -> None:
        """Answer ``code`` with nothing more read, and close."""
        self.proxy.refuse_request(code, why)

    def loseConnection(self) -> None:
        # Also twisted.web's own 400 for a malformed request: nothing more
        # is read once the channel closes.
        self.proxy.channel_closing()
        super().loseConnection()


# ----------------------------------------------------------------------
# The connection


class HTTPProxyConnection(SOCKS5ServerProtocol):
    """
    A client connection that speaks HTTP to the proxy.  It is the same
    object the front accepted (see :func:`take_over`), so the admission,
    limits, metrics and connection log treat it as any other; what differs
    is how it reads requests and words its replies.
    """

    protocol = "http"
    channel: Optional[_Channel]
    #: The request being answered.
    current: Optional[_ProxyRequest]
    #: ``idle``, ``head`` (the handshake timeout runs), ``body``, ``busy``.
    phase: str
    #: The Proxy-Authorization value that was accepted on this connection.
    accepted: Optional[bytes]
    #: A request waiting for its client's other credential checks to end.
    parked_request: Optional[_ProxyRequest]
    requests: int
    #: The status of the last answer (for the log).
    last_status: int
    #: The forwarded request being answered, while it holds its limits.
    forward: Optional[_Forward] = None

    # ------------------------------------------------------------------
    # Input

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is State.RELAYING:
            SOCKS5ServerProtocol.dataReceived(self, data)
        elif state is State.CONNECTING:
            self.early_data(data)
        elif state is not State.CLOSING and self.channel is not None:
            self.channel.dataReceived(data)

    def early_data(self, data: bytes) -> None:
        """Bytes after a CONNECT's head: for the destination, once connected."""
        if self.state is State.CLOSING:
            return
        buffer = self._buffer
        if len(buffer) + len(data) > MAX_EARLY_DATA:
            self._abort("client sent too much ahead of the tunnel")
            return
        buffer += data
        if len(buffer) >= EARLY_DATA_PAUSE:
            self.transport.pauseProducing()

    def readConnectionLost(self) -> None:
        if self.state in (State.CONNECTING, State.RELAYING, State.CLOSING):
            SOCKS5ServerProtocol.readConnectionLost(self)
            return
        self._client_eof = True
        channel = self.channel
        if self.phase in ("busy", "body") and channel is not None:
            channel.persistent = False  # answer, then close
            if self.phase == "body":
                self.outcome = "client closed during a request body"
                self.close()
            return
        if self.phase == "head":
            self.outcome = "client closed during a request head"
        self.close()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        channel, self.channel = self.channel, None
        if channel is not None:
            channel.connectionLost(reason)
        SOCKS5ServerProtocol.connectionLost(self, reason)

    def timeoutConnection(self) -> None:
        if self.phase == "idle":
            self.outcome = self.done_outcome("keep-alive idle timeout")
            self.close()
            return
        self.refuse_request(408, f"request {self.phase} timeout")

    def _process(self) -> None:
        """No SOCKS handshake runs on this connection."""

    # ------------------------------------------------------------------
    # The phases of a request (and their timeouts)

    def head_begun(self) -> None:
        if self.phase == "idle":
            self.phase = "head"
            self._why = "request head incomplete"
            self.setTimeout(self.factory.handshake_timeout)

    def head_ended(self) -> None:
        self.phase = "body"
        self.setTimeout(self.factory.handshake_timeout)

    def body_data(self) -> None:
        if self.phase == "body":
            self.resetTimeout()

    def request_done(self, request: _ProxyRequest, persistent: bool) -> None:
        """An answer is complete: wait for the next request, or close."""
        self.log_request(request)
        self.current = None
        self.phase = "idle"
        if self.closing:
            return
        if not persistent:  # the channel closes after what is queued
            self.state = State.CLOSING
            self.setTimeout(None)
            return
        self.state = State.REQUEST
        self.setTimeout(KEEPALIVE_TIMEOUT)

    def log_request(self, request: _ProxyRequest) -> None:
        """
        One line per answered request (``http.request``): a kept-alive
        connection's log line names only its last one.
        """
        client = escape_word(self.client) if self.client else "-"
        user = escape_word(self.user) if self.user is not None else "-"
        method = escape_word(request.method.decode("latin-1"))
        uri = request.uri[:MAX_LOGGED_URI].decode("latin-1")
        target = escape_word(uri + ("..." if len(request.uri) > MAX_LOGGED_URI else ""))
        status = self.last_status
        self.log.info(
            "{summary}",
            event="http.request",
            summary=f"{client} {user} {method} {target} -> {status}",
            client=client,
            user=user,
            method=method,
            uri=target,
            status=status,
        )

    def channel_closing(self) -> None:
        """The channel closes the connection (after a 400, say)."""
        if not self.closing:
            self.state = State.CLOSING
            self.setTimeout(None)

    def done_outcome(self, what: str) -> str:
        """The log's text after requests answered on this connection."""
        return f"{what}: {self.requests} request(s), last {self.last_status}"

    # ------------------------------------------------------------------
    # Answers

    def respond(
        self,
        request: _ProxyRequest,
        code: int,
        text: str,
        close: bool = False,
        headers: Optional[Dict[bytes, bytes]] = None,
    ) -> None:
        """A short plain-text answer of the proxy's own to ``request``."""
        if request.finished or request.gone:
            return
        self.last_status = code
        body = (text + "\n").encode("utf-8")
        request.setResponseCode(code, _reason(code))
        request.responseHeaders = Headers()
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        for name, value in (headers or {}).items():
            request.setHeader(name, value)
        if close or request.early_check:  # (its body was not read)
            request.setHeader(b"connection", b"close")
            if request.channel is not None:
                request.channel.persistent = False
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def refuse_request(self, code: int, why: str) -> None:
        """Answer ``code`` to a request not read whole, and close."""
        if self.closing:
            return
        self.outcome = why
        head = b"HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
        write_now(self.transport, head % (code, _reason(code)))
        self.close()

    # What the CONNECT handler calls (commands.base.RequestContext)

    def send_reply(self, code: ReplyCode, address: Optional[Address] = None) -> None:
        first = self.reply is None
        self.reply = code
        if first and self.factory.metrics is not None:
            self.factory.metrics.replied(self)
        if code is not ReplyCode.SUCCEEDED:
            return  # fail() words it
        request, channel = self.current, self.channel
        self.current = self.channel = None
        self.last_status = 200
        self.outcome = "tunnel established"
        if channel is not None:
            # The tunnel's relays register their own producers.
            self.transport.unregisterProducer()
        version = (
            b"HTTP/1.0"
            if request and request.clientproto == b"HTTP/1.0"
            else b"HTTP/1.1"
        )
        write_now(self.transport, version + b" 200 Connection established\r\n\r\n")

    def fail(self, code: ReplyCode, outcome: str) -> None:
        self.send_reply(code)
        self.outcome = outcome
        status, _ = HTTP_STATUS.get(code, (502, b""))
        request = self.current
        if request is None:
            self.close()
            return
        # The client learns what a SOCKS client would: the reply's meaning,
        # not the rule's text nor the error's (they are in the log).
        self.respond(request, status, _status_text(status, code.phrase), close=True)

    def unwait(self, result: Any) -> Any:
        parked = self.parked_request
        if parked is not None:
            # A credential check of the same client ended: ours may start.
            self.parked_request = None
            self._waiting = False
            if not self.closing:
                self.authorize(parked)
            return result
        return SOCKS5ServerProtocol.unwait(self, result)

    # ------------------------------------------------------------------
    # A request

    def http_request(self, request: _ProxyRequest) -> None:
        """A request's head and body are in: authorize it, then serve it."""
        if self.closing:  # refused meanwhile (a body too large)
            return
        self.setTimeout(None)
        self.phase = "busy"
        self.current = request
        self.requests += 1
        if request.method == b"CONNECT":
            # What follows the head belongs to the tunnel.
            self.state = State.CONNECTING
            if self.channel is not None:
                self.channel.tunneling = True
        self.authorize(request)

    def _methods(self) -> Tuple[Any, bool]:
        """The username/password authenticator (or None), and whether anonymous."""
        checker = None
        anonymous = False
        factory: Any = self.factory
        for authenticator in factory.authenticators:
            if authenticator.method == Method.USERNAME_PASSWORD and checker is None:
                checker = authenticator
            elif authenticator.method == Method.NO_AUTHENTICATION:
                anonymous = True
        return checker, anonymous

    def check_before_body(self, request: _ProxyRequest) -> None:
        """
        A request whose body follows, on a server that wants a password:
        its credentials are checked first, its body held meanwhile, so that
        no client without them has a body stored (up to ``MAX_BODY``).
        """
        checker, anonymous = self._methods()
        value = request.getHeader(b"proxy-authorization")
        if anonymous or checker is None or self.channel is None:
            return
        if value is not None and value == self.accepted:
            return
        request.early_check = True
        self.channel.held = []
        self.authorize(request)

    def authorize(self, request: _ProxyRequest) -> None:
        """Serve ``request`` once its Proxy-Authorization is checked."""
        checker, anonymous = self._methods()
        value = request.getHeader(b"proxy-authorization")
        if value is None or checker is None:
            if anonymous:
                self.serve(request)
                return
            self._ask_credentials(request, "no credentials", close=False)
            return
        if value == self.accepted:
            self.serve(request)
            return
        credentials = basic_credentials(value)
        message = _userpass_message(*credentials) if credentials else None
        limits = self.factory.limits
        ip = self.client_ip
        if not limits.may_check(ip):
            self.hold()
            self.parked_request = request
            self.factory.admission.wait_for_check(self)
            return
        if limits.throttled(ip):
            self._throttled(request)
            return
        self.method = Method.USERNAME_PASSWORD
        if message is None:
            self._failed_login(request, "malformed Proxy-Authorization")
            return
        step = checker.negotiate(self.transport.getPeer()).data_received(message)
        result = step.result if step is not None else None
        if not isinstance(result, defer.Deferred):
            self._checked(result, request, value)
            return
        self.hold()
        self.checking = result
        limits.check_started(ip)
        result.addBoth(self._check_ended)
        result.addCallbacks(
            self._checked,
            self._check_error,
            callbackArgs=(request, value),
            errbackArgs=(request,),
        )

    def _check_ended(self, result: Any) -> Any:
        self.checking = None
        self._waiting = False
        self.factory.admission.check_ended(self.client_ip)
        return result

    def _check_error(self, failure: Failure, request: _ProxyRequest) -> None:
        if self.closing or self.transport.disconnected:
            return
        self.log.failure("authenticator failed", failure)
        self._failed_login(request, "authenticator error")

    def _checked(
        self, result: Optional[AuthResult], request: _ProxyRequest, value: bytes
    ) -> None:
        if self.closing or self.transport.disconnected:
            return
        if result is not None and result.user is not None:
            self.user = result.user
        if result is None or not (result.done and result.success is True):
            if result is not None and result.busy:
                self.outcome = "login refused: busy, too many checks waiting"
                self.factory.admission.login_busy(self)
                self.respond(request, 503, "credential checks are busy", close=True)
                return
            self._failed_login(request, "authentication failed")
            return
        if self.factory.limits.throttled(self.client_ip):
            self._throttled(request)
            return
        self.accepted = value
        # The password files' users: fingerprinted for revocation.
        credentials = getattr(self.factory, "credentials", None)
        if credentials is not None and self.user is not None:
            self.credential = credentials.fingerprint(self.user)
        self.serve(request)

    def _failed_login(self, request: _ProxyRequest, why: str) -> None:
        self.factory.admission.authentication_failed(self)
        self._ask_credentials(request, why, close=True)

    def _throttled(self, request: _ProxyRequest) -> None:
        self.factory.admission.login_throttled(self)
        self._ask_credentials(
            request, "login refused: too many failed logins", close=True
        )

    def _ask_credentials(self, request: _ProxyRequest, why: str, close: bool) -> None:
        self.outcome = why
        challenge = f'Basic realm="{REALM}", charset="UTF-8"'.encode()
        # After a CONNECT's head may come tunnel bytes, not a request.
        close = close or request.method == b"CONNECT"
        self.respond(
            request,
            407,
            "proxy authentication required",
            close=close,
            headers={b"proxy-authenticate": challenge},
        )

    def serve(self, request: _ProxyRequest) -> None:
        """An authorized request: a tunnel, or a request forwarded."""
        if request.early_check:  # authorized before its body: read it now
            request.early_check = False
            if self.channel is not None:
                self.channel.release_body()
            return
        try:
            if request.method == b"CONNECT":
                address = parse_authority(request.uri)
            else:
                address, path = parse_absolute_uri(request.uri)
        except BadTarget as e:
            self.outcome = f"bad request target: {e}"
            self.respond(request, 400, f"bad request target: {e}", close=True)
            return
        socks = self.request = Request(Command.CONNECT, address)
        if request.method == b"CONNECT":
            handler = handler_for(self, socks)
            if handler is not None:
                within_limits(self, socks, handler, lambda: handler.handle(self, socks))
            return
        _Forward(self, request, socks, path).start()


def take_over(connection: SOCKS5ServerProtocol, data: bytes) -> None:
    """
    Make an admitted client connection, whose first bytes ``data`` are not
    SOCKS, an HTTP proxy connection.  The front's protocol object becomes an
    :class:`HTTPProxyConnection` in place (its class changes, nothing is
    copied): its transport, its place in the factory's accounting and its
    log event stay the same, and its later input reaches the HTTP parser
    whatever wraps the transport (TLS, a PROXY header).
    """
    connection.__class__ = HTTPProxyConnection
    proxy: HTTPProxyConnection = connection  # type: ignore[assignment]
    proxy.protocol = "http"
    proxy.state = State.REQUEST
    proxy.phase = "idle"
    proxy.current = None
    proxy.accepted = None
    proxy.parked_request = None
    proxy.requests = 0
    proxy.last_status = 0
    channel = proxy.channel = _Channel(proxy)
    channel.makeConnection(connection.transport)
    proxy.head_begun()
    # The head's deadline runs from accept, as a SOCKS handshake's does.
    proxy.setTimeout(
        max(
            0.0,
            proxy.started
            + proxy.factory.handshake_timeout
            - proxy.factory.reactor.seconds(),
        )
        or 0.001
    )
    channel.dataReceived(data)


# ----------------------------------------------------------------------
# Forwarding: one origin connection per request


class _Refused(Exception):
    """The CONNECT path answered a failure code."""

    def __init__(self, code: ReplyCode, outcome: str) -> None:
        super().__init__(outcome)
        self.code = code


class _OriginLink(OutboundProtocol):
    """
    The origin connection, made by the connector as a tunnel's would be;
    once connected it carries the Agent's HTTP client protocol.
    """

    app: Any = None
    head_done = False
    received = 0
    #: The response's bytes until its head is read (bounded): the Agent
    #: keeps its ``Connection`` field to itself, whose names are hop-by-hop.
    head: bytes = b""
    #: The forwarded request it answers (its bandwidth meter, if any).
    forward: Optional[_Forward] = None

    def attach(self, app: Any, counters: RelayCounters) -> None:
        self.app = app
        self.counters = counters  # also: relaying, keep reading
        app.makeConnection(self.transport)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.counters.bytes_down += len(data)  # type: ignore[union-attr]
        self.received += len(data)
        forward = self.forward
        meter = None if forward is None else forward.meter
        if not self.head_done:
            self.head += data
        self.app.dataReceived(data)
        if meter is not None:
            # Booked once delivered: the chunk that starts the body has fed
            # the meter its producer (and the Agent resumed it) by now.
            meter.moved(DOWN, len(data))
        if not self.head_done and self.received > MAX_RESPONSE_HEAD:
            self.transport.abortConnection()

    def readConnectionLost(self) -> None:
        self.transport.loseConnection()

    def connection_tokens(self) -> frozenset[bytes]:
        """The names the response's ``Connection`` fields list."""
        lines = self.head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
        values = [
            line.partition(b":")[2]
            for line in lines
            if line.partition(b":")[0].strip().lower() == b"connection"
        ]
        return _tokens(values)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        if self.app is not None:
            self.app.connectionLost(reason)


class _OriginFactory(Factory):
    noisy = False
    protocol = _OriginLink
    fast_connect = True


_ORIGIN_FACTORY = _OriginFactory()


@implementer(IStreamClientEndpoint)
class _Endpoint:
    """The Agent's endpoint: the CONNECT path, for this request only."""

    def __init__(self, forward: _Forward) -> None:
        self.forward = forward

    def connect(self, protocolFactory: Any) -> defer.Deferred[Any]:
        return self.forward.connect(protocolFactory)

    def endpointForURI(self, uri: Any) -> _Endpoint:
        return self


class _Forward:
    """
    One forwarded request, as the CONNECT handler's context
    (:class:`~twisted_socks5.commands.base.RequestContext`): the facts are
    the connection's, the outcome is an origin connection for the Agent.
    """

    outbound_factory = _ORIGIN_FACTORY
    protocol = "http"
    udp: Optional[UDPAssociation] = None
    udp_counted = False
    #: What it holds in the rules' limits (see ``limiting.Held``).
    limited: Any = None
    binding: Any = None
    peer: Optional[Address] = None
    request: Optional[Request]
    #: The request body's bytes (sent to the origin once connected).
    body_size = 0
    #: The request body's producer, if it has one.
    body: Optional[_MeteredBody] = None
    _meter: Optional[Meter] = None

    def __init__(
        self,
        connection: HTTPProxyConnection,
        request: _ProxyRequest,
        socks: Request,
        path: bytes,
    ) -> None:
        self.connection = connection
        self.http = request
        self.request = self.socks = socks
        self.user = connection.user
        self.client_ip = connection.client_ip
        self.path = path
        self.factory = connection.factory
        self.transport = connection.transport
        self.behind_proxy = connection.behind_proxy
        self.counters = connection.counters
        self.decision: Any = None
        self.connected: Optional[defer.Deferred[Any]] = None
        self.app_factory: Any = None
        self.link: Optional[_OriginLink] = None

    # The connection's facts
    @property
    def log(self) -> Logger:
        return self.connection.log

    @property
    def policy_ip(self) -> str:
        return self.connection.policy_ip

    @property
    def closing(self) -> bool:
        return self.connection.closing

    @property
    def rule(self) -> Optional[str]:
        return self.connection.rule

    @rule.setter
    def rule(self, rule: Optional[str]) -> None:
        self.connection.rule = rule

    @property
    def bound(self) -> Optional[Address]:
        return self.connection.bound

    @bound.setter
    def bound(self, bound: Optional[Address]) -> None:
        self.connection.bound = bound

    @property
    def resolved(self) -> Optional[Address]:
        return self.connection.resolved

    @resolved.setter
    def resolved(self, address: Optional[Address]) -> None:
        self.connection.resolved = address

    @property
    def outgoing(self) -> Optional[str]:
        return self.connection.outgoing

    @outgoing.setter
    def outgoing(self, source: Optional[str]) -> None:
        self.connection.outgoing = source

    @property
    def pending(self) -> Optional[defer.Deferred[Any]]:
        return self.connection.pending

    @pending.setter
    def pending(self, d: Optional[defer.Deferred[Any]]) -> None:
        self.connection.pending = d

    @property
    def reply(self) -> Optional[ReplyCode]:
        return self.connection.reply

    @property
    def reactor(self) -> Any:
        return self.factory.reactor

    @property
    def settings(self) -> Any:
        """Where ``bandwidth.update`` finds the limiter's store, as a tunnel's."""
        return self.factory

    @property
    def tunnel(self) -> Optional[_Forward]:
        """What the limiter's bandwidth applies to: itself, once connected."""
        return self if self.link is not None else None

    @property
    def meter(self) -> Optional[Meter]:
        """Its bandwidth meter (``bandwidth.throttle`` sets it), if a line applies."""
        return self._meter

    @meter.setter
    def meter(self, meter: Optional[Meter]) -> None:
        self._meter = meter
        link = self.link
        if meter is None or link is None:
            return
        if self.body is not None:  # registered with the origin transport
            meter.feed(UP, self.body, link.transport)
        producer = self.http.producer  # the response body, once it flows
        if producer is not None:
            meter.feed(DOWN, producer, self.http)

    @property
    def outcome(self) -> str:
        return self.connection.outcome

    @outcome.setter
    def outcome(self, text: str) -> None:
        self.connection.outcome = text

    # The handler's steps
    def hold(self) -> None:
        """The channel holds back pipelined requests already."""

    def wait(self) -> None:  # pragma: no cover - CONNECT does not wait
        pass

    def unwait(self, result: Any) -> Any:  # pragma: no cover
        return result

    def associated(self) -> None:  # pragma: no cover - not a UDP ASSOCIATE
        raise NotImplementedError

    def send_reply(self, code: ReplyCode, address: Optional[Address] = None) -> None:
        connection = self.connection
        first = connection.reply is None
        connection.reply = code
        if first and connection.factory.metrics is not None:
            connection.factory.metrics.replied(connection)

    def fail(self, code: ReplyCode, outcome: str) -> None:
        self.send_reply(code)
        d, self.connected = self.connected, None
        if d is not None:
            d.errback(_Refused(code, outcome))

    def deny(self, rule: str) -> None:
        self.rule = rule
        self.fail(ReplyCode.CONNECTION_NOT_ALLOWED, f"denied by {rule}")

    def start_tunnel(self, peer: OutboundProtocol) -> None:
        d, self.connected = self.connected, None
        if not isinstance(peer, _OriginLink) or d is None:  # pragma: no cover
            peer.transport.abortConnection()
            return
        self.link = peer
        peer.forward = self
        # Counted once admitted: the quotas reckon from the bytes before.
        self.counters.bytes_up += self.body_size
        app = self.app_factory.buildProtocol(None)
        peer.attach(app, self.counters)
        if self.limited is not None:  # its bandwidth lines, before any byte
            self.factory.limiter.tunnel_started(self, self)
        d.callback(app)

    # ------------------------------------------------------------------

    def connect(self, app_factory: Any) -> defer.Deferred[Any]:
        """The Agent asks for its connection: the rules, then the connector."""
        self.app_factory = app_factory

        def cancel(d: defer.Deferred[Any]) -> None:
            pending = self.connection.pending
            if pending is not None:
                self.connection.pending = None
                pending.cancel()

        d = self.connected = defer.Deferred(cancel)
        handler = handler_for(self, self.socks)
        if handler is not None:
            socks = self.socks
            # Its session, and its bytes for the quotas, end with it (also
            # when a remote store admits it later than this call).
            self.http.notifyFinish().addBoth(self._limits_done)
            self.connection.forward = self  # for a reload of the rules
            within_limits(self, socks, handler, lambda: handler.handle(self, socks))
        return d

    def _limits_done(self, result: Any) -> None:
        if self.connection.forward is self:
            self.connection.forward = None
        meter, self._meter = self._meter, None
        if meter is not None:
            meter.stop()
        limiter = self.factory.limiter
        if limiter is not None:
            limiter.closed(self)

    def start(self) -> None:
        request = self.http
        connection = self.connection
        headers = _forwarded_headers(request.requestHeaders, request.clientproto)
        body = None
        content = request.content
        if content is not None and (  # a body was sent (maybe empty)
            request.requestHeaders.hasHeader(b"content-length")
            or request.requestHeaders.hasHeader(b"transfer-encoding")
        ):
            self.body_size = content.seek(0, 2)
            content.seek(0, 0)
            body = self.body = _MeteredBody(content, self)
        reactor = connection.factory.reactor
        agent = Agent.usingEndpointFactory(
            reactor, _Endpoint(self), pool=HTTPConnectionPool(reactor, persistent=False)
        )
        address = self.socks.address
        host = f"[{address.host}]" if ":" in address.host else address.host
        url = b"http://%s:%d%s" % (host.encode("ascii"), address.port, self.path)
        try:
            d = agent.request(request.method, url, headers, body)
        except ValueError as e:
            connection.outcome = f"bad request: {e}"
            connection.respond(request, 400, "bad request", close=True)
            return
        request.notifyFinish().addErrback(self._client_gone, d)
        d.addCallbacks(self._response, self._failed)

    def _client_gone(self, reason: Failure, d: defer.Deferred[Any]) -> None:
        """The client left: no origin connection is kept for it."""
        d.cancel()
        link = self.link
        if link is not None and link.transport is not None:
            link.transport.abortConnection()

    def _response(self, response: Any) -> None:
        link = self.link
        drop: frozenset[bytes] = frozenset()
        if link is not None:
            link.head_done = True
            drop, link.head = link.connection_tokens(), b""
        request = self.http
        if request.finished or request.gone:
            return
        connection = self.connection
        connection.last_status = response.code
        connection.outcome = connection.done_outcome("forwarded")
        request.setResponseCode(response.code, response.phrase)
        out = request.responseHeaders
        out.removeHeader(b"content-length")
        for name, values in response.headers.getAllRawHeaders():
            lower = name.lower()
            if lower in _HOP_BY_HOP or lower in drop:
                continue
            out.setRawHeaders(name, values)
        length = response.length
        if isinstance(length, int) and request.method != b"HEAD":
            out.setRawHeaders(b"content-length", [b"%d" % length])
        major, minor = response.version[1], response.version[2]
        out.addRawHeader(b"via", b"%d.%d %s" % (major, minor, VIA_NAME))
        response.deliverBody(_BodyWriter(request, connection, self))

    def _failed(self, failure: Failure) -> None:
        request = self.http
        connection = self.connection
        if failure.check(defer.CancelledError) or request.gone:
            return
        if failure.check(_Refused):
            code = failure.value.code  # type: ignore[union-attr]
            status = HTTP_STATUS.get(code, (502, b""))[0]
            why, told = str(failure.value), code.phrase
        else:
            status = 502
            why = f"origin failed: {failure.getErrorMessage()}"
            told = "no valid answer from the origin"
            if connection.reply is None or connection.reply is ReplyCode.SUCCEEDED:
                connection.reply = ReplyCode.GENERAL_FAILURE
        connection.outcome = why
        connection.respond(request, status, _status_text(status, told))


def _tokens(values: Any) -> frozenset[bytes]:
    """The field names ``Connection`` values list (hop-by-hop too)."""
    return frozenset(
        token.strip().lower() for value in values for token in value.split(b",")
    )


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    return _tokens(headers.getRawHeaders(b"connection", []))


def _forwarded_headers(incoming: Headers, version: bytes) -> Headers:
    """
    The request's fields for the origin: hop-by-hop ones (and those the
    ``Connection`` header lists) removed, Proxy-Authorization never passed
    on, Host and Content-Length left to the Agent, ``Via`` added.
    """
    drop = _connection_tokens(incoming)
    headers = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in _HOP_BY_HOP or lower in _RECOMPUTED or lower in drop:
            continue
        headers.setRawHeaders(name, values)
    received = version.partition(b"/")[2] or b"1.1"
    headers.addRawHeader(b"via", received + b" " + VIA_NAME)
    return headers


class _MeteredBody(FileBodyProducer):
    """
    The request body (read whole into a file before it is forwarded), its
    writes booked against the forward's upload buckets: the meter pauses
    it (as it pauses a relay's transport) while they are in debt.
    """

    def __init__(self, content: Any, forward: Any, cooperator: Any = None) -> None:
        if cooperator is None:
            super().__init__(content)
        else:  # tests: one driven by a clock
            super().__init__(content, cooperator)
        self.forward = forward

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        done: defer.Deferred[None] = super().startProducing(
            _Booked(consumer, self.forward)
        )
        return done


class _Booked:
    """A body's consumer that books what is written to it."""

    def __init__(self, consumer: Any, forward: Any) -> None:
        self.consumer = consumer
        self.forward = forward

    def write(self, data: bytes) -> None:
        self.consumer.write(data)
        meter = self.forward.meter
        if meter is not None:
            meter.moved(UP, len(data))


class _BodyWriter(Protocol):
    """The origin's body, to the client, at the client's pace."""

    def __init__(
        self, request: _ProxyRequest, connection: HTTPProxyConnection, forward: _Forward
    ) -> None:
        self.request = request
        self.connection = connection
        self.forward = forward

    def connectionMade(self) -> None:
        request = self.request
        if not request.finished and not request.gone:
            request.registerProducer(self.transport, True)
            meter = self.forward.meter
            if meter is not None:  # the bandwidth holds the origin's reads
                meter.feed(DOWN, self.transport, request)

    def dataReceived(self, data: bytes) -> None:
        if not self.request.gone:
            self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        request = self.request
        if request.gone or request.finished:
            return
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        # Cut short: the client must see a truncated answer, not a whole one.
        self.connection.outcome = (
            f"origin response cut short: {reason.getErrorMessage()}"
        )
        self.connection.transport.abortConnection()
