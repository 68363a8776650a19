"""
An outbound connector of your own: how CONNECT requests leave the proxy.

:class:`PortAllowListConnector` lets CONNECT reach a few ports only and
answers every other request with REP 0x02 (connection not allowed by
ruleset).  It wraps another connector, normally a ``DirectConnector``.
"""

from __future__ import annotations

import errno
from typing import Any, Iterable, List

from twisted.internet import defer, error
from twisted.internet.interfaces import IProtocol, IProtocolFactory
from zope.interface import implementer

from twisted_socks5 import Address, IOutboundConnector


@implementer(IOutboundConnector)
class PortAllowListConnector:
    """
    :param inner: the connector that makes the allowed connections.
    :param ports: the destination ports CONNECT may reach.
    """

    def __init__(self, inner: IOutboundConnector, ports: Iterable[int]) -> None:
        self.inner = inner
        self.ports = frozenset(ports)
        self.timeout = inner.timeout

    def connect(
        self, address: Address, factory: IProtocolFactory, check: Any = None
    ) -> defer.Deferred[IProtocol]:
        if address.port not in self.ports:
            # The errno decides the reply: EACCES is REP 0x02.
            refusal = error.ConnectError(
                osError=errno.EACCES, string=f"port {address.port} is not allowed"
            )
            return defer.fail(refusal)
        if check is None:
            return self.inner.connect(address, factory)
        # Pass the server's per-address check on (see the access rules).
        return self.inner.connect(address, factory, check)

    def resolve(self, name: str) -> defer.Deferred[List[str]]:
        # Used for the names in BIND and UDP ASSOCIATE requests.
        return self.inner.resolve(name)
