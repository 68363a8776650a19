"""
Outbound connections for CONNECT, and the one table that turns a failed
connection into a SOCKS reply code.
"""

from __future__ import annotations

import errno
from typing import Any, Callable, Iterable, List, Optional, Tuple, TypeVar

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import (
    IHostnameResolver,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
)
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from . import tcpconnect
from .codec import Address, AddressType, ReplyCode

_T = TypeVar("_T")

#: errno values that carry a more precise meaning than their exception class.
_ERRNO_REPLIES = {
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: ReplyCode.HOST_UNREACHABLE,
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
    errno.EACCES: ReplyCode.CONNECTION_NOT_ALLOWED,
    errno.EPERM: ReplyCode.CONNECTION_NOT_ALLOWED,
}


_REPLY_CODES = frozenset(int(code) for code in ReplyCode)

#: Addresses of each family (IPv6, IPv4) a CONNECT by name tries.
#: HostnameEndpoint starts a new attempt every 0.3 s while the others are
#: pending, each holding a descriptor: a name resolving to many blackholed
#: addresses would otherwise hold one descriptor per address.
MAX_ADDRESSES_PER_FAMILY = 2


class PolicyDenied(Exception):
    """Every address the destination resolved to is denied by the rules."""

    def __init__(self, rule: str) -> None:
        super().__init__(f"denied by {rule}")
        self.rule = rule


def first_allowed(
    addresses: Iterable[str], check: Callable[[str], Optional[str]]
) -> str:
    """
    The first of a name's ``addresses`` that ``check`` allows (it returns
    ``None``, or the rule that denies); :class:`PolicyDenied`, naming the
    first denying rule, when none is allowed.
    """
    denials = []
    for ip in addresses:
        rule = check(ip)
        if rule is None:
            return ip
        denials.append(rule)
    raise PolicyDenied(denials[0] if denials else "no address")


#: Exception classes, most specific first.
_CLASS_REPLIES: Tuple[Tuple[type, ReplyCode], ...] = (
    (PolicyDenied, ReplyCode.CONNECTION_NOT_ALLOWED),
    (error.ConnectionRefusedError, ReplyCode.CONNECTION_REFUSED),
    (error.DNSLookupError, ReplyCode.HOST_UNREACHABLE),
    (error.NoRouteError, ReplyCode.NETWORK_UNREACHABLE),
    (error.TCPTimedOutError, ReplyCode.TTL_EXPIRED),
    (error.TimeoutError, ReplyCode.TTL_EXPIRED),
    (defer.TimeoutError, ReplyCode.TTL_EXPIRED),
    (defer.CancelledError, ReplyCode.TTL_EXPIRED),
)


def reply_for_failure(failure: Failure) -> ReplyCode:
    """
    Map a failed outbound connection to the RFC 1928 reply code.

    The ``errno`` of the failure decides first, then its class:

    - ``ECONNREFUSED``, ``ConnectionRefusedError``: 0x05 connection refused;
    - ``DNSLookupError`` (the name does not resolve), ``EHOSTUNREACH``,
      ``EHOSTDOWN``, ``EADDRNOTAVAIL``: 0x04 host unreachable;
    - ``ENETUNREACH``, ``ENETDOWN``, ``NoRouteError``: 0x03 network unreachable;
    - a connect timeout, ours or the kernel's (``ETIMEDOUT``): 0x06 TTL
      expired, as Tor does: it tells the client the attempt ran out of time,
      which 0x04 would hide;
    - ``EACCES``, ``EPERM`` (a local firewall), :class:`PolicyDenied` (the
      access rules denied every address of the name): 0x02 not allowed;
    - through ``--upstream``: the upstream's own reply code when it sent
      one, 0x06 when its handshake timed out, else 0x01;
    - anything else: 0x01 general failure.
    """
    value = failure.value
    from .client import HandshakeTimeout, SOCKS5Error, SOCKS5ReplyError

    if isinstance(value, SOCKS5ReplyError) and value.code in _REPLY_CODES:
        return ReplyCode(value.code)  # an upstream's answer, passed on
    if isinstance(value, HandshakeTimeout):
        return ReplyCode.TTL_EXPIRED
    if isinstance(value, SOCKS5Error):
        return ReplyCode.GENERAL_FAILURE
    number = getattr(value, "osError", None)
    if not isinstance(number, int):
        number = getattr(value, "errno", None)
    if isinstance(number, int) and number in _ERRNO_REPLIES:
        return _ERRNO_REPLIES[number]
    for cls, code in _CLASS_REPLIES:
        if isinstance(value, cls):
            return code
    return ReplyCode.GENERAL_FAILURE


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
class _FilteringReceiver:
    def __init__(
        self,
        receiver: IResolutionReceiver,
        check: Callable[[str], Optional[str]],
        denials: List[str],
    ) -> None:
        self._receiver = receiver
        self._check = check
        self._denials = denials

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        rule = self._check(getattr(address, "host", ""))
        if rule is None:
            self._receiver.addressResolved(address)
        else:
            self._denials.append(rule)

    def resolutionComplete(self) -> None:
        self._receiver.resolutionComplete()


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


@implementer(IResolutionReceiver)
class _CappingReceiver:
    def __init__(self, receiver: IResolutionReceiver, per_family: int) -> None:
        self._receiver = receiver
        self._per_family = per_family
        self._addresses: List[Any] = []

    def resolutionBegan(self, resolutionInProgress: Any) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: Any) -> None:
        self._addresses.append(address)

    def resolutionComplete(self) -> None:
        for address in interleave_families(self._addresses, self._per_family):
            self._receiver.addressResolved(address)
        self._receiver.resolutionComplete()


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
    """

    def __init__(
        self,
        reactor: Any,
        timeout: float = 10.0,
        bind_address: Optional[Tuple[str, int]] = None,
        resolver: Optional[IHostnameResolver] = None,
        addresses_per_family: int = MAX_ADDRESSES_PER_FAMILY,
    ) -> None:
        if addresses_per_family < 1:
            raise ValueError("a connection needs at least one address to try")
        self.reactor = reactor
        self.timeout = timeout
        self.addresses_per_family = addresses_per_family
        self.bind_address = bind_address
        self._name_reactor = (
            reactor if resolver is None else _ResolvingReactor(reactor, resolver)
        )

    def _endpoint(
        self,
        address: Address,
        check: Optional[Callable[[str], Optional[str]]] = None,
        denials: Optional[List[str]] = None,
    ) -> Any:
        timeout = max(1, int(self.timeout + 1))
        if address.type is AddressType.IPV4:
            return TCP4ClientEndpoint(
                self.reactor, address.host, address.port, timeout, self.bind_address
            )
        if address.type is AddressType.IPV6:
            return TCP6ClientEndpoint(
                self.reactor, address.host, address.port, timeout, self.bind_address
            )
        resolver = IReactorPluggableNameResolver(self._name_reactor).nameResolver
        if check is not None:
            resolver = _FilteringResolver(
                resolver, check, denials if denials is not None else []
            )
        # Capped after the rules' filter: denied addresses take no attempt.
        resolver = _CappingResolver(resolver, self.addresses_per_family)
        return HostnameEndpoint(
            _ResolvingReactor(self.reactor, resolver),
            address.host.encode("idna") if not address.host.isascii() else address.host,
            address.port,
            timeout=timeout,
            bindAddress=self.bind_address,
        )

    def _connect_tcp(
        self, address: Address, factory: IProtocolFactory
    ) -> defer.Deferred[IProtocol]:
        if tcpconnect.available(self.reactor):
            return tcpconnect.connect_tcp(
                self.reactor,
                address.host,
                address.port,
                factory,
                self.timeout,
                self.bind_address,
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
            bindAddress=self.bind_address,
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
    ) -> defer.Deferred[IProtocol]:
        if address.type is not AddressType.DOMAIN and getattr(
            factory, "fast_connect", False
        ):
            return self._connect_tcp(address, factory)
        denials: List[str] = []
        try:
            endpoint = self._endpoint(address, check, denials)
        except (UnicodeError, ValueError) as e:
            return defer.fail(error.DNSLookupError(str(e)))
        d: defer.Deferred[IProtocol] = defer.maybeDeferred(endpoint.connect, factory)

        def denied(failure: Failure) -> Failure:
            if denials and failure.check(error.DNSLookupError):
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
    expired = []

    def expire() -> None:
        expired.append(True)
        d.cancel()

    call = reactor.callLater(timeout, expire)

    def finish(result: Any) -> Any:
        if call.active():
            call.cancel()
        if expired and isinstance(result, Failure):
            return Failure(error.TimeoutError(f"no connection within {timeout} s"))
        return result

    return d.addBoth(finish)
