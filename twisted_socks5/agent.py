"""
An HTTP client through a SOCKS5 proxy: a ``twisted.web`` ``IAgent``, so
treq (or anything that takes an agent) uses it in one line::

    import treq
    from twisted_socks5.agent import socks5_agent

    agent = socks5_agent(reactor, "tcp:127.0.0.1:1080")
    response = await treq.get("https://example.com/", agent=agent)

It is Twisted's own ``Agent`` (``Agent.usingEndpointFactory``): every
request's connection is a :class:`~twisted_socks5.client.SOCKS5ClientEndpoint`
to the URL's host, and for ``https`` TLS runs through the tunnel to that
host, verified as ``Agent`` verifies (``BrowserLikePolicyForHTTPS``).  Host
names go to the proxy, which resolves them (``socks5h://`` in curl's terms):
nothing is looked up locally unless a ``resolver`` is given.

Connection pooling is the ``HTTPConnectionPool`` given (non-persistent by
default, as ``Agent``'s), keyed by the proxy, the credentials and the TLS
settings as well as the URL's scheme, host and port: a pool shared with
other agents never hands a request a connection that went another way.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Hashable, Optional, Tuple, Union

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.internet.interfaces import IHostnameResolver, IStreamClientEndpoint
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from .client import SOCKS5ClientEndpoint
from .clienttls import TrustRoot, load_trust_root

__all__ = ["DEFAULT_TIMEOUT", "SOCKS5AgentEndpointFactory", "socks5_agent"]

#: Seconds to reach the origin through the proxy, handshake included (the
#: same default as ``HostnameEndpoint``'s connection timeout under ``Agent``).
DEFAULT_TIMEOUT = 30.0


class _Same:
    """Hashes and compares by identity, whatever ``__eq__`` the object has."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value  # held: the pool's key keeps its object alive

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


@implementer(IAgentEndpointFactory)
class SOCKS5AgentEndpointFactory:
    """
    The endpoint of each request: through the proxy to the URL's host and
    port, in TLS for ``https``.  Arguments as :func:`socks5_agent`'s, with
    ``proxy`` already an endpoint and ``tls_policy`` the policy to use.
    """

    def __init__(
        self,
        reactor: Any,
        proxy: IStreamClientEndpoint,
        *,
        username: Union[str, bytes, None] = None,
        password: Union[str, bytes, None] = None,
        tls_policy: IPolicyForHTTPS,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        resolver: Optional[IHostnameResolver] = None,
    ) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.username = username
        self.password = password
        self.tls_policy = tls_policy
        self.timeout = timeout
        self.resolver = resolver
        # The credentials are checked now (pairing, lengths), not at the
        # first request: building an endpoint does it (and connects nowhere).
        SOCKS5ClientEndpoint(
            proxy, "localhost", 1, username=username, password=password
        )

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme not in (b"http", b"https"):
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        host: bytes = uri.host
        if host.startswith(b"[") and host.endswith(b"]"):  # an IPv6 literal
            host = host[1:-1]
        tls = None
        if uri.scheme == b"https":
            tls = self.tls_policy.creatorForNetloc(host, uri.port)
        return SOCKS5ClientEndpoint(
            self.proxy,
            host,
            uri.port,
            username=self.username,
            password=self.password,
            timeout=self.timeout,
            reactor=self.reactor,
            resolver=self.resolver,
            tls=tls if tls is not None else False,
        )

    def __repr__(self) -> str:
        user = f" user={self.username!r}" if self.username is not None else ""
        return f"<SOCKS5AgentEndpointFactory via {self.proxy!r}{user}>"


class _PoolThroughProxy:
    """
    The caller's ``HTTPConnectionPool`` with this agent's key in front of
    ``Agent``'s own (scheme, host, port), which knows nothing of the proxy.
    ``Agent`` uses ``getConnection`` and ``persistent`` only.
    """

    def __init__(self, pool: HTTPConnectionPool, prefix: Hashable) -> None:
        self.pool = pool
        self.prefix = prefix

    @property
    def persistent(self) -> bool:
        return bool(self.pool.persistent)

    def getConnection(
        self, key: Hashable, endpoint: IStreamClientEndpoint
    ) -> Deferred[Any]:
        return self.pool.getConnection((self.prefix, key), endpoint)

    def closeCachedConnections(self) -> Deferred[None]:
        return self.pool.closeCachedConnections()  # type: ignore[no-any-return]


def _as_bytes(value: Union[str, bytes, None]) -> Optional[bytes]:
    return value.encode("utf-8") if isinstance(value, str) else value


def _pool_key(
    proxy: Union[IStreamClientEndpoint, str],
    username: Union[str, bytes, None],
    password: Union[str, bytes, None],
    trust_root: TrustRoot,
    tls_policy: Optional[IPolicyForHTTPS],
) -> Tuple[Hashable, ...]:
    """
    What tells this agent's way out from others in a shared pool: the proxy
    (its description, or the endpoint object itself), the credentials (the
    password as a digest) and the TLS settings.
    """
    tls: Hashable = None
    if tls_policy is not None:
        tls = _Same(tls_policy)
    elif isinstance(trust_root, (str, os.PathLike)):
        tls = ("trust_root", os.fspath(trust_root))
    elif trust_root is not None:
        tls = _Same(trust_root)
    secret = _as_bytes(password)
    return (
        "socks5",
        proxy if isinstance(proxy, str) else _Same(proxy),
        _as_bytes(username),
        hashlib.sha256(secret).hexdigest() if secret is not None else None,
        tls,
    )


def socks5_agent(
    reactor: Any,
    proxy: Union[IStreamClientEndpoint, str],
    *,
    username: Union[str, bytes, None] = None,
    password: Union[str, bytes, None] = None,
    pool: Optional[HTTPConnectionPool] = None,
    trust_root: TrustRoot = None,
    tls_policy: Optional[IPolicyForHTTPS] = None,
    timeout: Optional[float] = DEFAULT_TIMEOUT,
    resolver: Optional[IHostnameResolver] = None,
) -> IAgent:
    """
    An ``IAgent`` whose requests (``http`` and ``https``) go through the
    SOCKS5 proxy at ``proxy``.

    :param proxy: an ``IStreamClientEndpoint`` to the SOCKS5 server, or a
        client endpoint description (``"tcp:127.0.0.1:1080"``).
    :param username: with ``password``, offer RFC 1929 authentication.
    :param pool: an ``HTTPConnectionPool`` (``persistent=True`` to reuse
        tunnels); default: a new non-persistent one, as ``Agent``'s.
    :param trust_root: what verifies ``https`` servers: a ``Certificate``,
        an ``IOpenSSLTrustRoot``, or the path of a PEM file or directory;
        default: the platform's trust store.
    :param tls_policy: an ``IPolicyForHTTPS`` (``Agent``'s
        ``contextFactory``) to use instead; not with ``trust_root``.
    :param timeout: seconds to reach the origin through the proxy; ``None``
        for no limit beyond the proxy endpoint's own.
    :param resolver: an ``IHostnameResolver`` to resolve names locally; by
        default the proxy resolves them.
    """
    if tls_policy is not None and trust_root is not None:
        raise ValueError("give trust_root or tls_policy, not both")
    key = _pool_key(proxy, username, password, trust_root, tls_policy)
    if tls_policy is None:
        tls_policy = BrowserLikePolicyForHTTPS(trustRoot=load_trust_root(trust_root))
    endpoints = SOCKS5AgentEndpointFactory(
        reactor,
        clientFromString(reactor, proxy) if isinstance(proxy, str) else proxy,
        username=username,
        password=password,
        tls_policy=tls_policy,
        timeout=timeout,
        resolver=resolver,
    )
    if pool is None:
        pool = HTTPConnectionPool(reactor, persistent=False)
    agent: IAgent = Agent.usingEndpointFactory(
        reactor, endpoints, pool=_PoolThroughProxy(pool, key)
    )
    return agent
