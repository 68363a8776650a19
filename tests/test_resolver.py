"""
The twisted.names resolver (``--resolver``, ``--hosts``, ``--prefer``) in
memory: its parsers, the family preference, and look-ups answered by hand on
a memory reactor whose clock the test drives (TTLs, the cache's bounds,
timeouts, the next server, CNAME chains).  The same against a real DNS
server on loopback is in ``tests/integration/test_dns_resolution.py``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, List, Optional

import pytest
from helpers import UDPReactor
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error
from twisted.logger import globalLogPublisher
from twisted.names import dns
from twisted.python.failure import Failure

from twisted_socks5.codec import ReplyCode
from twisted_socks5.outbound import pick_preferred
from twisted_socks5.replies import PolicyDenied, reply_for_failure
from twisted_socks5.resolver import (
    MAX_NEGATIVE_TTL,
    MAX_TTL,
    MIN_TTL,
    DNSServer,
    FamilyPreference,
    LookupFailed,
    NamesResolver,
    parse_servers,
    read_hosts,
)
from twisted_socks5.rules import Decision

# --------------------------------------------------------------------------
# --resolver's value


def test_servers_parse_with_their_transport_and_port() -> None:
    assert parse_servers("192.0.2.53, tcp:192.0.2.54:5353,udp:[2001:db8::1]:53") == [
        DNSServer("udp", "192.0.2.53", 53),
        DNSServer("tcp", "192.0.2.54", 5353),
        DNSServer("udp", "2001:db8::1", 53),
    ]
    assert parse_servers("2001:db8::1") == [DNSServer("udp", "2001:db8::1", 53)]
    assert parse_servers("TCP:[::ffff:192.0.2.1]") == [DNSServer("tcp", "192.0.2.1")]


@pytest.mark.parametrize(
    "spec",
    ["", " , ", "dns.example", "udp:dns.example:53", "192.0.2.1:0", "192.0.2.1:65536",
     "[2001:db8::1", "[2001:db8::1]x", "quic:192.0.2.1", "192.0.2.1:x"],
)  # fmt: skip
def test_bad_servers_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_servers(spec)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["udp", "tcp"]),
            st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)),
            st.integers(1, 65535),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_servers_round_trip_through_their_text(servers: List[Any]) -> None:
    given_servers = [
        DNSServer(t, str(ipaddress.ip_address(str(ip))), port)
        for t, ip, port in servers
    ]
    parsed = parse_servers(",".join(str(s) for s in given_servers))
    assert [(s.transport, s.port) for s in parsed] == [
        (s.transport, s.port) for s in given_servers
    ]
    for got, want in zip(parsed, given_servers):
        assert ipaddress.ip_address(got.host) == ipaddress.ip_address(want.host) or (
            ipaddress.ip_address(want.host).ipv4_mapped is not None
        )


@given(st.text(max_size=80))
def test_any_server_text_parses_or_is_a_value_error(text: str) -> None:
    try:
        servers = parse_servers(text)
    except ValueError:
        return
    for server in servers:
        ipaddress.ip_address(server.host)
        assert 1 <= server.port <= 65535 and server.transport in ("udp", "tcp")


# --------------------------------------------------------------------------
# --hosts


def test_hosts_file_names_aliases_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text(
        "# comment\n"
        "127.0.0.1 localhost Local.Test.  # trailing comment\n"
        "::1 localhost ip6-localhost\n"
        "not-an-ip broken.test\n"
        "fe80::1%lo zoned.test\n"
        "127.0.0.1 localhost\n"
        "192.0.2.7\n"
    )
    assert read_hosts(str(path)) == {
        "localhost": ["127.0.0.1", "::1"],
        "local.test": ["127.0.0.1"],
        "ip6-localhost": ["::1"],
    }


@given(st.lists(st.text(max_size=40), max_size=20))
def test_any_hosts_file_reads_to_ip_addresses(
    tmp_path_factory: Any, lines: List[str]
) -> None:
    path = tmp_path_factory.mktemp("hosts") / "hosts"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    for name, addresses in read_hosts(str(path)).items():
        assert name == name.lower() and not name.endswith(".") and " " not in name
        for ip in addresses:
            ipaddress.ip_address(ip)


# --------------------------------------------------------------------------
# --prefer


@pytest.mark.parametrize(
    "spec, kept, dropped",
    [
        ("ipv4", ["127.0.0.1", "127.0.0.2", "::1", "::2"], []),
        ("ipv6", ["::1", "::2", "127.0.0.1", "127.0.0.2"], []),
        ("ipv4-only", ["127.0.0.1", "127.0.0.2"], ["::1", "::2"]),
        ("IPv6-Only", ["::1", "::2"], ["127.0.0.1", "127.0.0.2"]),
    ],
)
def test_preference_orders_or_restricts_the_families(
    spec: str, kept: List[str], dropped: List[str]
) -> None:
    prefer = FamilyPreference(spec)
    assert prefer.split(["::1", "127.0.0.1", "::2", "127.0.0.2"]) == (kept, dropped)


def test_an_unknown_preference_is_refused() -> None:
    with pytest.raises(ValueError, match="ipv4, ipv6, ipv4-only, ipv6-only"):
        FamilyPreference("ipv5")


def _rules(allowed: List[str]) -> Any:
    def decide(ip: str) -> Decision:
        return (
            Decision(True, "allow") if ip in allowed else Decision(False, f"deny {ip}")
        )

    return decide


def test_preference_applies_to_the_addresses_the_rules_allowed() -> None:
    both = ["::1", "127.0.0.1"]
    ipv4 = FamilyPreference("ipv4")
    assert pick_preferred(both, _rules(both), ipv4)[0] == "127.0.0.1"
    # The preferred family denied: the other one, as filtering first would.
    assert pick_preferred(both, _rules(["::1"]), ipv4)[0] == "::1"
    assert pick_preferred(both, _rules(both), None)[0] == "::1"
    only = FamilyPreference("ipv4-only")
    assert pick_preferred(both, _rules(both), only)[0] == "127.0.0.1"
    # Allowed by the rules, but not of the family: host unreachable (0x04).
    with pytest.raises(LookupFailed) as no_v4:
        pick_preferred(both, _rules(["::1"]), only, "both.test")
    assert "no IPv4 address allowed" in str(no_v4.value)
    assert reply_for_failure(Failure(no_v4.value)) is ReplyCode.HOST_UNREACHABLE
    # Denied by the rules: not allowed (0x02), naming the first denial.
    with pytest.raises(PolicyDenied) as denied:
        pick_preferred(both, _rules([]), only)
    assert denied.value.rule == "deny 127.0.0.1"


# --------------------------------------------------------------------------
# Look-ups, answered by hand on a memory reactor


class DNSReactor(UDPReactor):
    """Starts the protocols of its UDP ports, as a real reactor does."""

    def listenUDP(self, *args: Any, **kwargs: Any) -> Any:
        port = super().listenUDP(*args, **kwargs)
        port.protocol.transport = None
        port.protocol.makeConnection(port)
        return port


class Harness:
    """A NamesResolver on a memory reactor; the test plays the servers."""

    def __init__(self, servers: str = "udp:192.0.2.53", **kw: Any) -> None:
        self.reactor = DNSReactor()
        kw.setdefault("timeout", 4.0)
        self.resolver = NamesResolver(self.reactor, parse_servers(servers), **kw)
        self.answered = 0

    def pending(self) -> List[Any]:
        """(port, query message, server) of each query not answered yet."""
        found = []
        for port in self.reactor.udp_ports:
            if not port.listening:
                continue
            for data, server in port.written:
                message = dns.Message()
                message.fromStr(data)
                if message.id in port.protocol.liveMessages:
                    found.append((port, message, server))
        return found

    def answer(
        self,
        records: Optional[List[dns.RRHeader]] = None,
        rcode: int = dns.OK,
        authority: Optional[List[dns.RRHeader]] = None,
        raw: bool = False,
    ) -> None:
        """
        Answer every pending query with ``records`` (those of its name and
        type, or all of them when ``raw``).
        """
        for port, query, server in self.pending():
            question = query.queries[0]
            response = dns.Message(id=query.id, answer=1, rCode=rcode)
            response.queries = query.queries
            response.answers = [
                r
                for r in records or []
                if raw
                or (r.name == question.name and r.type in (question.type, dns.CNAME))
            ]
            response.authority = authority or []
            port.protocol.datagramReceived(response.toStr(), server)
            self.answered += 1

    def lookup(self, name: str, families: Any = frozenset({4, 6})) -> List[Any]:
        """The result box of a look-up: [addresses] or [Failure]."""
        box: List[Any] = []
        self.resolver.lookup(name, families).addBoth(box.append)
        return box


def a(name: str, ip: str, ttl: int = 60) -> dns.RRHeader:
    return dns.RRHeader(name, dns.A, dns.IN, ttl, dns.Record_A(ip, ttl))


def aaaa(name: str, ip: str, ttl: int = 60) -> dns.RRHeader:
    return dns.RRHeader(name, dns.AAAA, dns.IN, ttl, dns.Record_AAAA(ip, ttl))


def cname(name: str, target: str, ttl: int = 60) -> dns.RRHeader:
    return dns.RRHeader(name, dns.CNAME, dns.IN, ttl, dns.Record_CNAME(target, ttl))


def soa(ttl: int, minimum: int) -> dns.RRHeader:
    record = dns.Record_SOA(b"ns.test", b"root.test", minimum=minimum, ttl=ttl)
    return dns.RRHeader("test", dns.SOA, dns.IN, ttl, record)


def test_both_families_are_asked_and_an_answer_is_kept_for_its_ttl() -> None:
    h = Harness()
    box = h.lookup("Both.Test.")
    assert {q.queries[0].type for _, q, _ in h.pending()} == {dns.A, dns.AAAA}
    h.answer([a("both.test", "192.0.2.1", 90), aaaa("both.test", "2001:db8::1", 90)])
    assert box == [["2001:db8::1", "192.0.2.1"]]
    h.reactor.advance(89)
    assert h.lookup("both.test") == [["2001:db8::1", "192.0.2.1"]]
    assert h.pending() == []  # from the cache
    h.reactor.advance(2)
    box = h.lookup("both.test")
    assert len(h.pending()) == 2 and box == []  # expired: asked again


@pytest.mark.parametrize("ttl, kept", [(0, MIN_TTL), (10**7, MAX_TTL)])
def test_ttls_are_bounded_both_ways(ttl: int, kept: float) -> None:
    h = Harness()
    v4 = frozenset({4})
    h.lookup("v4.test", v4)
    h.answer([a("v4.test", "192.0.2.1", ttl)])
    h.reactor.advance(kept - 0.5)
    assert h.lookup("v4.test", v4) == [["192.0.2.1"]]
    assert h.pending() == []
    h.reactor.advance(1)
    h.lookup("v4.test", v4)
    assert h.pending() != []


def test_the_cache_is_bounded() -> None:
    h = Harness(max_answers=4)
    for n in range(3):
        h.lookup(f"n{n}.test")
        h.answer([a(f"n{n}.test", f"192.0.2.{n + 1}")])
    assert len(h.resolver._cache) == 4  # two families each, the oldest gone
    h.lookup("n0.test")
    assert len(h.pending()) == 2  # n0 was forgotten
    h.lookup("n2.test")
    assert len(h.pending()) == 2  # n2 was not


def test_simultaneous_look_ups_of_a_name_share_one_query() -> None:
    h = Harness()
    first, second = h.lookup("v4.test"), h.lookup("V4.test")
    assert len(h.pending()) == 2
    h.answer([a("v4.test", "192.0.2.1")])
    assert first == second == [["192.0.2.1"]]


def test_a_cname_chain_is_followed_and_kept_for_its_shortest_ttl() -> None:
    h = Harness()
    v4 = frozenset({4})
    box = h.lookup("alias.test", v4)
    # The first server answer stops at an alias of an alias.
    h.answer([cname("alias.test", "middle.test", 50)])
    assert {q.queries[0].name.name for _, q, _ in h.pending()} == {b"middle.test"}
    h.answer([cname("middle.test", "end.test", 20)])
    h.answer([a("end.test", "192.0.2.1", 300)])
    assert box == [["192.0.2.1"]]
    h.reactor.advance(19)
    assert h.lookup("alias.test", v4) == [["192.0.2.1"]]
    assert h.pending() == []
    h.reactor.advance(2)
    h.lookup("alias.test", v4)
    assert h.pending() != []


def test_records_of_other_names_in_an_answer_are_ignored() -> None:
    """A server (or a forged answer) cannot slip in an address for a name
    nobody asked about, nor one for the name under another name's alias."""
    h = Harness()
    box = h.lookup("victim.test", frozenset({4}))
    h.answer(
        [a("evil.test", "192.0.2.66"), cname("evil.test", "victim.test")], raw=True
    )
    assert box[0].check(LookupFailed) and box[0].value.reason == "no address"
    box = h.lookup("alias2.test", frozenset({4}))
    h.answer(
        [cname("alias2.test", "real.test"), a("other.test", "192.0.2.66")], raw=True
    )
    assert h.pending()  # real.test asked for, the stray record unused
    h.answer([a("real.test", "192.0.2.1")])
    assert box == [["192.0.2.1"]]


def test_a_cname_loop_ends() -> None:
    h = Harness()
    box = h.lookup("loop.test")
    for _ in range(20):
        if box:
            break
        h.answer([cname("loop.test", "loop.test")])
    assert isinstance(box[0], Failure) and box[0].check(LookupFailed)
    assert "CNAME chain too long" in str(box[0].value)


def _logged(events: List[Any], text: str) -> bool:
    return any(text in str(e.get("reason", "")) for e in events)


@pytest.fixture
def dns_events() -> Any:
    events: List[Any] = []

    def observe(event: Any) -> None:
        if event.get("event") == "socks5.dns_failed":
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def test_nxdomain_fails_is_logged_once_and_kept_for_the_negative_ttl(
    dns_events: List[Any],
) -> None:
    h = Harness()
    box = h.lookup("nx.test")
    h.answer(rcode=dns.ENAME, authority=[soa(ttl=60, minimum=30)])
    assert box[0].check(LookupFailed) and box[0].value.reason == "NXDOMAIN"
    assert reply_for_failure(box[0]) is ReplyCode.HOST_UNREACHABLE
    assert [e["name"] for e in dns_events] == ["nx.test"]
    h.reactor.advance(29)
    assert h.lookup("nx.test")[0].value.reason == "NXDOMAIN"
    assert h.pending() == [] and len(dns_events) == 1  # cached, not logged again
    h.reactor.advance(2)
    h.lookup("nx.test")
    assert h.pending() != []


def test_a_huge_negative_ttl_is_bounded() -> None:
    h = Harness()
    h.lookup("nx.test")
    h.answer(rcode=dns.ENAME, authority=[soa(ttl=10**6, minimum=10**6)])
    h.reactor.advance(MAX_NEGATIVE_TTL + 1)
    h.lookup("nx.test")
    assert h.pending() != []


def test_no_address_of_either_family(dns_events: List[Any]) -> None:
    h = Harness()
    box = h.lookup("mail.test")
    h.answer(authority=[soa(ttl=60, minimum=10)])
    assert box[0].value.reason == "no address"
    h.reactor.advance(9)
    h.lookup("mail.test")
    assert h.pending() == []


def test_servfail_fails_is_not_kept_and_warns(dns_events: List[Any]) -> None:
    h = Harness()
    box = h.lookup("broken.test")
    h.answer(rcode=dns.ESERVER)
    assert box[0].value.reason == "SERVFAIL"
    assert reply_for_failure(box[0]) is ReplyCode.HOST_UNREACHABLE
    assert dns_events[0]["log_level"].name == "warn"
    h.lookup("broken.test")
    assert h.pending() != []  # a server's failure is not cached


def test_one_family_answering_is_enough() -> None:
    h = Harness()
    box = h.lookup("v4.test")
    for port, query, server in h.pending():
        if query.queries[0].type == dns.AAAA:
            response = dns.Message(id=query.id, answer=1, rCode=dns.ESERVER)
            response.queries = query.queries
            port.protocol.datagramReceived(response.toStr(), server)
    h.answer([a("v4.test", "192.0.2.1")])
    assert box == [["192.0.2.1"]]


def test_a_silent_server_times_out_within_the_timeout(dns_events: List[Any]) -> None:
    h = Harness(timeout=4.0)
    box = h.lookup("slow.test")
    h.reactor.advance(3.9)
    assert box == []
    h.reactor.advance(0.2)
    assert box[0].check(error.DNSLookupError) and box[0].value.reason == "timeout"
    assert reply_for_failure(box[0]) is ReplyCode.HOST_UNREACHABLE
    assert dns_events[0]["reason"] == "timeout"
    h.reactor.advance(10)
    assert h.reactor.getDelayedCalls() == []  # nothing left behind


def test_a_cname_chain_gets_no_more_time_than_a_name() -> None:
    h = Harness(timeout=4.0)
    box = h.lookup("alias.test", frozenset({4}))
    h.reactor.advance(3.0)
    h.answer([cname("alias.test", "slow.test")])  # slow.test: never answered
    h.reactor.advance(1.01)
    assert box[0].value.reason == "timeout"


def test_a_tcp_server_that_never_accepts_gets_one_attempt_at_a_time() -> None:
    h = Harness("tcp:192.0.2.53", timeout=3.0)
    h.lookup("one.test")
    h.lookup("two.test")
    (attempt,) = h.reactor.tcpClients  # four queries, one connection attempt
    assert attempt[:2] == ("192.0.2.53", 53) and attempt[3] == 3


def test_the_next_server_is_asked_when_one_is_silent_or_fails() -> None:
    h = Harness("udp:192.0.2.53,tcp:192.0.2.54,udp:[2001:db8::53]:5353", timeout=6.0)
    box = h.lookup("v4.test")
    assert {server for _, _, server in h.pending()} == {("192.0.2.53", 53)}
    h.reactor.advance(2.01)  # the first server's share
    # The second one is asked over TCP: the test refuses the connection.
    (connector,) = h.reactor.tcpClients
    assert connector[:2] == ("192.0.2.54", 53)
    connector[2].clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
    assert ("2001:db8::53", 5353) in {server for _, _, server in h.pending()}
    h.answer([a("v4.test", "192.0.2.1")])
    assert box == [["192.0.2.1"]]


def test_nxdomain_from_a_server_is_final() -> None:
    h = Harness("udp:192.0.2.53,udp:192.0.2.54")
    box = h.lookup("nx.test")
    h.answer(rcode=dns.ENAME)
    assert box[0].value.reason == "NXDOMAIN"
    assert h.pending() == []


def test_hosts_and_ip_literals_need_no_server() -> None:
    h = Harness(hosts={"db.internal": ["::1", "10.0.0.7"]})
    assert h.lookup("DB.internal.") == [["::1", "10.0.0.7"]]
    assert h.lookup("192.0.2.5") == [["192.0.2.5"]]
    assert h.pending() == []
    box: List[Any] = []
    h.resolver.lookup("db.internal", frozenset({6})).addBoth(box.append)
    assert box == [["::1"]]


def test_an_unencodable_name_fails_without_asking() -> None:
    h = Harness()
    box = h.lookup("a" * 64 + "\udcff.test")
    assert box[0].check(LookupFailed)
    assert h.pending() == []


def test_without_servers_names_not_in_hosts_go_to_the_fallback() -> None:
    from twisted_socks5.testing import LoopbackResolver

    fallback = LoopbackResolver(v6=False)
    resolver = NamesResolver(
        UDPReactor(), None, {"db.internal": ["10.0.0.7"]}, fallback=fallback
    )
    got: List[str] = []

    class Receiver:
        def resolutionBegan(self, resolution: Any) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            got.append(address.host)

        def resolutionComplete(self) -> None:
            got.append("done")

    resolver.resolveHostName(Receiver(), "db.internal", 80)
    resolver.resolveHostName(Receiver(), "web.test", 80)
    assert got == ["10.0.0.7", "done", "127.0.0.1", "done"]
    assert fallback.asked == ["web.test"]


@pytest.mark.parametrize(
    "spec, denied, expected",
    [
        ("ipv4", [], "127.0.0.1"),
        ("ipv6", [], "::1"),
        ("ipv6", ["::1"], "127.0.0.1"),
        ("ipv6-only", ["::1"], None),
    ],
)
def test_an_upstream_route_asks_for_the_preferred_allowed_address(
    spec: str, denied: List[str], expected: Optional[str]
) -> None:
    from twisted.internet import defer
    from twisted.internet.protocol import Factory

    from twisted_socks5.codec import Address, AddressType
    from twisted_socks5.outbound import DirectConnector, UpstreamConnector
    from twisted_socks5.testing import LoopbackResolver

    asked: List[str] = []

    class Recording(UpstreamConnector):
        def _through(self, address: Address, factory: Any) -> Any:
            asked.append(address.host)
            return defer.succeed(None)

    reactor = UDPReactor()
    local = DirectConnector(
        reactor, 5, resolver=LoopbackResolver(), prefer=FamilyPreference(spec)
    )
    upstream = Recording(reactor, None, local=local)  # type: ignore[arg-type]
    box: List[Any] = []
    upstream.connect(
        Address(AddressType.DOMAIN, "web.test", 80),
        Factory(),
        lambda ip: "deny" if ip in denied else None,
    ).addBoth(box.append)
    if expected is None:
        assert box[0].check(LookupFailed) and asked == []
    else:
        assert asked == [expected]
