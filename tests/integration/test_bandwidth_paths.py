"""
A ``bandwidth`` line on real loopback sockets, through each relay path
(copying, splice from the first byte, hand-over): the limit binds, every byte
arrives intact and in order, and the path asked for is the one that moved
them (a limit never turns zero-copy off).  Rates are bench/bandwidth.py's.
"""

from __future__ import annotations

from typing import Any

import pytest_twisted
from conftest import HashSink, Source
from test_clients import _download, _upload
from test_relay_paths import events, factories, make, path
from twisted.internet import reactor, threads

from twisted_socks5.bandwidth import Meter
from twisted_socks5.limitstore import MemoryLimitStore
from twisted_socks5.rules import RuleSet
from twisted_socks5.testing import pattern_sha256

__all__ = ["events", "factories", "make", "path"]  # the relay paths' fixtures

#: Binds after its first bucket (about 200 kB): the rest waits for tokens.
RULES = "limit bandwidth 4MiB/s per-connection\nallow to 127.0.0.1\n"
SIZE = 1 << 20


@pytest_twisted.ensureDeferred
async def test_a_limited_tunnel_keeps_its_path_and_every_byte(
    make: Any, tcp_target: Any, monkeypatch: Any
) -> None:
    waits = []
    later = Meter._later

    def counting(meter: Meter, way: int, delay: float, then: Any) -> None:
        waits.append(way)
        later(meter, way, delay, then)

    monkeypatch.setattr(Meter, "_later", counting)
    proxy = make(policy=RuleSet.parse(RULES, "bandwidth.rules"))
    limiter = proxy.factory.enable_limits(MemoryLimitStore(reactor))
    await limiter.start()
    try:
        sink, source = tcp_target(HashSink), tcp_target(Source)
        digest = await threads.deferToThread(_upload, proxy.url, sink, SIZE)
        assert digest.decode() == pattern_sha256(SIZE)
        got = await threads.deferToThread(_download, proxy.url, source, SIZE)
        assert got == pattern_sha256(SIZE)
    finally:
        await limiter.stop()
    assert set(waits) == {0, 1}  # the limit bound, each way
    proxy.assert_path()
    relayed = [p for p in proxy.protocols if p.tunnel is not None]
    assert len(relayed) == 2
    for p in relayed:
        meter = p.counters.meter
        assert meter is not None and meter.buckets[0][0].rate == 4 << 20
