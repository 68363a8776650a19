"""
A real twisted.names DNS server for tests, on a loopback port, serving the
zone ``test`` from records given in the test (no system DNS involved), and
a server that never answers.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol
from twisted.names import authority, dns, server

#: The zone's SOA: a negative answer is kept for min(ttl, minimum) = 30 s.
SOA = dns.Record_SOA(
    mname=b"ns.test",
    rname=b"root.test",
    serial=1,
    refresh=60,
    retry=60,
    expire=60,
    minimum=30,
    ttl=60,
)

#: Names and their records; ``servfail.test`` is answered SERVFAIL.
RECORDS: Dict[bytes, List[Any]] = {
    b"test": [SOA],
    b"both.test": [dns.Record_A("127.0.0.1", ttl=120), dns.Record_AAAA("::1", ttl=100)],
    b"v4.test": [dns.Record_A("127.0.0.1", ttl=120)],
    b"v6.test": [dns.Record_AAAA("::1", ttl=120)],
    b"short.test": [dns.Record_A("127.0.0.1", ttl=0)],
    b"long.test": [dns.Record_A("127.0.0.1", ttl=999_999)],
    b"peer.test": [dns.Record_A("127.0.0.1", ttl=120)],
    # A chain of two aliases: the server answers the first hop and its
    # target's addresses only, so the client asks again.
    b"alias.test": [dns.Record_CNAME(b"middle.test", ttl=50)],
    b"middle.test": [dns.Record_CNAME(b"both.test", ttl=40)],
    b"loop1.test": [dns.Record_CNAME(b"loop2.test", ttl=40)],
    b"loop2.test": [dns.Record_CNAME(b"loop1.test", ttl=40)],
}


class _Zone(authority.FileAuthority):
    def __init__(self, records: Dict[bytes, List[Any]]) -> None:
        self._given = records
        super().__init__(None)

    def loadFile(self, filename: Any) -> None:
        self.soa = (b"test", SOA)
        self.records = {name.lower(): list(rs) for name, rs in self._given.items()}


class _Factory(server.DNSServerFactory):
    """Answers from the zone; counts queries; SERVFAIL for servfail.test."""

    def __init__(self, zone: _Zone) -> None:
        super().__init__(authorities=[zone])
        self.queries: List[Tuple[bytes, int]] = []

    def handleQuery(self, message: Any, protocol: Any, address: Any) -> None:
        query = message.queries[0]
        self.queries.append((query.name.name, query.type))
        if query.name.name == b"servfail.test":
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().handleQuery(message, protocol, address)


class DNSTestServer:
    """The zone served over UDP and TCP on ``host``."""

    def __init__(self, host: str = "127.0.0.1", records: Any = None) -> None:
        self.factory = _Factory(_Zone(RECORDS if records is None else records))
        self.factory.noisy = False
        self.udp = reactor.listenUDP(
            0, dns.DNSDatagramProtocol(self.factory), interface=host
        )
        self.tcp = reactor.listenTCP(0, self.factory, interface=host)
        self.host = host

    @property
    def queries(self) -> List[Tuple[bytes, int]]:
        return self.factory.queries

    def spec(self, transport: str = "udp") -> str:
        """``--resolver``'s value for this server."""
        port = (self.udp if transport == "udp" else self.tcp).getHost().port
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{transport}:{host}:{port}"

    def stop(self) -> Any:
        self.tcp.stopListening()
        return self.udp.stopListening()


class Silent(DatagramProtocol):
    """A DNS server that never answers: every query is dropped."""

    def __init__(self) -> None:
        self.received = 0

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received += 1
