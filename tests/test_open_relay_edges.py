"""
The open-relay analysis at the edges of the address space: a range that
opens after a denied network, and the very last address of each family,
are found (an analysis that missed them would let ``twistd socks5`` start
an open relay).  In memory.
"""

from __future__ import annotations

import ipaddress

import pytest

from twisted_socks5.rules import RuleSet, open_relay_clients


def _all_but_last(space: str) -> str:
    """Networks covering every address of ``space`` but its last one."""
    top = ipaddress.ip_network(space)
    nets = []
    start = int(top.network_address)
    make = type(top.network_address)
    for prefix in range(1, top.max_prefixlen + 1):
        nets.append(f"{make(start)}/{prefix}")
        start += 1 << (top.max_prefixlen - prefix)
    return ", ".join(nets)


@pytest.mark.parametrize(
    ("rules", "first", "last"),
    [
        (
            "deny from 0.0.0.0/1\ndeny from ::/0\ndefault allow\n",
            "128.0.0.0",
            "255.255.255.255",
        ),
        (
            "deny from 0.0.0.0/0\ndeny from ::/1\ndefault allow\n",
            "8000::",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ),
        (
            f"deny from {_all_but_last('0.0.0.0/0')}\ndeny from ::/0\ndefault allow\n",
            "255.255.255.255",
            "255.255.255.255",
        ),
        (
            f"deny from 0.0.0.0/0\ndeny from {_all_but_last('::/0')}\ndefault allow\n",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ),
    ],
    ids=["after-a-network", "ipv6-after-a-network", "last-ipv4", "last-ipv6"],
)
def test_the_open_range_is_found(rules: str, first: str, last: str) -> None:
    found = open_relay_clients(RuleSet.parse(rules))
    assert found == (ipaddress.ip_address(first), ipaddress.ip_address(last))


def test_rules_that_shut_out_every_client_leave_none_open() -> None:
    rules = "deny from 0.0.0.0/0\ndeny from ::/0\ndefault allow\n"
    assert open_relay_clients(RuleSet.parse(rules)) is None
