"""
``--outgoing`` without the network: how a set picks a source, what the
command line accepts and refuses, and the connect calls on a MemoryReactor.
"""

from __future__ import annotations

import ipaddress
from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_plugin import parse
from twisted.internet import protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from twisted_socks5.codec import Address
from twisted_socks5.outbound import DirectConnector
from twisted_socks5.outgoing import OutgoingAddresses, check_on_host, parse_item
from twisted_socks5.tap import build_factory, describe_routes


def picks(sources: OutgoingAddresses, family: int, n: int, **kw: Any) -> List[Any]:
    return [sources.pick(family, **kw) for _ in range(n)]


def test_none_takes_the_first_address_of_the_family() -> None:
    sources = OutgoingAddresses(["127.0.0.2", "::1", "127.0.0.3"])
    assert picks(sources, 4, 3) == [("127.0.0.2", False)] * 3
    assert sources.pick(6) == ("::1", False)


def test_round_robin_turns_per_family() -> None:
    sources = OutgoingAddresses(["127.0.0.2", "::1", "127.0.0.3"], "round-robin")
    assert [s[0] for s in picks(sources, 4, 2)] == ["127.0.0.2", "127.0.0.3"]
    assert sources.pick(6) == ("::1", False)
    assert [s[0] for s in picks(sources, 4, 3)] == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.2",
    ]


def test_a_family_the_set_lacks_is_the_systems_choice() -> None:
    assert OutgoingAddresses(["127.0.0.2"], "round-robin").pick(6) is None
    assert OutgoingAddresses(["::1"], "random").pick(4) is None


def test_same_as_listen_only_uses_addresses_of_the_set() -> None:
    sources = OutgoingAddresses(
        ["127.0.0.2", "127.0.0.3", "2001:db8:1::/64"], "same-as-listen"
    )
    assert sources.pick(4, "127.0.0.3") == ("127.0.0.3", False)
    # Not in the set (a PROXY header may claim any address): the first.
    assert sources.pick(4, "127.0.0.9") == ("127.0.0.2", False)
    assert sources.pick(4, "not an address") == ("127.0.0.2", False)
    # The other family's listening address cannot be an IPv4 source.
    assert sources.pick(4, "2001:db8:1::7") == ("127.0.0.2", False)
    assert sources.pick(6, "2001:db8:1::7") == ("2001:db8:1::7", True)
    assert sources.pick(6, "2001:db8:2::7")[1] is True  # type: ignore[index]


@given(st.integers(min_value=64, max_value=127))
def test_a_prefix_gives_random_addresses_inside_it(length: int) -> None:
    network = ipaddress.IPv6Network(f"2001:db8::/{length}")
    sources = OutgoingAddresses([str(network)])
    address, freebind = sources.pick(6)  # type: ignore[misc]
    assert freebind
    assert ipaddress.IPv6Address(address) in network
    assert ipaddress.IPv6Address(address) != network.network_address


def test_a_64_prefix_does_not_repeat() -> None:
    sources = OutgoingAddresses(["2001:db8:1::/64"])
    assert len({sources.pick(6) for _ in range(50)}) == 50


@pytest.mark.parametrize(
    ("text", "item"),
    [
        ("127.0.0.2", "127.0.0.2"),
        ("::ffff:127.0.0.2", "127.0.0.2"),  # IPv4-mapped: an IPv4 source
        (" ::1 ", "::1"),
        ("2001:db8::1/128", "2001:db8::1"),
        ("2001:db8:1::/64", ipaddress.IPv6Network("2001:db8:1::/64")),
    ],
)
def test_entries(text: str, item: Any) -> None:
    assert parse_item(text) == item


@pytest.mark.parametrize(
    "text", ["eu", "127.0.0.2/8", "::ffff:0:0/104", "1.2.3.4.5", "2001:db8::/129"]
)
def test_bad_entries(text: str) -> None:
    with pytest.raises(ValueError):
        parse_item(text)


def test_an_unknown_rotation_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown rotation"):
        OutgoingAddresses(["127.0.0.2"], "sticky")


# --------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--outgoing", "192.0.2.1"], "192.0.2.1 is not an address of this host"),
        (["--outgoing", "127.0.0.2,nonsense"], "does not appear to be an IPv4"),
        (["--outgoing", ""], "no address"),
        (["--outgoing", "127.0.0.2", "--outgoing", "::1"], "(default) given twice"),
        (["--outgoing", "eu=127.0.0.2", "--outgoing", "eu=::1"], "eu given twice"),
        (["--outgoing", "e u=127.0.0.2"], "bad route name 'e u'"),
        (["--outgoing", "direct=127.0.0.2"], "'direct' is the default set"),
        (
            ["--outgoing", "eu=127.0.0.2", "--upstream", "eu=socks5://127.0.0.1:1"],
            "name one route twice",
        ),
        (["--outgoing-rotation", "sticky"], "--outgoing-rotation: unknown rotation"),
    ],
)
def test_bad_outgoing_options(args: List[str], message: str) -> None:
    with pytest.raises(usage.UsageError) as caught:
        parse(*args)
    assert message in str(caught.value)


def test_a_via_naming_no_route_names_both_kinds(tmp_path: Any) -> None:
    rules = tmp_path / "rules"
    rules.write_text("allow via us\n")
    with pytest.raises(usage.UsageError, match="--outgoing us=ADDRESS"):
        parse("--rules", str(rules), "--outgoing", "eu=127.0.0.2")
    parse("--rules", str(rules), "--outgoing", "us=127.0.0.2")


def test_the_bind_test_reports_the_first_unusable_entry() -> None:
    assert check_on_host(["127.0.0.2", "::ffff:127.0.0.3"]) is None
    assert "192.0.2.9 is not an address" in str(
        check_on_host(["127.0.0.2", "192.0.2.9"])
    )


def test_the_factory_routes_share_the_default_set() -> None:
    reactor = MemoryReactorClock()
    options = parse(
        "--outgoing", "127.0.0.2,127.0.0.3", "--outgoing", "eu=127.0.0.5",
        "--outgoing-rotation", "round-robin",
    )  # fmt: skip
    factory = build_factory(options, reactor)
    default = factory.connector
    assert isinstance(default, DirectConnector)
    assert factory.routes["direct"] is default  # one set, one rotation
    assert default.outgoing is not None
    assert default.outgoing.rotation == "round-robin"
    assert factory.outgoing_for(None) is default.outgoing
    assert factory.outgoing_for("eu") is factory.routes["eu"].outgoing  # type: ignore[attr-defined]
    assert factory.outgoing_for("eu").describe() == "127.0.0.5"  # type: ignore[union-attr]


def test_udp_through_an_upstream_route_uses_the_direct_set() -> None:
    reactor = MemoryReactorClock()
    options = parse(
        "--outgoing", "127.0.0.2", "--upstream", "socks5://127.0.0.1:1081",
        "--upstream", "tor=socks5://127.0.0.1:9050",
    )  # fmt: skip
    factory = build_factory(options, reactor)
    direct = factory.routes["direct"]
    assert direct is not factory.connector
    assert factory.outgoing_for(None) is direct.outgoing  # type: ignore[attr-defined]
    assert factory.outgoing_for("tor") is direct.outgoing  # type: ignore[attr-defined]


def test_without_outgoing_nothing_is_set() -> None:
    factory = build_factory(parse(), MemoryReactorClock())
    assert factory.outgoing_for(None) is None
    assert getattr(factory.connector, "outgoing", None) is None


def test_the_start_up_line_names_the_sets() -> None:
    assert describe_routes({}, {None: ["127.0.0.2"], "eu": ["127.0.0.5", "::1"]}) == (
        "direct from 127.0.0.2, eu from 127.0.0.5,::1"
    )
    assert describe_routes({None: "socks5://h:1"}, {None: ["127.0.0.2"]}) == (
        "default via socks5://h:1, direct from 127.0.0.2"
    )


# --------------------------------------------------------------------------
# Reactors without file descriptors keep connectTCP, with the source


@pytest.mark.parametrize("fast", [False, True])
def test_memory_reactor_connects_from_the_source(fast: bool) -> None:
    reactor = MemoryReactorClock()
    connector = DirectConnector(
        reactor, outgoing=OutgoingAddresses(["127.0.0.2", "::1"], "round-robin")
    )
    factory = protocol.Factory.forProtocol(protocol.Protocol)
    factory.fast_connect = fast  # type: ignore[attr-defined]
    connector.connect(Address.from_host("127.0.0.1", 80), factory)
    connector.connect(Address.from_host("::1", 80), factory)
    assert [call[4] for call in reactor.tcpClients] == [
        ("127.0.0.2", 0),
        ("::1", 0),
    ]


def test_without_ip_freebind_a_prefix_is_refused_at_start(monkeypatch: Any) -> None:
    from twisted_socks5 import outgoing

    monkeypatch.setattr(outgoing, "IP_FREEBIND", None)
    problem = check_on_host(["127.0.0.2", "2001:db8:1::/64"])
    assert problem == (
        "2001:db8:1::/64: cannot bind an address of the prefix "
        "(IP_FREEBIND is Linux only)"
    )
