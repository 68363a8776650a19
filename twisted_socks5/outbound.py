"""
Outbound connectors: how a CONNECT leaves the proxy.

- :class:`IOutboundConnector`, what the server asks of a connector;
- :class:`DirectConnector`, straight to the destination (with the filtering
  resolver that lets the access rules see every address a name resolves to);
- :class:`UpstreamConnector`, through another SOCKS5 server (``--upstream``).

What a failed connection is answered with is :mod:`twisted_socks5.replies`.

``--upstream`` (:func:`parse_upstream`, :class:`UpstreamConnector`) takes a
URL or a Twisted client endpoint string::

    socks5://[USER:PASSWORD@]HOST:PORT
    socks5+tls://[USER:PASSWORD@]HOST:PORT[?ca=CA.pem][&servername=NAME]
    tcp:host=HOST:port=PORT      (any clientFromString endpoint, e.g. unix:...)

With ``socks5+tls`` the upstream's certificate is verified against ``ca``
(default: the system's trust store) and its name checked with
service-identity (``optionsForClientTLS``), against ``servername``
(default: HOST).  A name that does not match fails the connection.

Names are resolved by the upstream, unless access rules are configured:
then they are resolved here so that the rules see every address (see
:mod:`twisted_socks5.rules`), and the upstream is asked for an allowed one.
BIND and UDP ASSOCIATE are not chained: they are served by this server.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IConnector,
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from . import tcpconnect
from .client import SOCKS5ClientEndpoint
from .codec import Address, AddressType
from .outgoing import OutgoingAddresses
from .replies import PolicyDenied, SOCKS5Error
from .resolver import FamilyPreference
from .rules import Decision

_T = TypeVar("_T")

#: Addresses of each family (IPv6, IPv4) a CONNECT by name tries.
#: HostnameEndpoint starts a new attempt every 0.3 s while the others are
#: pending, each holding a descriptor: a name resolving to many blackholed
#: addresses would otherwise hold one descriptor per address.
MAX_ADDRESSES_PER_FAMILY = 2


def pick_allowed(
    addresses: Iterable[str], decide: Callable[[str], Decision]
) -> Tuple[str, Decision]:
    """
    The first of a name's ``addresses`` that ``decide`` allows, with its
    :class:`~twisted_socks5.rules.Decision` (the route is the allowing
    rule's); :class:`PolicyDenied`, naming the first denying rule, when none
    is allowed.
    """
    first_denial = None
    for ip in addresses:
        decision = decide(ip)
        if decision.allowed:
            return ip, decision
        if first_denial is None:
            first_denial = decision.rule
    raise PolicyDenied(first_denial if first_denial is not None else "no address")


def pick_preferred(
    addresses: Iterable[str],
    decide: Callable[[str], Decision],
    prefer: Optional[FamilyPreference],
    name: str = "",
) -> Tuple[str, Decision]:
    """
    :func:`pick_allowed` with ``--prefer`` applied to the allowed addresses:
    the preferred family's first allowed address; with ``ipv4-only`` or
    ``ipv6-only``, a ``DNSLookupError`` (0x04) when the rules allow only
    addresses of the other family (:class:`PolicyDenied` when they allow
    none).  The rules' verdict on one address does not depend on the
    others, so trying the preferred family first picks what filtering
    first would.
    """
    if prefer is None:
        return pick_allowed(addresses, decide)
    kept, dropped = prefer.split(list(addresses))
    ip, decision = pick_allowed([*kept, *dropped], decide)
    if ip in dropped:
        raise prefer.no_address(name)
    return ip, decision


def denial_check(decide: Callable[[str], Decision]) -> Callable[[str], Optional[str]]:
    """
    ``decide`` in the shape :meth:`IOutboundConnector.connect`'s ``check``
    has (a public API): ``None`` to allow an address, else the denying rule.
    """

    def check(ip: str) -> Optional[str]:
        decision = decide(ip)
        return None if decision.allowed else str(decision.rule)

    return check


def _decider(check: Callable[[str], Optional[str]]) -> Callable[[str], Decision]:
    """The other way round: a connector's ``check`` as a Decision."""

    def decide(ip: str) -> Decision:
        rule = check(ip)
        return _CHECK_ALLOWED if rule is None else Decision(False, rule)

    return decide


_CHECK_ALLOWED = Decision(True, "the server's check")


def first_allowed(
    addresses: Iterable[str], check: Callable[[str], Optional[str]]
) -> str:
    """
    The first of a name's ``addresses`` that a connector's ``check`` allows
    (see :func:`pick_allowed`).
    """
    return pick_allowed(addresses, _decider(check))[0]


class IOutboundConnector(Interface):
    """Opens the outbound TCP connection of a CONNECT request."""

    timeout = Attribute("Seconds allowed for the whole connect, resolution included.")

    def connect(
        address: Address,
        factory: IProtocolFactory,
        check: Optional[Callable[[str], Optional[str]]] = None,
    ) -> defer.Deferred[IProtocol]:
        """
        Connect to ``address``; fire with the connected protocol.  ``check``
        is called with each IP a name resolves to and returns ``None`` to
        allow it or the denying rule; when all are denied, fail with
        :class:`PolicyDenied`.
        """

    def resolve(name: str) -> defer.Deferred[List[str]]:
        """Resolve a name to IP address strings (for BIND and UDP)."""


@implementer(IResolutionReceiver)
class _Collector:
    """Gathers the addresses of one resolution into a Deferred."""

    def __init__(self, d: defer.Deferred[List[str]], name: str) -> None:
        self._d = d
        self._name = name
        self._addresses: List[str] = []

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        host = getattr(address, "host", None)
        if isinstance(host, str) and host not in self._addresses:
            self._addresses.append(host)

    def resolutionComplete(self) -> None:
        if self._d.called:
            return
        if self._addresses:
            self._d.callback(self._addresses)
        else:
            self._d.errback(error.DNSLookupError(f"no address for {self._name}"))


@implementer(IHostnameResolver)
class _WrappingResolver:
    """A resolver whose answers pass through a receiver of ours first."""

    def __init__(self, resolver: IHostnameResolver) -> None:
        self._resolver = resolver

    def _wrap(self, receiver: IResolutionReceiver) -> IResolutionReceiver:
        raise NotImplementedError

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        return self._resolver.resolveHostName(
            self._wrap(resolutionReceiver),
            hostName,
            portNumber,
            addressTypes,
            transportSemantics,
        )


class _FilteringResolver(_WrappingResolver):
    """
    Passes on only the addresses the access rules allow, so a name cannot
    smuggle a connection into a denied network (the rules see every address
    the name resolves to, and HostnameEndpoint only ever gets allowed ones).
    The server relies on it alone for names whose route is known before
    resolution (no other layer checks them again): see ``_connect`` in
    :mod:`twisted_socks5.server`.
    """

    def __init__(
        self,
        resolver: IHostnameResolver,
        check: Callable[[str], Optional[str]],
        denials: List[str],
    ) -> None:
        super().__init__(resolver)
        self._check = check
        self._denials = denials

    def _wrap(self, receiver: IResolutionReceiver) -> IResolutionReceiver:
        return _FilteringReceiver(receiver, self._check, self._denials)


@implementer(IResolutionReceiver)
class _ForwardingReceiver:
    """Passes a resolution on to ``receiver``; subclasses change one step."""

    def __init__(self, receiver: IResolutionReceiver) -> None:
        self._receiver = receiver

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


class _CollectingReceiver(_ForwardingReceiver):
    """Holds every address until the end, then passes on ``_select``'s."""

    def __init__(self, receiver: IResolutionReceiver) -> None:
        super().__init__(receiver)
        self._addresses: List[Any] = []

    def addressResolved(self, address: Any) -> None:
        self._addresses.append(address)

    def _select(self, addresses: List[Any]) -> List[Any]:
        raise NotImplementedError

    def resolutionComplete(self) -> None:
        for address in self._select(self._addresses):
            self._receiver.addressResolved(address)
        self._receiver.resolutionComplete()


class _FilteringReceiver(_ForwardingReceiver):
    def __init__(
        self,
        receiver: IResolutionReceiver,
        check: Callable[[str], Optional[str]],
        denials: List[str],
    ) -> None:
        super().__init__(receiver)
        self._check = check
        self._denials = denials

    def addressResolved(self, address: Any) -> None:
        rule = self._check(getattr(address, "host", ""))
        if rule is None:
            self._receiver.addressResolved(address)
        else:
            self._denials.append(rule)


class _PreferringResolver(_WrappingResolver):
    """
    ``--prefer`` after the rules' filter: the preferred family first, or
    the other dropped (``dropped`` counts them, for the reply code).
    """

    def __init__(
        self, resolver: IHostnameResolver, prefer: FamilyPreference, dropped: List[Any]
    ) -> None:
        super().__init__(resolver)
        self._prefer = prefer
        self._dropped = dropped

    def _wrap(self, receiver: IResolutionReceiver) -> IResolutionReceiver:
        return _PreferringReceiver(receiver, self._prefer, self._dropped)


class _PreferringReceiver(_CollectingReceiver):
    def __init__(
        self,
        receiver: IResolutionReceiver,
        prefer: FamilyPreference,
        dropped: List[Any],
    ) -> None:
        super().__init__(receiver)
        self._prefer = prefer
        self._dropped = dropped

    def _select(self, addresses: List[Any]) -> List[Any]:
        kept, dropped = self._prefer.split(addresses, _host_of)
        self._dropped.extend(dropped)
        return kept


def _host_of(address: Any) -> str:
    return str(getattr(address, "host", ""))


def interleave_families(addresses: List[_T], per_family: int) -> List[_T]:
    """
    At most ``per_family`` of ``addresses`` of each family, alternating
    families from the first address's, as RFC 8305 orders its attempts.
    """
    families: dict[bool, List[_T]] = {}
    for address in addresses:
        kept = families.setdefault(":" in getattr(address, "host", ""), [])
        if len(kept) < per_family:
            kept.append(address)
    ordered: List[_T] = []
    for rank in range(per_family):
        ordered.extend(kept[rank] for kept in families.values() if rank < len(kept))
    return ordered


class _CappingResolver(_WrappingResolver):
    """Passes on a bounded, interleaved share of the addresses a name has."""

    def __init__(self, resolver: IHostnameResolver, per_family: int) -> None:
        super().__init__(resolver)
        self._per_family = per_family

    def _wrap(self, receiver: IResolutionReceiver) -> IResolutionReceiver:
        return _CappingReceiver(receiver, self._per_family)


class _CappingReceiver(_CollectingReceiver):
    def __init__(self, receiver: IResolutionReceiver, per_family: int) -> None:
        super().__init__(receiver)
        self._per_family = per_family

    def _select(self, addresses: List[Any]) -> List[Any]:
        return interleave_families(addresses, self._per_family)


@implementer(IReactorPluggableNameResolver, IReactorTCP, IReactorTime)
class _ResolvingReactor:
    """A view of a reactor with another name resolver, for HostnameEndpoint."""

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        old, self.nameResolver = self.nameResolver, resolver
        return old

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IReactorTCP)
class _SourcingReactor:
    """
    A view of a reactor whose ``connectTCP`` leaves from the outgoing set's
    address for the destination's family (for HostnameEndpoint, whose one
    ``bindAddress`` would fit only one family).  Connections go through
    :mod:`twisted_socks5.tcpconnect` on a real reactor (a prefix's address
    needs IP_FREEBIND set before the bind).
    """

    def __init__(
        self, reactor: Any, outgoing: OutgoingAddresses, listen: Optional[str]
    ) -> None:
        self._reactor = reactor
        self._outgoing = outgoing
        self._listen = listen

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: Any,
        timeout: float = 30,
        bindAddress: Optional[Tuple[str, int]] = None,
    ) -> Any:
        source = self._outgoing.pick(6 if ":" in host else 4, self._listen)
        if source is None:
            return self._reactor.connectTCP(host, port, factory, timeout, bindAddress)
        if not tcpconnect.available(self._reactor):
            return self._reactor.connectTCP(
                host, port, factory, timeout, (source[0], 0)
            )
        connector: Any = _Connecting(host, port)
        factory.startedConnecting(connector)
        d = tcpconnect.connect_tcp(
            self._reactor, host, port, factory, timeout, (source[0], 0), source[1]
        )
        connector.attempt = d

        def failed(reason: Failure) -> None:
            factory.clientConnectionFailed(connector, reason)

        d.addErrback(failed)
        return connector


@implementer(IConnector)
class _Connecting:
    """The ``IConnector`` of a :func:`tcpconnect.connect_tcp` attempt."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.attempt: Optional[defer.Deferred[IProtocol]] = None

    def getDestination(self) -> Any:
        kind = IPv6Address if ":" in self.host else IPv4Address
        return kind("TCP", self.host, self.port)

    def stopConnecting(self) -> None:
        if self.attempt is not None and not self.attempt.called:
            self.attempt.cancel()

    def disconnect(self) -> None:
        self.stopConnecting()

    def connect(self) -> None:  # pragma: no cover - endpoints never retry
        raise NotImplementedError("a new attempt is a new connectTCP")


@implementer(IOutboundConnector)
class DirectConnector:
    """
    Connect straight to the destination.

    IP literals go through a plain TCP endpoint (no resolver round trip);
    names through :class:`HostnameEndpoint`, which resolves in the reactor's
    thread pool without blocking and races IPv6 against IPv4 (RFC 8305).  The
    whole attempt, resolution included, is bounded by ``timeout``.

    :param resolver: an ``IHostnameResolver`` to use instead of the
        reactor's (tests use one that never leaves the machine).
    :param addresses_per_family: addresses of each family a name's
        connection tries (alternating families), so that one CONNECT holds
        at most twice that many outbound descriptors while it connects.
    :param outgoing: the source addresses connections leave from
        (``--outgoing``; see :mod:`twisted_socks5.outgoing`), instead of
        ``bind_address``; by family, so happy eyeballs keeps both.
    :param prefer: ``--prefer``, applied to the addresses the rules allow.
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float = 10.0,
        bind_address: Optional[Tuple[str, int]] = None,
        resolver: Optional[IHostnameResolver] = None,
        addresses_per_family: int = MAX_ADDRESSES_PER_FAMILY,
        outgoing: Optional[OutgoingAddresses] = None,
        prefer: Optional[FamilyPreference] = None,
    ) -> None:
        if addresses_per_family < 1:
            raise ValueError("a connection needs at least one address to try")
        self.reactor = reactor
        self.timeout = timeout
        self.addresses_per_family = addresses_per_family
        self.bind_address = bind_address
        self.outgoing = outgoing
        self.prefer = prefer
        self._name_reactor = (
            reactor if resolver is None else _ResolvingReactor(reactor, resolver)
        )

    def _endpoint(
        self,
        address: Address,
        check: Optional[Callable[[str], Optional[str]]] = None,
        denials: Optional[List[str]] = None,
        dropped: Optional[List[Any]] = None,
        listen: Optional[str] = None,
    ) -> Any:
        timeout = max(1, int(self.timeout + 1))
        reactor = self.reactor
        if self.outgoing is not None:
            reactor = _SourcingReactor(reactor, self.outgoing, listen)
        if address.type is AddressType.IPV4:
            return TCP4ClientEndpoint(
                reactor, address.host, address.port, timeout, self.bind_address
            )
        if address.type is AddressType.IPV6:
            return TCP6ClientEndpoint(
                reactor, address.host, address.port, timeout, self.bind_address
            )
        resolver = IReactorPluggableNameResolver(self._name_reactor).nameResolver
        if check is not None:
            resolver = _FilteringResolver(
                resolver, check, denials if denials is not None else []
            )
        if self.prefer is not None:
            resolver = _PreferringResolver(
                resolver, self.prefer, dropped if dropped is not None else []
            )
        # Capped after the rules' filter: denied addresses take no attempt.
        resolver = _CappingResolver(resolver, self.addresses_per_family)
        return HostnameEndpoint(
            _ResolvingReactor(reactor, resolver),
            address.host.encode("idna") if not address.host.isascii() else address.host,
            address.port,
            timeout=timeout,
            bindAddress=self.bind_address,
        )

    def _connect_tcp(
        self, address: Address, factory: IProtocolFactory, listen: Optional[str]
    ) -> defer.Deferred[IProtocol]:
        bind_address = self.bind_address
        freebind = False
        if self.outgoing is not None:
            source = self.outgoing.pick(
                6 if address.type is AddressType.IPV6 else 4, listen
            )
            if source is not None:
                bind_address, freebind = (source[0], 0), source[1]
        if tcpconnect.available(self.reactor):
            return tcpconnect.connect_tcp(
                self.reactor,
                address.host,
                address.port,
                factory,
                self.timeout,
                bind_address,
                freebind,
            )
        connector: Any = None

        def cancel(d: defer.Deferred[IProtocol]) -> None:
            if connector is not None:
                connector.stopConnecting()

        d: defer.Deferred[IProtocol] = defer.Deferred(cancel)
        # connectTCP's own timeout fails with TimeoutError: answered 0x06.
        connector = self.reactor.connectTCP(
            address.host,
            address.port,
            _FastClientFactory(factory, d),
            timeout=self.timeout,
            bindAddress=bind_address,
        )
        return d

    def resolve(self, name: str) -> defer.Deferred[List[str]]:
        """
        Resolve ``name`` to IP address strings (IPv6 and IPv4), without
        blocking and within ``timeout``; fails with ``DNSLookupError``.
        """
        resolver = IReactorPluggableNameResolver(self._name_reactor).nameResolver
        d: defer.Deferred[List[str]] = defer.Deferred()
        resolver.resolveHostName(_Collector(d, name), name, 0)
        return _with_timeout(d, self.timeout, self.reactor)

    def connect(
        self,
        address: Address,
        factory: IProtocolFactory,
        check: Optional[Callable[[str], Optional[str]]] = None,
        listen: Optional[str] = None,
    ) -> defer.Deferred[IProtocol]:
        """
        :meth:`IOutboundConnector.connect`; ``listen``, the address the
        client connected to, is for ``--outgoing-rotation same-as-listen``.
        """
        if address.type is not AddressType.DOMAIN and getattr(
            factory, "fast_connect", False
        ):
            return self._connect_tcp(address, factory, listen)
        denials: List[str] = []
        dropped: List[Any] = []
        try:
            endpoint = self._endpoint(address, check, denials, dropped, listen)
        except (UnicodeError, ValueError) as e:
            return defer.fail(error.DNSLookupError(str(e)))
        d: defer.Deferred[IProtocol] = defer.maybeDeferred(endpoint.connect, factory)

        def denied(failure: Failure) -> Failure:
            if not failure.check(error.DNSLookupError):
                return failure
            if dropped and self.prefer is not None:
                # The rules allowed some, --prefer's family had none: 0x04.
                return Failure(self.prefer.no_address(address.host))
            if denials:
                return Failure(PolicyDenied(denials[0]))
            return failure

        d.addErrback(denied)
        return _with_timeout(d, self.timeout, self.reactor)


class _FastClientFactory(ClientFactory):
    """
    One connectTCP without the endpoint wrappers: the protocol itself fires
    ``connected`` from ``connectionMade`` (see ``OutboundProtocol``), so no
    wrapping protocol sits in the relay's per-chunk path.
    """

    noisy = False

    def __init__(self, factory: IProtocolFactory, d: defer.Deferred[IProtocol]) -> None:
        self.factory = factory
        self.d = d

    def buildProtocol(self, addr: Any) -> Optional[IProtocol]:  # type: ignore[override]
        protocol = self.factory.buildProtocol(addr)
        if protocol is not None:
            protocol.connected_deferred = self.d  # type: ignore[attr-defined]
        return protocol

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        if not self.d.called:
            self.d.errback(reason)


def _with_timeout(
    d: defer.Deferred[_T], timeout: float, reactor: Any
) -> defer.Deferred[_T]:
    """
    Cancel ``d`` after ``timeout`` seconds and fail with ``TimeoutError``,
    whatever error the cancelled operation reports (HostnameEndpoint turns a
    cancelled resolution into a DNS error, which would mislabel the reply).
    """

    def timed_out(result: Any, timeout: float) -> Any:
        if isinstance(result, Failure):
            return Failure(error.TimeoutError(f"no connection within {timeout} s"))
        return result

    return d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)


# ------------------------------------------------------------------
# Upstream chaining

Upstream = Tuple[IStreamClientEndpoint, Optional[str], Optional[str]]


def parse_upstream(reactor: Any, spec: str) -> Upstream:
    """``--upstream``'s value as (proxy endpoint, username, password)."""
    if "://" not in spec:
        return clientFromString(reactor, spec), None, None
    url = urllib.parse.urlsplit(spec)
    if url.scheme not in ("socks5", "socks5h", "socks5+tls"):
        raise ValueError(f"unsupported upstream scheme {url.scheme!r}")
    if not url.hostname:
        raise ValueError(f"no host in upstream URL {spec!r}")
    port = url.port or 1080
    endpoint: IStreamClientEndpoint = HostnameEndpoint(reactor, url.hostname, port)
    if url.scheme == "socks5+tls":
        # Here, not at the top: pyOpenSSL is only loaded when TLS is used.
        from twisted.internet import ssl

        query = urllib.parse.parse_qs(url.query)
        servername = query.get("servername", [url.hostname])[0]
        trust: Any = ssl.platformTrust()
        if "ca" in query:
            with open(query["ca"][0], "rb") as f:
                trust = ssl.Certificate.loadPEM(f.read())
        options = ssl.optionsForClientTLS(servername, trustRoot=trust)
        endpoint = wrapClientTLS(options, endpoint)
    username = urllib.parse.unquote(url.username) if url.username else None
    password = urllib.parse.unquote(url.password) if url.password else None
    if (username is None) != (password is None):
        raise ValueError("the upstream URL needs both a user name and a password")
    return endpoint, username, password


@implementer(IOutboundConnector)
class UpstreamConnector:
    """Opens CONNECT tunnels through an upstream SOCKS5 server."""

    def __init__(
        self,
        reactor: Any,
        proxy: IStreamClientEndpoint,
        username: Optional[str] = None,
        password: Optional[str] = None,
        timeout: float = 10.0,
        local: Optional[DirectConnector] = None,
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.username = username
        self.password = password
        self.timeout = timeout
        #: Resolves names locally when rules need the addresses (and for
        #: BIND and UDP, which stay here).
        self.local = local or DirectConnector(reactor, timeout)

    def resolve(self, name: str) -> defer.Deferred[List[str]]:
        return self.local.resolve(name)

    def connect(
        self,
        address: Address,
        factory: IProtocolFactory,
        check: Optional[Callable[[str], Optional[str]]] = None,
    ) -> defer.Deferred[IProtocol]:
        if check is None or address.type is not AddressType.DOMAIN:
            return self._through(address, factory)

        def pick(addresses: List[str]) -> defer.Deferred[IProtocol]:
            ip = pick_preferred(
                addresses, _decider(check), self.local.prefer, address.host
            )[0]
            return self._through(Address.from_host(ip, address.port), factory)

        return self.local.resolve(address.host).addCallback(pick)

    def _through(
        self, address: Address, factory: IProtocolFactory
    ) -> defer.Deferred[IProtocol]:
        endpoint = SOCKS5ClientEndpoint(
            self.proxy,
            address.host,
            address.port,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            reactor=self.reactor,
        )
        d = endpoint.connect(factory)
        d.addErrback(_upstream_failure)
        return d


def upstream_reactor(
    reactor: Any,
    outgoing: Optional[OutgoingAddresses] = None,
    resolver: Optional[IHostnameResolver] = None,
) -> Any:
    """
    The reactor an upstream server is reached through (give it to
    :func:`parse_upstream`): leaving from the ``outgoing`` set like any
    other outbound connection, its name resolved by ``resolver``
    (``--resolver``).  Without either, ``reactor`` itself.
    """
    if outgoing is None and resolver is None:
        return reactor
    view: Any = reactor
    if outgoing is not None:
        view = _SourcingReactor(view, outgoing, None)
    if resolver is None:
        pluggable = IReactorPluggableNameResolver(reactor, None)
        if pluggable is None:  # a test reactor of an older Twisted
            return view
        resolver = pluggable.nameResolver
    return _ResolvingReactor(view, resolver)


class UpstreamUnavailable(Exception):
    """The upstream server itself could not be reached (answered 0x01)."""


def _upstream_failure(failure: Failure) -> Failure:
    """
    Errors reaching the upstream are not the destination's: a refused or
    unreachable upstream must not look like a refused destination (0x05).
    """
    if failure.check(SOCKS5Error, defer.CancelledError):
        return failure
    return Failure(UpstreamUnavailable(f"upstream: {failure.getErrorMessage()}"))
