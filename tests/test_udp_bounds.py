"""
A UDP association's tables stay bounded and keep what is in use: datagrams
queued for a name, names resolved, peers that may answer; oversized
datagrams are dropped; answers keep an association alive.  The bounds are
made small here so the edges are reached.  (Found by mutation testing:
docs/reliability.rst.)
"""

from __future__ import annotations

from typing import Any, List

import pytest
from test_bind_udp_unit import TARGET, associate, from_client

from twisted_socks5 import udp
from twisted_socks5.codec import Address, AddressType, UDPDatagram, parse_udp_datagram


def _to(host: str, data: bytes = b"q", port: int = 53) -> bytes:
    kind = AddressType.DOMAIN if host[0].isalpha() else AddressType.IPV4
    return UDPDatagram(Address(kind, host, port), data).to_bytes()


def _drops(h: Any, reason: str) -> int:
    return int(h.protocol.udp.counters.drops[reason])


def _lookups(h: Any) -> List[str]:
    return [name for name, _ in h.connector.lookups]


def test_datagrams_queued_for_one_name_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "MAX_PENDING_PER_NAME", 2)
    h, client_port = associate()
    for data in (b"1", b"2", b"3"):
        from_client(client_port, _to("dns.test", data))
    assert _drops(h, "pending_overflow") == 1
    h.connector.lookups[0][1].callback(["127.0.0.20"])
    assert [d for d, _ in h.reactor.udp_ports[1].written] == [b"1", b"2"]


def test_names_waiting_for_their_address_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "MAX_NAMES", 2)
    h, client_port = associate()
    for name in ("a.test", "b.test", "c.test"):
        from_client(client_port, _to(name))
    assert _lookups(h) == ["a.test", "b.test"]
    assert _drops(h, "pending_overflow") == 1


def test_the_name_cache_forgets_the_least_recently_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "MAX_NAMES", 2)
    h, client_port = associate()

    def resolve(name: str, ip: str) -> None:
        from_client(client_port, _to(name))
        h.connector.lookups[-1][1].callback([ip])

    resolve("a.test", "127.0.0.21")
    resolve("b.test", "127.0.0.22")
    from_client(client_port, _to("a.test"))  # a is now the most recent
    resolve("c.test", "127.0.0.23")  # b goes
    from_client(client_port, _to("a.test"))
    from_client(client_port, _to("c.test"))
    assert _lookups(h) == ["a.test", "b.test", "c.test"]  # both still cached
    from_client(client_port, _to("b.test"))
    assert _lookups(h) == ["a.test", "b.test", "c.test", "b.test"]


def test_datagrams_over_the_payload_limit_are_dropped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "MAX_UDP_PAYLOAD", 4)
    h, client_port = associate()
    from_client(client_port, UDPDatagram(TARGET, b"1234").to_bytes())
    from_client(client_port, UDPDatagram(TARGET, b"12345").to_bytes())
    assert [d for d, _ in h.reactor.udp_ports[1].written] == [b"1234"]
    assert _drops(h, "oversize") == 1


def test_only_the_most_recent_peers_may_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(udp, "MAX_PEERS", 2)
    h, client_port = associate()
    for host in ("127.0.0.21", "127.0.0.22", "127.0.0.21", "127.0.0.23"):
        from_client(client_port, _to(host))  # .22 is the least recent: it goes
    out = h.reactor.udp_ports[1]
    for host in ("127.0.0.21", "127.0.0.22", "127.0.0.23"):
        out.protocol.datagramReceived(b"answer", (host, 53))
    answered = [parse_udp_datagram(p).address.host for p, _ in client_port.written]
    assert answered == ["127.0.0.21", "127.0.0.23"]
    assert _drops(h, "unknown_source") == 1


def test_answers_keep_an_association_alive() -> None:
    h, client_port = associate(idle_timeout=30)
    from_client(client_port, _to("127.0.0.20"))
    out = h.reactor.udp_ports[1]
    for _ in range(4):
        h.reactor.pump([1] * 20)
        out.protocol.datagramReceived(b"answer", ("127.0.0.20", 53))
    assert not h.closing and not h.transport.aborted
    h.reactor.pump([1] * 70)
    assert h.transport.aborted
