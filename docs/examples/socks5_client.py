"""
Twisted's HTTP client through a SOCKS5 proxy.

``Agent.usingEndpointFactory`` asks an ``IAgentEndpointFactory`` for the
endpoint of each request; :class:`ThroughSOCKS5` answers with a
``SOCKS5ClientEndpoint``.  Such an Agent leaves TLS to the endpoints, so for
``https`` URLs the SOCKS5 tunnel is wrapped in TLS to the origin server,
verified as Agent itself would (``BrowserLikePolicyForHTTPS``).

Run it::

    python docs/examples/socks5_client.py https://example.com/ tcp:127.0.0.1:1080
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, readBody
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from twisted_socks5.client import SOCKS5ClientEndpoint


@implementer(IAgentEndpointFactory)
class ThroughSOCKS5:
    """
    :param proxy: the endpoint of the SOCKS5 server.
    :param username: with ``password``, offer username/password.
    :param timeout: seconds to reach the origin through the proxy.
    :param tls: how ``https`` origins are verified.
    """

    def __init__(
        self,
        reactor: Any,
        proxy: IStreamClientEndpoint,
        username: Optional[str] = None,
        password: Optional[str] = None,
        timeout: float = 30.0,
        tls: Optional[IPolicyForHTTPS] = None,
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.username = username
        self.password = password
        self.timeout = timeout
        self.tls = tls or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        # The host name goes to the proxy as a name: it resolves it.
        endpoint: IStreamClientEndpoint = SOCKS5ClientEndpoint(
            self.proxy,
            uri.host,
            uri.port,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            reactor=self.reactor,
        )
        if uri.scheme == b"https":
            creator = self.tls.creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


def agent_through(reactor: Any, proxy: str, **kwargs: Any) -> Agent:
    """An Agent that sends its requests through the proxy at ``proxy`` (a string)."""
    endpoints = ThroughSOCKS5(reactor, clientFromString(reactor, proxy), **kwargs)
    return Agent.usingEndpointFactory(reactor, endpoints)


async def fetch(reactor: Any, url: str, proxy: str) -> bytes:
    response = await agent_through(reactor, proxy).request(b"GET", url.encode())
    body: bytes = await readBody(response)
    return body


def main(reactor: Any, url: str, proxy: str = "tcp:127.0.0.1:1080") -> Any:
    from twisted.internet.defer import ensureDeferred

    d = ensureDeferred(fetch(reactor, url, proxy))
    return d.addCallback(lambda body: sys.stdout.buffer.write(body))


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:])
