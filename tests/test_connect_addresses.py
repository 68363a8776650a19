"""A CONNECT by name tries a bounded number of the name's addresses."""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from twisted_socks5.codec import Address
from twisted_socks5.outbound import (
    MAX_ADDRESSES_PER_FAMILY,
    DirectConnector,
    interleave_families,
)
from twisted_socks5.testing import _Resolution

V6 = [f"2001:db8::{i + 1:x}" for i in range(20)]
V4 = [f"192.0.2.{i + 1}" for i in range(20)]


@implementer(IHostnameResolver)
class ManyAddresses:
    """Resolves every name, at once, to the given addresses (never the DNS)."""

    def __init__(self, hosts: List[str]) -> None:
        self.hosts = hosts

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for host in self.hosts:
            kind = IPv6Address if ":" in host else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", host, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


def attempts(hosts: List[str], check: Optional[Any] = None, **kw: Any) -> List[str]:
    """The addresses a CONNECT to a name tries while none ever answers."""
    reactor = MemoryReactorClock()
    connector = DirectConnector(reactor, 10, resolver=ManyAddresses(hosts), **kw)
    d = connector.connect(
        Address.from_host("many.test", 443), Factory.forProtocol(Protocol), check
    )
    for _ in range(40):  # 12 s of HostnameEndpoint's 0.3 s attempt delay
        reactor.advance(0.3)
    assert d.called  # failed at the connect timeout
    d.addErrback(lambda failure: None)
    assert {port for _, port, *_ in reactor.tcpClients} == {443}
    return [host for host, *_ in reactor.tcpClients]


def test_a_name_with_many_addresses_tries_two_of_each_family() -> None:
    assert MAX_ADDRESSES_PER_FAMILY == 2
    assert attempts(V6 + V4) == [V6[0], V4[0], V6[1], V4[1]]
    assert attempts(V4 + V6) == [V4[0], V6[0], V4[1], V6[1]]
    assert attempts(V4) == V4[:2]


def test_the_bound_is_configurable() -> None:
    assert attempts(V4 + V6, addresses_per_family=1) == [V4[0], V6[0]]
    assert attempts(V6, addresses_per_family=5) == V6[:5]
    with pytest.raises(ValueError):
        DirectConnector(MemoryReactorClock(), addresses_per_family=0)


def test_denied_addresses_take_no_attempt() -> None:
    def check(ip: str) -> Optional[str]:
        return "rule 1" if ip in V4[:10] else None

    assert attempts(V4, check) == V4[10:12]


def test_interleave_families_keeps_order_within_a_family() -> None:
    addresses = [IPv4Address("TCP", h, 0) for h in V4[:3]] + [
        IPv6Address("TCP", h, 0) for h in V6[:3]
    ]
    ordered = interleave_families(addresses, 3)
    assert [a.host for a in ordered] == [V4[0], V6[0], V4[1], V6[1], V4[2], V6[2]]
    assert interleave_families([], 2) == []
