"""
``socks5_agent``'s parts in memory: the endpoint each URL gets, the pool key
that keeps ways out apart, and the trust roots a client may name.  The
requests themselves run on loopback in tests/integration/test_agent_treq.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import self_signed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, HTTPConnectionPool
from twisted.web.error import SchemeNotSupported

import twisted_socks5
from twisted_socks5 import agent as agent_module
from twisted_socks5.agent import SOCKS5AgentEndpointFactory, socks5_agent
from twisted_socks5.client import SOCKS5ClientEndpoint
from twisted_socks5.clienttls import load_trust_root
from twisted_socks5.codec import Address, AddressType

REACTOR = MemoryReactorClock()
PROXY = TCP4ClientEndpoint(REACTOR, "127.0.0.1", 1080)


def endpoint_for(url: bytes, **kwargs: Any) -> SOCKS5ClientEndpoint:
    factory = SOCKS5AgentEndpointFactory(
        REACTOR, PROXY, tls_policy=BrowserLikePolicyForHTTPS(), **kwargs
    )
    endpoint = factory.endpointForURI(URI.fromBytes(url))
    assert isinstance(endpoint, SOCKS5ClientEndpoint)
    return endpoint


def test_http_goes_through_the_proxy_by_name() -> None:
    endpoint = endpoint_for(b"http://example.test:8080/x")
    assert endpoint.proxy_endpoint is PROXY
    assert endpoint.target == Address(AddressType.DOMAIN, "example.test", 8080)
    assert endpoint.resolver is None  # the proxy resolves it
    assert endpoint.tls is None
    assert endpoint.timeout == agent_module.DEFAULT_TIMEOUT


def test_https_is_tls_through_the_tunnel() -> None:
    endpoint = endpoint_for(b"https://example.test/")
    assert endpoint.target.port == 443
    assert endpoint.tls is not None


def test_ipv6_literal_loses_its_brackets() -> None:
    assert endpoint_for(b"http://[::1]:81/").target == Address(
        AddressType.IPV6, "::1", 81
    )


def test_credentials_reach_the_endpoint_and_are_checked_early() -> None:
    assert endpoint_for(b"http://a.test/", username="u", password="p").username == b"u"
    with pytest.raises(ValueError, match="together"):
        socks5_agent(REACTOR, PROXY, username="alice")


def test_other_schemes_are_not_supported() -> None:
    with pytest.raises(SchemeNotSupported):
        endpoint_for(b"ftp://example.test/")
    failed = socks5_agent(REACTOR, PROXY).request(b"GET", b"ftp://example.test/")
    failures: list[Any] = []
    failed.addErrback(failures.append)
    assert failures[0].check(SchemeNotSupported)


def test_trust_root_or_policy_not_both() -> None:
    with pytest.raises(ValueError, match="not both"):
        socks5_agent(
            REACTOR, PROXY, trust_root="/x.pem", tls_policy=BrowserLikePolicyForHTTPS()
        )


def test_the_pool_key_tells_ways_out_apart() -> None:
    key = agent_module._pool_key
    other = TCP4ClientEndpoint(REACTOR, "127.0.0.1", 1080)
    policy = BrowserLikePolicyForHTTPS()
    base = key(PROXY, "alice", "s3cret", None, None)
    assert base == key(PROXY, "alice", "s3cret", None, None)
    assert base != key(other, "alice", "s3cret", None, None)  # an equal endpoint
    assert base != key(PROXY, "bob", "s3cret", None, None)
    assert base != key(PROXY, "alice", "other", None, None)
    assert base != key(PROXY, "alice", "s3cret", "/ca.pem", None)
    assert base != key(PROXY, "alice", "s3cret", None, policy)
    assert key(PROXY, None, None, None, policy) == key(PROXY, None, None, None, policy)
    assert key("tcp:h:1", None, None, None, None) == key(
        "tcp:h:1", None, None, None, None
    )
    assert "s3cret" not in repr(base)


def test_the_pool_sees_the_proxy_in_the_key() -> None:
    pool = HTTPConnectionPool(REACTOR)
    agent = socks5_agent(REACTOR, PROXY, pool=pool)
    agent.request(b"GET", b"http://example.test/")
    (tcp,) = REACTOR.tcpClients
    assert (tcp[0], tcp[1]) == ("127.0.0.1", 1080)
    assert pool._connections == {}  # not back in the pool yet


def test_the_agent_is_on_the_package() -> None:
    assert twisted_socks5.socks5_agent is socks5_agent


# --------------------------------------------------------------------------
# Trust roots


def test_a_bundle_and_a_directory(tmp_path: Path) -> None:
    one, two = self_signed("a.test")[1], self_signed("b.test")[1]
    (tmp_path / "bundle.pem").write_bytes(one + b"\n" + two)
    (tmp_path / "note.txt").write_bytes(one)  # not *.pem: ignored in a directory
    assert len(load_trust_root(tmp_path / "bundle.pem")._caCerts) == 2
    assert len(load_trust_root(str(tmp_path))._caCerts) == 2


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no PEM certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "bad"),
    ],
)
def test_bad_trust_roots(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "ca.pem").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_trust_root(tmp_path / "ca.pem")
    with pytest.raises(ValueError, match=message):
        socks5_agent(REACTOR, PROXY, trust_root=str(tmp_path / "ca.pem"))


def test_objects_pass_through() -> None:
    assert load_trust_root(None) is None
    marker = object()
    assert load_trust_root(marker) is marker
