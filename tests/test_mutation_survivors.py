"""
Edges the full mutation run on the security core found unheld (see the
"Mutation testing" section of docs/reliability.rst): each test fails on the
mutant named in its docstring.
"""

from __future__ import annotations

import ipaddress

import pytest

from twisted_socks5.codec import Address, AddressType, Command
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.rules import RuleSet, client_allow_list
from twisted_socks5.selfnet import HostAddresses, reached_from_outside, unspecified


def _limits(**kwargs: object) -> ConnectionLimits:
    return ConnectionLimits(lambda: 0.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", [0, 64, 128])
def test_every_ipv6_prefix_length_is_taken(prefix: int) -> None:
    assert _limits(ipv6_client_prefix=prefix).ipv6_client_prefix == prefix


@pytest.mark.parametrize("prefix", [-1, 129])
def test_an_impossible_ipv6_prefix_length_is_refused(prefix: int) -> None:
    with pytest.raises(ValueError):
        _limits(ipv6_client_prefix=prefix)


def test_a_udp_association_never_counts_less_than_its_connection() -> None:
    """``max(0, ...)``: more descriptors per connection than UDP needs."""
    assert _limits(fds_per_connection=10).udp_extra == 0
    assert _limits(fds_per_connection=3).udp_extra > 0


def test_ending_a_check_that_never_started_leaves_nothing_behind() -> None:
    """``checks.get(key, 1)`` as 2 would invent a running check."""
    limits = _limits(auth_checks_per_client=1)
    limits.check_ended("192.0.2.1")
    assert limits.checks == {}
    assert limits.may_check("192.0.2.1")


def test_failures_out_of_the_window_count_as_none() -> None:
    now = [0.0]
    limits = ConnectionLimits(lambda: now[0], auth_failures=3, auth_window=10.0)
    limits.auth_failed("192.0.2.1")
    assert limits._recent_failures("192.0.2.1") == 1
    now[0] = 11.0
    assert limits._recent_failures("192.0.2.1") == 0
    assert limits._recent_failures("192.0.2.1") == 0  # forgotten, still none


def test_the_cache_of_address_texts_holds_4096_then_starts_again() -> None:
    host = HostAddresses(read=lambda: [])
    for i in range(4096):
        assert str(ipaddress.ip_address(0x0A000000 + i)) not in host
    assert "10.0.0.0" in host._seen and len(host._seen) == 4096
    assert "10.0.16.0" not in host  # the 4097th: the cache starts again
    assert list(host._seen) == ["10.0.16.0"]


# Python reads "::1%lo" itself; an empty zone and an IPv4 address with one
# it does not, and the zone is cut off first.
@pytest.mark.parametrize("text", ["::%lo", "::%2", "::%", "0.0.0.0"])
def test_unspecified_with_a_zone_is_still_unspecified(text: str) -> None:
    assert unspecified(text)


@pytest.mark.parametrize("text", ["::1%lo", "::1%", "127.0.0.1%lo", "127.0.0.1"])
def test_loopback_with_a_zone_is_not_outside(text: str) -> None:
    assert not reached_from_outside(text)


def _at(host: str) -> Address:
    return Address(AddressType.DOMAIN, host, 80)


def test_a_resolved_address_is_checked_with_the_user_known() -> None:
    """
    ``user_known=False`` at resolution: a rule on the user would be left
    undecided and the next rule would answer instead.
    """
    rules = RuleSet.parse(
        "deny user bob to 10.0.0.0/8\nallow to 10.0.0.0/8\ndefault deny"
    )
    bob = rules.check_resolved(
        "192.0.2.1", "bob", Command.CONNECT, _at("intranet"), "10.0.0.1"
    )
    alice = rules.check_resolved(
        "192.0.2.1", "alice", Command.CONNECT, _at("intranet"), "10.0.0.1"
    )
    assert bob.final and not bob.allowed
    assert alice.final and alice.allowed


def test_a_public_slash_8_is_a_client_list_and_a_slash_7_is_not() -> None:
    """The widest public list that counts is the /8 itself (``>=``)."""
    rules = RuleSet.parse("allow from 11.0.0.0/8\nallow from 12.0.0.0/7\ndefault deny")
    assert client_allow_list(rules) == [ipaddress.ip_network("11.0.0.0/8")]
    wide6 = RuleSet.parse("allow from 2a00::/32\nallow from 2a02::/31")
    assert client_allow_list(wide6) == [ipaddress.ip_network("2a00::/32")]
