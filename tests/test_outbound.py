"""Unit tests of the outbound connectors that need no network."""

from __future__ import annotations

from typing import Any, List

from twisted.internet import error
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_socks5.codec import Address, ReplyCode
from twisted_socks5.outbound import DirectConnector
from twisted_socks5.replies import reply_for_failure


@implementer(IHostnameResolver)
class SilentResolver:
    """A resolver that never answers: the look-up hangs until cancelled."""

    def __init__(self) -> None:
        self.asked: List[str] = []

    def resolveHostName(
        self,
        resolutionReceiver: Any,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> Any:
        self.asked.append(hostName)
        resolutionReceiver.resolutionBegan(None)
        return resolutionReceiver


def _failure_after_timeout(connect: bool) -> Failure:
    reactor = MemoryReactorClock()
    resolver = SilentResolver()
    connector = DirectConnector(reactor, timeout=5, resolver=resolver)
    if connect:
        address = Address.from_host("name.invalid", 80)
        d: Any = connector.connect(address, Factory.forProtocol(Protocol))
    else:
        d = connector.resolve("name.invalid")
    failures: List[Failure] = []
    d.addErrback(failures.append)
    reactor.advance(4)
    assert failures == []
    reactor.advance(2)
    assert resolver.asked == ["name.invalid"]
    assert len(failures) == 1
    return failures[0]


def test_a_hung_name_look_up_times_out_as_a_timeout_not_a_dns_error() -> None:
    """
    HostnameEndpoint reports a cancelled look-up as a DNS error (0x04): the
    connector's timeout must say it ran out of time (0x06).
    """
    failure = _failure_after_timeout(connect=True)
    assert failure.check(error.TimeoutError)
    assert reply_for_failure(failure) is ReplyCode.TTL_EXPIRED


def test_resolve_times_out_as_a_timeout() -> None:
    failure = _failure_after_timeout(connect=False)
    assert failure.check(error.TimeoutError)
    assert "no connection within 5 s" in failure.getErrorMessage()
