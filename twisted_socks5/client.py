"""
A SOCKS5 client endpoint: reach a host through a SOCKS5 proxy (RFC 1928),
with no authentication or username/password (RFC 1929)::

    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted_socks5.client import SOCKS5ClientEndpoint

    proxy = TCP4ClientEndpoint(reactor, "127.0.0.1", 1080)
    endpoint = SOCKS5ClientEndpoint(proxy, "example.com", 80, timeout=30)
    protocol = await endpoint.connect(factory)

The proxy is reached through any ``IStreamClientEndpoint`` (TCP, TLS, a UNIX
socket, another ``SOCKS5ClientEndpoint`` for a chain).  Host names are sent to
the proxy as DOMAINNAME, so the proxy resolves them and nothing leaks to the
local DNS, unless a ``resolver`` is given.

The handshake is :class:`twisted_socks5.handshake.ClientHandshake` (sans-IO,
its transition table documented there); this protocol feeds it and acts on
its events.  Every message goes through :mod:`twisted_socks5.codec`.  Once
connected, the application protocol gets a :class:`SOCKS5Transport`: the
proxy connection itself (writes, producers and half-close pass straight
through), plus the reply's BND address as ``transport.bound``.  Bytes that
arrived with the reply are delivered to the application right after
``connect()`` fires.

A server's failure reply raises the :class:`SOCKS5ReplyError` subclass for its
REP code (``ConnectionRefused`` for 0x05, ...; see :data:`REPLY_ERRORS`);
every error the handshake can end with is a :class:`SOCKS5Error`, which is a
``twisted.internet.error.ConnectError``.  They are defined in
:mod:`twisted_socks5.replies` and importable from here.
"""

from __future__ import annotations

from typing import (
    Any,
    Callable,
    Dict,
    List,
    Optional,
    Tuple,
    TypeVar,
    Union,
)

from twisted.internet import defer
from twisted.internet.address import HostnameAddress, IPv4Address, IPv6Address
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.error import (
    ConnectionDone,
    DNSLookupError,
    NoProtocol,
)
from twisted.internet.interfaces import (
    IAddress,
    IHalfCloseableProtocol,
    IHostnameResolver,
    IHostResolution,
    IOpenSSLClientConnectionCreator,
    IProtocol,
    IProtocolFactory,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy

from .clienttls import TrustRoot, client_tls
from .codec import (
    Address,
    AddressType,
    Command,
    Greeting,
    Method,
    Reply,
    Request,
    UserPassRequest,
)
from .handshake import (
    AuthAccepted,
    AuthRejected,
    AuthStarted,
    ClientHandshake,
    ClientState,
    Event,
    HandshakeError,
    MethodAccepted,
    NoMethod,
    RequestRejected,
)
from .replies import (
    REPLY_ERRORS,
    AddressTypeNotSupported,
    AuthenticationFailed,
    CommandNotSupported,
    ConnectionNotAllowed,
    ConnectionRefused,
    GeneralServerFailure,
    HandshakeTimeout,
    HostUnreachable,
    MalformedReply,
    NetworkUnreachable,
    NoAcceptableMethods,
    ProxyConnectionLost,
    SOCKS5Error,
    SOCKS5ReplyError,
    TTLExpired,
    reply_error,
)

# The error classes live in twisted_socks5.replies (beside the
# server's reply table); they are re-exported here, where clients import them.
__all__ = [
    "REPLY_ERRORS",
    "AddressTypeNotSupported",
    "AuthenticationFailed",
    "CommandNotSupported",
    "ConnectionNotAllowed",
    "ConnectionRefused",
    "GeneralServerFailure",
    "HandshakeTimeout",
    "HostUnreachable",
    "MalformedReply",
    "NetworkUnreachable",
    "NoAcceptableMethods",
    "ProxyConnectionLost",
    "SOCKS5ClientEndpoint",
    "SOCKS5ClientProtocol",
    "SOCKS5Error",
    "SOCKS5ReplyError",
    "SOCKS5Transport",
    "TTLExpired",
    "endpoint_from_description",
    "reply_error",
]

T = TypeVar("T")

#: The port a ``proxy_host=`` description uses when it names no port (IANA).
DEFAULT_PROXY_PORT = 1080


# --------------------------------------------------------------------------
# The application's transport


def _address_of(target: Address) -> IAddress:
    """The Twisted address for a SOCKS target (what ``getPeer()`` returns)."""
    if target.type is AddressType.IPV4:
        return IPv4Address("TCP", target.host, target.port)
    if target.type is AddressType.IPV6:
        return IPv6Address("TCP", target.host, target.port)
    return HostnameAddress(target.host.encode("utf-8"), target.port)


class SOCKS5Transport:
    """
    The transport an application protocol gets: the proxy connection, with
    everything passed through to it, except that ``getPeer()`` answers the
    target (as PySocks' ``getpeername()`` does) since that is the peer the
    application talks to.  ``getHost()`` stays the local end of the socket.

    :ivar target: the address requested, as sent to the proxy.
    :ivar bound: BND.ADDR/BND.PORT of the reply: the address the proxy
        connects to the target from.
    :ivar proxy_transport: the transport of the connection to the proxy.
    """

    def __init__(
        self,
        transport: Any,
        target: Address,
        bound: Address,
        on_resume: Callable[[], None],
    ) -> None:
        self.proxy_transport = transport
        self.target = target
        self.bound = bound
        #: True while the application has paused reading.
        self.paused = False
        #: True once the application closed: like a socket, it reads no more.
        self.closing = False
        self._on_resume = on_resume
        # Hot path: no __getattr__ per write.
        self.write = transport.write
        self.writeSequence = transport.writeSequence
        # Whatever the real transport provides (ITCPTransport, ISSLTransport...),
        # so interface checks on this wrapper answer as they would on it.
        directlyProvides(self, providedBy(transport))

    def __getattr__(self, name: str) -> Any:
        if name == "proxy_transport":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.proxy_transport, name)

    def getPeer(self) -> IAddress:
        return _address_of(self.target)

    def loseConnection(self) -> None:
        self.closing = True
        self.proxy_transport.loseConnection()

    def abortConnection(self) -> None:
        self.closing = True
        self.proxy_transport.abortConnection()

    def pauseProducing(self) -> None:
        self.paused = True
        self.proxy_transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.proxy_transport.resumeProducing()
        # Bytes that came with the reply were held while paused.
        self._on_resume()

    def __repr__(self) -> str:
        return f"<SOCKS5Transport to {self.target} via {self.proxy_transport!r}>"


# --------------------------------------------------------------------------
# The handshake protocol


@implementer(IHalfCloseableProtocol)
class SOCKS5ClientProtocol(Protocol):
    """
    Runs the handshake on the proxy connection, then relays between it and
    the application protocol.  Built by :class:`SOCKS5ClientEndpoint`.

    It always provides ``IHalfCloseableProtocol``: the proxy endpoint's own
    wrapper (``_WrappingProtocol`` for TCP) decides once, when it is built,
    whether to pass half-close on, long before the application protocol
    exists.  So EOF is handled here: during the handshake it fails it; once
    connected it reaches an application that can half-close, and closes the
    connection for one that cannot (what Twisted does without a proxy).
    """

    transport: Any

    def __init__(self, factory: _HandshakeFactory) -> None:
        self.factory = factory
        #: The sans-IO handshake (see :mod:`twisted_socks5.handshake`).
        self.handshake = ClientHandshake(
            factory.methods, factory.credentials, factory.request
        )
        self.app: Optional[IProtocol] = None
        self.tunnel: Optional[SOCKS5Transport] = None
        self._held: List[bytes] = []
        self._lost = False

    @property
    def state(self) -> ClientState:
        """Where the handshake stands."""
        return self.handshake.state

    def logPrefix(self) -> str:
        if self.app is not None:
            return f"SOCKS5 {self.app.__class__.__name__}"
        return "SOCKS5 handshake"

    # ------------------------------------------------------------------
    # Twisted callbacks

    def connectionMade(self) -> None:
        if self.factory.abandoned:
            # Cancelled while the proxy connection was being made.
            self.handshake.fail()
            self.transport.abortConnection()
            return
        self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        handshake = self.handshake
        state = handshake.state
        if state is ClientState.CONNECTED:
            self._deliver(data)
            return
        if state is ClientState.FAILED:
            return
        handshake.receive_data(data)
        try:
            while True:
                event = handshake.next_event()
                if event is None:
                    return
                error = self._on_event(event)
                if error is not None:
                    raise error
                if handshake.state is ClientState.CONNECTED:
                    self._connected(event.reply)  # type: ignore[attr-defined]
                    return
        except HandshakeError as e:
            self._fail(MalformedReply(str(e)))
        except SOCKS5Error as e:
            self._fail(e)

    def _on_event(self, event: Event) -> Optional[SOCKS5Error]:
        """Send what the event says to send; the error it stands for, if any."""
        kind = type(event)
        if kind is MethodAccepted or kind is AuthStarted or kind is AuthAccepted:
            self.transport.write(event.data)  # type: ignore[attr-defined]
        elif kind is NoMethod:
            return NoAcceptableMethods(self.factory.methods)
        elif kind is AuthRejected:
            return AuthenticationFailed(event.status)  # type: ignore[attr-defined]
        elif kind is RequestRejected:
            return reply_error(event.code)  # type: ignore[attr-defined]
        return None

    def readConnectionLost(self) -> None:
        """The proxy sent EOF."""
        state = self.handshake.state
        if state is ClientState.CONNECTED:
            self._flush(force=True)
            half_closeable = IHalfCloseableProtocol(self.app, None)
            if half_closeable is not None:
                half_closeable.readConnectionLost()
            else:
                self.transport.loseConnection()
        elif state is not ClientState.FAILED:
            self._fail(ProxyConnectionLost(Failure(ConnectionDone())))

    def writeConnectionLost(self) -> None:
        half_closeable = IHalfCloseableProtocol(self.app, None)
        if half_closeable is not None:
            half_closeable.writeConnectionLost()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self._lost = True
        state = self.handshake.state
        if state is ClientState.CONNECTED:
            self._flush(force=True)
            if self.app is not None:
                self.app.connectionLost(reason)
            return
        if state is not ClientState.FAILED:
            self.handshake.fail()
            self._errback(ProxyConnectionLost(reason))

    # ------------------------------------------------------------------
    # Connected

    def _connected(self, reply: Reply) -> None:
        buffer = self.handshake.buffer
        early = bytes(buffer)
        buffer.clear()
        target = self.factory.request.address
        try:
            app = self.factory.app_factory.buildProtocol(_address_of(target))
            if app is None:
                raise NoProtocol()
        except Exception:
            self._fail(Failure())
            return
        self.app = app
        self.tunnel = SOCKS5Transport(
            self.transport, target, reply.address, self._flush
        )
        try:
            app.makeConnection(self.tunnel)
        except Exception:
            # The application is connected: it hears connectionLost later.
            self._errback(Failure())
            self.transport.abortConnection()
            return
        self.factory.ready.callback(app)
        if early and not self._lost:
            self._deliver(early)

    def _deliver(self, data: bytes) -> None:
        """Pass bytes to the application, holding them while it paused reading."""
        tunnel = self.tunnel
        if tunnel is None or self.app is None or tunnel.closing:
            return
        if self._held or tunnel.paused:
            self._held.append(data)
            return
        self.app.dataReceived(data)

    def _flush(self, force: bool = False) -> None:
        """Deliver held bytes (all of them, paused or not, before an EOF)."""
        tunnel = self.tunnel
        if tunnel is None or self.app is None:
            return
        while self._held and not tunnel.closing and (force or not tunnel.paused):
            self.app.dataReceived(self._held.pop(0))

    # ------------------------------------------------------------------
    # Failure

    def _errback(self, reason: Union[BaseException, Failure]) -> None:
        if not self.factory.ready.called:
            self.factory.ready.errback(reason)

    def _fail(self, reason: Union[BaseException, Failure]) -> None:
        """End the handshake: close (our side has nothing left to say)."""
        self.handshake.fail()
        self.transport.loseConnection()
        self._errback(reason)

    def abort(self) -> None:
        """Cancel the handshake: drop the connection at once."""
        state = self.handshake.state
        if state is ClientState.CONNECTED or state is ClientState.FAILED:
            return
        self.handshake.fail()
        self.transport.abortConnection()


class _HandshakeFactory(Factory):
    """One ``connect()``: builds a single handshake protocol and reports on it."""

    noisy = False

    def __init__(
        self,
        request: Request,
        credentials: Optional[UserPassRequest],
        app_factory: IProtocolFactory,
    ) -> None:
        self.request = request
        self.credentials = credentials
        self.app_factory = app_factory
        self.methods: Tuple[int, ...] = (Method.NO_AUTHENTICATION,)
        if credentials is not None:
            # Like curl: offer both, the server picks.
            self.methods += (Method.USERNAME_PASSWORD,)
        self.greeting = Greeting(self.methods).to_bytes()
        #: Fires with the application protocol once connected.
        self.ready: defer.Deferred[IProtocol] = defer.Deferred(self._cancel_ready)
        self.instance: Optional[SOCKS5ClientProtocol] = None
        self.abandoned = False

    def buildProtocol(self, addr: IAddress) -> Optional[SOCKS5ClientProtocol]:  # type: ignore[override]
        if self.instance is not None or self.abandoned:
            return None
        self.instance = SOCKS5ClientProtocol(self)
        return self.instance

    def _cancel_ready(self, ready: defer.Deferred[IProtocol]) -> None:
        self.abandon()

    def abandon(self) -> None:
        """The caller gave up: end the handshake wherever it stands."""
        self.abandoned = True
        if self.instance is not None:
            self.instance.abort()


# --------------------------------------------------------------------------
# Local name resolution (only when asked for)


@implementer(IResolutionReceiver)
class _FirstAddress:
    """Collects a resolution's addresses and fires with the first one."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.deferred: defer.Deferred[IAddress] = defer.Deferred()
        self._addresses: List[IAddress] = []

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        self._addresses.append(address)

    def resolutionComplete(self) -> None:
        if self.deferred.called:  # cancelled
            return
        if self._addresses:
            self.deferred.callback(self._addresses[0])
        else:
            self.deferred.errback(DNSLookupError(self.name))


# --------------------------------------------------------------------------
# The endpoint


def _normalize_host(host: Union[str, bytes]) -> str:
    """Text host; non-ASCII names IDNA-encoded, as the proxy's resolver needs."""
    if isinstance(host, bytes):
        host = host.decode("utf-8")
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError as e:
            raise ValueError(f"cannot IDNA-encode host name {host!r}: {e}") from None
    return host


def _as_bytes(value: Union[str, bytes]) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(IStreamClientEndpoint)
class SOCKS5ClientEndpoint:
    """
    Connect to ``host``:``port`` through the SOCKS5 proxy that
    ``proxy_endpoint`` reaches.

    :param proxy_endpoint: any ``IStreamClientEndpoint`` to the SOCKS5 server.
    :param host: an IPv4 or IPv6 literal, or a host name.
    :param port: the target port.
    :param username: with ``password``, offer RFC 1929 authentication (str is
        sent as UTF-8).  The server may still choose no authentication.
    :param timeout: seconds for the whole ``connect()``, reaching the proxy
        included; then it fails with :class:`HandshakeTimeout`.  ``None``:
        no limit beyond the proxy endpoint's own.
    :param reactor: the clock for ``timeout``; default: the global reactor.
    :param resolver: resolve host names here with this
        ``IHostnameResolver`` and send the proxy the first address.  By
        default (``None``) names go to the proxy, which resolves them.
    :param tls: ``True``: speak TLS to ``host`` through the tunnel, the
        certificate verified for ``host`` (name or IP literal), as txtorcon's
        ``TorSocksEndpoint(tls=True)``; or an
        ``IOpenSSLClientConnectionCreator`` (or a context factory such as
        ``CertificateOptions``) to use instead, as ``wrapClientTLS`` takes.
    :param trust_root: with ``tls=True``, what verifies the certificate: a
        ``Certificate``, an ``IOpenSSLTrustRoot``, or the path of a PEM file
        or directory (see :mod:`twisted_socks5.clienttls`); default: the
        platform's trust store.

    ``connect()`` fires with the application protocol once the server replied
    success; its transport is a :class:`SOCKS5Transport` (without TLS).
    Cancelling the Deferred stops the attempt wherever it is.  With TLS,
    ``connect()`` fires once the tunnel is up; a certificate that fails
    verification closes the connection (the application's
    ``connectionLost`` gets the TLS error) before any byte reaches it.
    """

    def __init__(
        self,
        proxy_endpoint: IStreamClientEndpoint,
        host: Union[str, bytes],
        port: int,
        *,
        username: Union[str, bytes, None] = None,
        password: Union[str, bytes, None] = None,
        timeout: Optional[float] = None,
        reactor: Optional[IReactorTime] = None,
        resolver: Optional[IHostnameResolver] = None,
        tls: Union[bool, IOpenSSLClientConnectionCreator] = False,
        trust_root: TrustRoot = None,
    ) -> None:
        self.proxy_endpoint = proxy_endpoint
        #: The target as it will be requested (before any local resolution).
        self.target = Address.from_host(_normalize_host(host), port)
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        self._credentials: Optional[UserPassRequest] = None
        if username is not None and password is not None:
            self._credentials = UserPassRequest(
                _as_bytes(username), _as_bytes(password)
            )
            self._credentials.to_bytes()  # checks the RFC 1929 lengths now
        if timeout is not None and not 0 < timeout < float("inf"):
            raise ValueError("timeout must be positive and finite")
        self.timeout = timeout
        self._reactor = reactor
        self.resolver = resolver
        #: How TLS to the target starts, or ``None`` for none.
        self.tls: Optional[IOpenSSLClientConnectionCreator] = None
        if tls is True:
            self.tls = client_tls(self.target.host, trust_root)
        elif trust_root is not None:
            raise ValueError("trust_root goes with tls=True")
        elif IOpenSSLClientConnectionCreator.providedBy(tls) or hasattr(
            tls, "getContext"
        ):
            # A creator, or a context factory (CertificateOptions...), as
            # wrapClientTLS takes them.
            self.tls = tls  # type: ignore[assignment]
        elif tls is not False:
            raise TypeError(
                "tls must be True, False or an IOpenSSLClientConnectionCreator"
            )

    @property
    def username(self) -> Optional[bytes]:
        return self._credentials.username if self._credentials else None

    def __repr__(self) -> str:
        user = f" user={self.username!r}" if self._credentials else ""
        tls = " tls" if self.tls is not None else ""
        return (
            f"<SOCKS5ClientEndpoint {self.target}{tls}"
            f" via {self.proxy_endpoint!r}{user}>"
        )

    def connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        if self.tls is not None:
            tunnel = _PlainTunnel(self._connect)
            return wrapClientTLS(self.tls, tunnel).connect(protocolFactory)
        return self._connect(protocolFactory)

    def _connect(self, protocolFactory: IProtocolFactory) -> defer.Deferred[IProtocol]:
        factories: List[_HandshakeFactory] = []

        def through_proxy(target: Address) -> defer.Deferred[IProtocol]:
            factory = _HandshakeFactory(
                Request(Command.CONNECT, target), self._credentials, protocolFactory
            )
            factories.append(factory)

            def proxy_failed(failure: Failure) -> Failure:
                factory.abandon()
                factory.ready.addErrback(lambda _: None)  # moot now
                return failure

            def handshake(_: object) -> defer.Deferred[IProtocol]:
                return factory.ready

            d = self.proxy_endpoint.connect(factory)
            d.addErrback(proxy_failed)
            return d.addCallback(handshake)

        if self.resolver is not None and self.target.type is AddressType.DOMAIN:
            inner = self._resolve().addCallback(through_proxy)
        else:
            inner = defer.maybeDeferred(through_proxy, self.target)

        cancelled = False

        def cancel(_: defer.Deferred[IProtocol]) -> None:
            nonlocal cancelled
            cancelled = True
            for factory in factories:
                factory.abandon()
            inner.cancel()

        done: defer.Deferred[IProtocol] = defer.Deferred(cancel)

        def forward(result: Any) -> None:
            if cancelled:  # done fails with CancelledError on its own
                return
            if isinstance(result, Failure):
                done.errback(result)
            else:
                done.callback(result)

        inner.addBoth(forward)
        if self.timeout is not None and not done.called:
            done.addTimeout(self.timeout, self._clock(), self._timed_out)
        return done

    def _clock(self) -> IReactorTime:
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor  # type: ignore[assignment]
        return self._reactor  # type: ignore[return-value]

    def _timed_out(self, result: Any, timeout: float) -> Any:
        if isinstance(result, Failure) and result.check(defer.CancelledError):
            return Failure(HandshakeTimeout(timeout))
        return result

    def _resolve(self) -> defer.Deferred[Address]:
        target = self.target
        receiver = _FirstAddress(target.host)
        self.resolver.resolveHostName(  # type: ignore[union-attr]
            receiver, target.host, target.port
        )

        def to_address(address: IAddress) -> Address:
            return Address.from_host(address.host, target.port)  # type: ignore[attr-defined]

        return receiver.deferred.addCallback(to_address)


@implementer(IStreamClientEndpoint)
class _PlainTunnel:
    """The plain tunnel of a ``tls`` endpoint, for ``wrapClientTLS`` to wrap."""

    def __init__(
        self, connect: Callable[[IProtocolFactory], defer.Deferred[IProtocol]]
    ) -> None:
        self.connect = connect


# --------------------------------------------------------------------------
# Endpoint description strings (the ``socks5:`` clientFromString plugin)

#: Each parameter's spellings, the canonical one first: the original
#: snake_case names, Twisted's camelCase (``proxyHost``...), and
#: ``username`` as the keyword argument says it.
_SPELLINGS: Dict[str, Tuple[str, ...]] = {
    "host": ("host",),
    "port": ("port",),
    "proxy": ("proxy",),
    "proxy_host": ("proxy_host", "proxyHost"),
    "proxy_port": ("proxy_port", "proxyPort"),
    "user": ("user", "username"),
    "password": ("password",),
    "timeout": ("timeout",),
    "resolve": ("resolve",),
    "tls": ("tls",),
    "trust_root": ("trust_root", "trustRoot"),
}
_CANONICAL = {
    spelling: name for name, spellings in _SPELLINGS.items() for spelling in spellings
}
_BOOLEANS = {
    "true": True,
    "yes": True,
    "1": True,
    "false": False,
    "no": False,
    "0": False,
}


def _canonical_options(kwargs: Dict[str, object]) -> Dict[str, str]:
    """The parameters under their canonical names; two spellings must agree."""
    unknown = sorted(set(kwargs) - set(_CANONICAL))
    if unknown:
        raise ValueError(f"socks5: unknown parameter(s): {', '.join(unknown)}")
    options: Dict[str, str] = {}
    spelt: Dict[str, str] = {}
    for key, raw in kwargs.items():
        name, value = _CANONICAL[key], _text(raw)
        if name in options and options[name] != value:
            raise ValueError(
                f"socks5: {spelt[name]}= and {key}= are the same parameter"
                " with different values"
            )
        options[name] = value
        spelt.setdefault(name, key)
    return options


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _port(value: str, what: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise ValueError(f"{what} must be a number, not {value!r}") from None
    if not 0 < port <= 0xFFFF:
        raise ValueError(f"{what} out of range: {port}")
    return port


def endpoint_from_description(
    reactor: Any, *args: object, **kwargs: object
) -> SOCKS5ClientEndpoint:
    """
    Build a :class:`SOCKS5ClientEndpoint` from the parts of a ``socks5:``
    description (see :mod:`twisted.plugins.socks5_endpoints` for the syntax).
    Raises ``ValueError`` with the reason for any bad description.
    """
    options = _canonical_options(kwargs)
    positional = [_text(a) for a in args]
    if len(positional) > 2:
        raise ValueError("socks5: at most two positional arguments (host and port)")
    for name, value in zip(("host", "port"), positional):
        if name in options:
            raise ValueError(f"socks5: {name} given twice")
        options[name] = value
    if not options.get("host"):
        raise ValueError("socks5: the target host is required")
    if "port" not in options:
        raise ValueError("socks5: the target port is required")
    port = _port(options["port"], "port")

    proxy: IStreamClientEndpoint
    if "proxy" in options:
        if "proxy_host" in options or "proxy_port" in options:
            raise ValueError("socks5: give proxy= or proxy_host=/proxy_port=, not both")
        from twisted.internet.endpoints import clientFromString

        proxy = clientFromString(reactor, options["proxy"])
    elif "proxy_host" in options:
        from twisted.internet.endpoints import HostnameEndpoint

        proxy_port = _port(
            options.get("proxy_port", str(DEFAULT_PROXY_PORT)), "proxy_port"
        )
        proxy = HostnameEndpoint(reactor, options["proxy_host"], proxy_port)
    else:
        raise ValueError("socks5: the proxy is required (proxy= or proxy_host=)")

    timeout: Optional[float] = None
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            raise ValueError(
                f"socks5: timeout must be a number, not {options['timeout']!r}"
            ) from None

    resolve = options.get("resolve", "remote")
    if resolve not in ("remote", "local"):
        raise ValueError("socks5: resolve must be 'remote' or 'local'")
    resolver = reactor.nameResolver if resolve == "local" else None

    tls = _BOOLEANS.get(options.get("tls", "false").lower())
    if tls is None:
        raise ValueError("socks5: tls must be true or false")
    if "trust_root" in options and not tls:
        raise ValueError("socks5: trustRoot= needs tls=true")

    return SOCKS5ClientEndpoint(
        proxy,
        options["host"],
        port,
        username=options.get("user"),
        password=options.get("password"),
        timeout=timeout,
        reactor=reactor,
        resolver=resolver,
        tls=tls,
        trust_root=options.get("trust_root"),
    )
