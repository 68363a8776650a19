"""
Upstream chaining: CONNECT requests leave through another SOCKS5 server.

``--upstream`` takes a URL or a Twisted client endpoint string::

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
from typing import Any, Callable, List, Optional, Tuple

from twisted.internet import defer, ssl
from twisted.internet.endpoints import (
    HostnameEndpoint,
    clientFromString,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IStreamClientEndpoint,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from .client import SOCKS5ClientEndpoint, SOCKS5Error
from .codec import Address, AddressType
from .connect import DirectConnector, IOutboundConnector, first_allowed

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
            ip = first_allowed(addresses, check)
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
