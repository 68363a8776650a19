"""
The proxy host as a destination: unspecified addresses, the host's own
addresses (getifaddrs, /proc/net), and the rules' ``self`` network.
"""

from __future__ import annotations

import ipaddress
import sys
from typing import Any, List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_socks5.codec import Address, Command
from twisted_socks5.rules import Rule, RulesError, RuleSet
from twisted_socks5.selfnet import (
    HostAddresses,
    getifaddrs_addresses,
    interface_addresses,
    parse_proc_fib_trie,
    parse_proc_if_inet6,
    proc_addresses,
    unspecified,
)

CONNECT = Command.CONNECT


@pytest.mark.parametrize(
    "ip",
    ["0.0.0.0", "0.1.2.3", "0.255.255.255", "::", "::ffff:0.0.0.0", "::ffff:0.1.2.3"],
)
def test_unspecified(ip: str) -> None:
    assert unspecified(ip)
    assert unspecified(ipaddress.ip_address(ip))


@pytest.mark.parametrize(
    "ip", ["1.0.0.0", "127.0.0.1", "10.0.0.0", "::1", "::0.0.0.1", "::ffff:1.0.0.0"]
)
def test_specified(ip: str) -> None:
    assert not unspecified(ip)
    assert not unspecified(ipaddress.ip_address(ip))


@given(st.ip_addresses())
def test_unspecified_agrees_on_text_and_objects(ip: Any) -> None:
    plain = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
    expected = plain.is_unspecified or (plain.version == 4 and plain in ZERO_NET)
    assert unspecified(str(ip)) == unspecified(ip) == expected


ZERO_NET = ipaddress.ip_network("0.0.0.0/8")

FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 192.0.2.2
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
     |-- 192.0.2.2
        /32 host LOCAL
"""

IF_INET6 = """\
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 02 40 00 80     eth0
garbage
"""


def test_proc_parsers() -> None:
    assert parse_proc_fib_trie(FIB_TRIE) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("192.0.2.2"),
    ]
    assert parse_proc_if_inet6(IF_INET6) == [
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("fd00::2"),
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")
def test_both_readers_agree_on_this_host() -> None:
    found = set(getifaddrs_addresses())
    assert ipaddress.ip_address("127.0.0.1") in found
    assert found == set(proc_addresses())
    assert set(interface_addresses()) == found


def test_a_host_that_cannot_be_read_is_loopback_and_unspecified() -> None:
    def broken() -> List[Any]:
        raise OSError("no")

    with pytest.raises(OSError):
        HostAddresses(read=broken)
    host = HostAddresses(read=lambda: [])
    assert "127.9.9.9" in host and "::1" in host and "0.0.0.0" in host
    assert "::ffff:127.0.0.1" in host and "::" in host
    assert "192.0.2.2" not in host and "::2" not in host


def test_host_addresses_reload() -> None:
    seen = [ipaddress.ip_address("192.0.2.2")]
    host = HostAddresses(read=lambda: list(seen))
    assert "192.0.2.2" in host and ipaddress.ip_address("192.0.2.2") in host
    assert "::ffff:192.0.2.2" in host
    seen[:] = [ipaddress.ip_address("2001:db8::2")]
    host.reload()
    assert "192.0.2.2" not in host and "2001:db8::2" in host


# --------------------------------------------------------------------------
# ``self`` in the rules

HOST = HostAddresses(read=lambda: [ipaddress.ip_address("192.0.2.10")])


def at(host: str, port: int = 80) -> Address:
    return Address.from_host(host, port)


@pytest.mark.parametrize(
    ("resolved", "is_self"),
    [
        ("192.0.2.10", True),
        ("::ffff:192.0.2.10", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("0.0.0.0", True),
        ("::", True),
        ("192.0.2.11", False),
        ("10.0.0.1", False),
        ("::2", False),
    ],
)
def test_deny_to_self(resolved: str, is_self: bool) -> None:
    rules = RuleSet.parse("deny to self\ndefault allow\n", "r", HOST)
    by_ip = rules.check_request("10.0.0.1", None, CONNECT, at(resolved))
    assert by_ip.final and by_ip.allowed is not is_self
    name = Address.from_host("www.example", 80)
    by_name = rules.check_request("10.0.0.1", None, CONNECT, name)
    assert not by_name.final
    final = rules.check_resolved("10.0.0.1", None, CONNECT, name, resolved)
    assert final.allowed is not is_self
    if is_self:
        assert final.rule == "r:1: deny to self"


def test_allow_to_self_is_marked_on_the_decision() -> None:
    rules = RuleSet.parse("allow to self port 53\nallow to 10.0.0.0/8\n", "r", HOST)
    decision = rules.check_request("10.0.0.1", None, CONNECT, at("127.0.0.1", 53))
    assert decision.allowed and decision.names_self
    other = rules.check_request("10.0.0.1", None, CONNECT, at("10.0.0.1", 53))
    assert other.allowed and not other.names_self


def test_self_is_a_keyword_in_any_case_and_renders() -> None:
    rules = RuleSet.parse("deny to SELF, 10.0.0.0/8, .example\n", "r", HOST)
    (rule,) = rules.rules
    assert rule.to_self and str(rule) == "deny to self, 10.0.0.0/8, .example"
    assert RuleSet.parse(rules.render(), "r", HOST) == rules
    assert Rule(False, to_self=True).has_destination


def test_self_in_from_is_an_error() -> None:
    with pytest.raises(RulesError, match="invalid IP network 'self'"):
        RuleSet.parse("deny from self\n")


def test_rules_without_self_read_no_interfaces() -> None:
    assert RuleSet.parse("deny to 10.0.0.0/8\n").host is None
    assert RuleSet.parse("deny to self\n").host is not None


@given(st.ip_addresses() | st.sampled_from(["127.1.2.3", "::ffff:127.0.0.1", "::1"]))
def test_membership_agrees_with_the_networks(ip: Any) -> None:
    ip = ipaddress.ip_address(ip)
    plain = ip.ipv4_mapped if ip.version == 6 and ip.ipv4_mapped else ip
    expected = any(
        plain in net for net in HOST.networks if net.version == plain.version
    )
    assert (ip in HOST) == (str(ip) in HOST) == (str(ip) in HOST) == expected
