"""
Test doubles for code built on twisted-socks5 (our tests, the stress run,
and anyone writing an authenticator or connector), in the spirit of
``twisted.internet.testing``.
"""

from __future__ import annotations

import hashlib
from typing import Any, List, Optional, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.internet.testing import StringTransport
from zope.interface import implementer


class HalfCloseTransport(StringTransport):
    """
    A ``StringTransport`` that records half-closes (which ``StringTransport``
    lacks) and aborts.
    """

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.write_closed = False
        self.aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class LoopbackResolver:
    """
    An ``IHostnameResolver`` that never leaves the machine: ``localhost`` and
    ``*.test`` resolve to 127.0.0.1 (and ::1 when ``v6``), every other name
    fails at once, as a name without addresses does.

    :ivar asked: every name asked, in order.
    :ivar failed: how many of them had no address.
    """

    def __init__(self, v4: bool = True, v6: bool = True) -> None:
        self.v4 = v4
        self.v6 = v6
        self.asked: List[str] = []
        self.failed = 0

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Any]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        name = hostName.lower().rstrip(".")
        if name == "localhost" or name.endswith(".test"):
            if self.v4 and (addressTypes is None or IPv4Address in addressTypes):
                resolutionReceiver.addressResolved(
                    IPv4Address("TCP", "127.0.0.1", portNumber)
                )
            if self.v6 and (addressTypes is None or IPv6Address in addressTypes):
                resolutionReceiver.addressResolved(
                    IPv6Address("TCP", "::1", portNumber)
                )
        else:
            self.failed += 1
        resolutionReceiver.resolutionComplete()
        return resolution


def pattern_chunk(i: int) -> bytes:
    """
    Chunk ``i`` (64 KiB) of a known byte stream: test sources send it, sinks
    and clients check what arrives against it (or its :func:`pattern_sha256`).
    """
    return hashlib.sha256(i.to_bytes(8, "big")).digest() * 2048


def pattern_sha256(size: int) -> str:
    """The sha256 of the first ``size`` bytes of the stream."""
    h = hashlib.sha256()
    i = 0
    while size > 0:
        chunk = pattern_chunk(i)[:size]
        h.update(chunk)
        size -= len(chunk)
        i += 1
    return h.hexdigest()
