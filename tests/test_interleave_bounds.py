"""
A CONNECT by name tries at most ``per_family`` addresses of each family,
alternating families from the first answer's: a name with many answers
holds a bounded number of descriptors.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address

from twisted_socks5.connect import interleave_families


def _v4(n: int) -> IPv4Address:
    return IPv4Address("TCP", f"192.0.2.{n}", 80)


def _v6(n: int) -> IPv6Address:
    return IPv6Address("TCP", f"2001:db8::{n}", 80)


def test_at_most_per_family_of_each_family_alternating() -> None:
    answers = [_v6(1), _v6(2), _v6(3), _v4(1), _v4(2), _v4(3)]
    assert interleave_families(answers, 2) == [_v6(1), _v4(1), _v6(2), _v4(2)]


def test_one_family_alone_is_cut_at_per_family() -> None:
    assert interleave_families([_v4(n) for n in range(1, 6)], 2) == [_v4(1), _v4(2)]
    assert interleave_families([_v4(1)], 2) == [_v4(1)]
