"""
twisted-socks5 inside a Twisted application of your own.

:func:`make_proxy_service` is the short way: :class:`SOCKS5Service` (what
``twistd socks5`` runs) listens on every endpoint and drains open tunnels on
stop.  :func:`make_services_by_hand` builds the same from Twisted's own
pieces, for applications that arrange their services themselves.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.cred.checkers import ICredentialsChecker
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString

from twisted_socks5 import (
    IAuthenticator,
    IOutboundConnector,
    NoAuthAuthenticator,
    SOCKS5ServerFactory,
    UsernamePasswordAuthenticator,
)
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.tap import SOCKS5Service, escape_ipv6_interface


def make_factory(
    reactor: Any,
    checkers: Sequence[ICredentialsChecker] = (),
    connector: Optional[IOutboundConnector] = None,
) -> SOCKS5ServerFactory:
    """
    A factory that asks for a password when ``checkers`` are given (and
    offers no authentication otherwise), with a per-client connection limit.
    """
    authenticators: List[IAuthenticator] = []
    if checkers:
        authenticators.append(UsernamePasswordAuthenticator.from_checkers(*checkers))
    else:
        authenticators.append(NoAuthAuthenticator())
    return SOCKS5ServerFactory(
        authenticators,
        reactor=reactor,
        connector=connector,  # None: DirectConnector(reactor, connect_timeout)
        connect_timeout=10,
        idle_timeout=600,
        limits=ConnectionLimits(reactor.seconds, max_per_client=64),
    )


def make_proxy_service(
    reactor: Any,
    listen: Sequence[str],
    checkers: Sequence[ICredentialsChecker] = (),
    connector: Optional[IOutboundConnector] = None,
) -> SOCKS5Service:
    """One service: listens on each endpoint string, drains on stop."""
    factory = make_factory(reactor, checkers, connector)
    # Endpoint strings need IPv6 colons escaped (interface=\:\:1);
    # --listen does it for you, and so does escape_ipv6_interface.
    descriptions = [escape_ipv6_interface(d) for d in listen]
    return SOCKS5Service(factory, descriptions, drain_timeout=10)


class DrainOnStop(Service):
    """Stops accepting clients and waits (bounded) for open tunnels."""

    def __init__(self, factory: SOCKS5ServerFactory, timeout: float) -> None:
        self.factory = factory
        self.timeout = timeout

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self.factory.drain(self.timeout)


def make_services_by_hand(
    reactor: Any, listen: Sequence[str], factory: SOCKS5ServerFactory
) -> MultiService:
    """The same as :func:`make_proxy_service`, from Twisted's services."""
    top = MultiService()
    # A MultiService stops its children last-added first: the drain goes first
    # so that it is stopped last, after the listening ports.
    DrainOnStop(factory, timeout=10).setServiceParent(top)
    for description in listen:
        endpoint = serverFromString(reactor, escape_ipv6_interface(description))
        StreamServerEndpointService(endpoint, factory).setServiceParent(top)
    return top
