"""
The open-relay guard of ``twistd socks5``: decided from the rules over the
whole IPv4 and IPv6 address space, not from a few probe addresses.
"""

from __future__ import annotations

import ipaddress
from typing import Any, List

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rules import ips, networks, queries

from twisted_socks5.addresses import parse_ip
from twisted_socks5.codec import Command
from twisted_socks5.rules import (
    Rule,
    RuleSet,
    client_allow_list,
    open_relay_clients,
)
from twisted_socks5.tap import Options


def start(tmp_path: Any, rules: str, *args: str) -> Options:
    """Parse the options as ``twistd socks5`` does, listening beyond loopback."""
    path = tmp_path / "rules"
    path.write_text(rules)
    options = Options()
    options.parseOptions(["--listen", "tcp:1080", "--rules", str(path), *args])
    return options


OPEN = [
    # Denies a few networks, ends in allow: everyone else is welcome.
    "deny from 198.51.100.0/24\ndefault allow\n",
    "deny from 198.51.100.0/24, 2001:db8::/32\ndefault allow\n",
    # Shuts out IPv4 clients only: an open relay on IPv6.
    "allow from 192.168.0.0/16\ndeny from 0.0.0.0/0\ndefault allow\n",
    # ... and the reverse.
    "allow from fd00::/8\ndeny from ::/0\ndefault allow\n",
    # A client list that names everyone is no list.
    "allow from 0.0.0.0/0, ::/0\n",
    "allow from 0.0.0.0/1, 128.0.0.0/1, ::/1, 8000::/1\n",
    # Anonymous clients may use these.
    "allow user -\n",
    "allow port 80\ndefault deny\n",
    "allow to *.com\ndefault deny\n",
    "deny to 10.0.0.0/8\ndefault allow\n",
    "allow from 10.0.0.0/8\nallow command connect\n",
]

CLOSED = [
    "allow from 10.0.0.0/8\ndefault deny\n",
    "allow from 10.0.0.0/8\n",
    "allow from 2001:db8::/48\ndefault deny\n",  # IPv6 only
    "allow from 192.0.2.0/24, 2001:db8:1::/48\ndeny to 10.0.0.0/8\n",
    "allow from 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, fc00::/7\n",
    "deny from 0.0.0.0/0, ::/0\ndefault allow\n",
    # Only authenticated users may go anywhere: anonymous clients cannot.
    "allow user alice, *\ndefault deny\n",
    "allow from 192.0.2.0/24\nallow user *\ndefault deny\n",
]


@pytest.mark.parametrize("rules", OPEN)
def test_open_rules_refuse_to_start(tmp_path: Any, rules: str) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="open proxy") as caught:
        start(tmp_path, rules)
    assert "outside 'allow from' networks" in str(caught.value)
    # The ways out still work:
    start(tmp_path, rules, "--allow-open-relay")
    start(tmp_path, rules, "--auth", "memory:a:b")


@pytest.mark.parametrize("rules", CLOSED)
def test_client_allow_lists_start(tmp_path: Any, rules: str) -> None:
    start(tmp_path, rules)


def test_the_message_names_the_open_range(tmp_path: Any) -> None:
    from twisted.python import usage

    rules = "allow from 192.168.0.0/16\ndeny from 0.0.0.0/0\ndefault allow\n"
    with pytest.raises(usage.UsageError, match=r"clients from :: to ::fffe:"):
        start(tmp_path, rules)


def test_wide_public_networks_are_no_client_list() -> None:
    rules = RuleSet.parse(
        "allow from 0.0.0.0/0, 10.0.0.0/8, 12.0.0.0/7, fc00::/7, 2000::/3, 2001::/16,"
        " 2001:db8::/32\n"
        "deny from 192.0.2.0/24\n"
    )
    # A global IPv6 /16 is a good part of the IPv6 Internet: no client list.
    assert [str(n) for n in client_allow_list(rules)] == [
        "10.0.0.0/8",
        "fc00::/7",
        "2001:db8::/32",
    ]


def test_a_global_ipv6_slash_16_is_an_open_relay(tmp_path: Any) -> None:
    from twisted.python import usage

    with pytest.raises(usage.UsageError, match="open proxy"):
        start(tmp_path, "allow from 2001::/16\ndefault deny\n")
    start(tmp_path, "allow from 2001:db8::/32\ndefault deny\n")


# --------------------------------------------------------------------------
# Against brute force

anonymous_rules = st.builds(
    Rule,
    allow=st.booleans(),
    clients=st.none() | st.lists(networks(), min_size=1, max_size=3).map(tuple),
    ports=st.none() | st.just(((80, 80),)),
    commands=st.none() | st.just(frozenset([Command.CONNECT])),
    users=st.none() | st.sampled_from([("-",), ("alice",), ("*", "-")]),
)
rule_sets = st.builds(
    RuleSet, st.lists(anonymous_rules, max_size=6), default_allow=st.booleans()
)


def _inside(ip: Any, nets: List[Any]) -> bool:
    return any(ip in net for net in nets if net.version == ip.version)


@settings(max_examples=300, deadline=None)  # slow under coverage (mutation runs)
@given(
    rule_sets, st.lists(ips, min_size=1, max_size=8), st.lists(queries(), max_size=6)
)
def test_the_guard_agrees_with_brute_force(
    rules: RuleSet, clients: List[Any], requests: List[Any]
) -> None:
    """
    Whenever some sampled client outside the allow-list gets some anonymous
    request allowed, the guard says the relay is open; whatever range it
    names really is outside the list and allowed, from end to end.
    """
    listed = client_allow_list(rules)
    # The edges of every network are where answers change: sample them too.
    for rule in rules.rules:
        for net in rule.clients or ():
            clients += [net.network_address, net.broadcast_address]
    found = open_relay_clients(rules)
    for client in map(parse_ip, clients):
        if _inside(client, listed):
            continue
        for _, _, command, destination, resolved in requests:
            decision = rules.check_resolved(
                client, None, command, destination, resolved
            )
            if decision.allowed:
                assert found is not None, (client, command, destination, resolved)
    if found is not None:
        first, last = found
        assert first <= last
        for ip in (first, last):
            assert not _inside(ip, listed)
            assert rules.check_anonymous_client(ip).allowed
        assert not (first.version == 6 and first.ipv4_mapped)


def test_every_ipv6_piece_is_checked() -> None:
    """The IPv6 space is checked, IPv4-mapped addresses as IPv4."""
    rules = RuleSet.parse("allow from ::ffff:10.0.0.0/104\ndeny from 0.0.0.0/0\n")
    assert open_relay_clients(rules) is None
    rules = RuleSet.parse("allow from 10.0.0.0/8\ndeny from 0.0.0.0/0\ndefault allow\n")
    found = open_relay_clients(rules)
    assert found == (
        ipaddress.ip_address("::"),
        ipaddress.ip_address("::fffe:ffff:ffff"),
    )


def test_sighup_cannot_turn_an_exposed_server_into_an_open_relay(
    tmp_path: Any,
) -> None:
    """The guard runs on every reload: an open rules file keeps the old rules."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_socks5.tap import build_factory

    options = start(tmp_path, "allow from 10.0.0.0/8\ndefault deny\n")
    factory = build_factory(options, MemoryReactorClock())
    path = tmp_path / "rules"
    assert path.exists()
    path.write_text("deny to self\ndefault allow\n")
    factory.reload()
    assert not options.policy.check_client("198.51.100.7").allowed
    # A closed file still reloads.
    path.write_text("allow from 10.0.0.0/8, 192.168.0.0/16\ndefault deny\n")
    factory.reload()
    assert options.policy.check_client("192.168.1.1").allowed


def test_reload_of_a_loopback_server_is_not_guarded(tmp_path: Any) -> None:
    """On loopback only an open rule set is fine, at start and on reload."""
    path = tmp_path / "rules"
    path.write_text("allow from 10.0.0.0/8\ndefault deny\n")
    options = Options()
    options.parseOptions(["--rules", str(path)])
    path.write_text("default allow\n")
    options.policy.reload()
    assert options.policy.check_client("198.51.100.7").allowed


# SOCKS4 has no password: where one is required, only the explicit
# 'allow from NETWORKS protocol socks4' rules let its clients in, and the
# guard judges those.
SOCKS4_OPEN = [
    "allow from 0.0.0.0/0 protocol socks4\n",
    "allow from 10.0.0.0/8 protocol socks4\nallow from ::/0 protocol socks4\n",
    "allow from 0.0.0.0/0, ::/0 protocol socks4, socks5 to 192.0.2.0/24\n",
]
SOCKS4_CLOSED = [
    "allow from 10.0.0.0/8 protocol socks4\n",
    # Without the protocol named, no SOCKS4 client gets in (nor by default).
    "allow from 0.0.0.0/0, ::/0\ndefault allow\n",
    "allow user *\n",
]


@pytest.mark.parametrize("rules", SOCKS4_OPEN)
def test_socks4_without_a_password_is_an_open_relay(tmp_path: Any, rules: str) -> None:
    from twisted.python import usage

    password = ["--auth", "memory:alice:pw"]
    with pytest.raises(usage.UsageError, match="SOCKS4 clients from"):
        start(tmp_path, rules, *password, "--protocols", "socks5,socks4")
    start(tmp_path, rules, *password)  # SOCKS5 only: a password for everyone


@pytest.mark.parametrize("rules", SOCKS4_CLOSED)
def test_socks4_with_explicit_client_lists_starts(tmp_path: Any, rules: str) -> None:
    start(tmp_path, rules, "--auth", "memory:alice:pw", "--protocols", "socks4,socks5")


def test_socks4_without_rules_and_with_a_password_starts() -> None:
    options = Options()
    options.parseOptions(
        ["--listen", "tcp:1080", "--auth", "memory:a:b", "--protocols", "socks4"]
    )


def test_socks4_with_no_password_and_no_rules_is_an_open_relay() -> None:
    from twisted.python import usage

    options = Options()
    with pytest.raises(usage.UsageError, match="anyone may use it"):
        options.parseOptions(["--listen", "tcp:1080", "--protocols", "socks4"])


def test_sighup_cannot_open_socks4_either(tmp_path: Any) -> None:
    from twisted.internet.testing import MemoryReactorClock

    from twisted_socks5.tap import build_factory

    rules = "allow from 10.0.0.0/8 protocol socks4\n"
    options = start(tmp_path, rules, "--auth", "memory:a:b", "--protocols", "socks4")
    factory = build_factory(options, MemoryReactorClock())
    (tmp_path / "rules").write_text("allow from 0.0.0.0/0 protocol socks4\n")
    factory.reload()
    assert options.policy.rules == RuleSet.parse(rules)
    # Password users may go anywhere: no SOCKS4 client outside 10/8 can.
    closed = "allow from 10.0.0.0/8 protocol socks4\ndefault allow\n"
    (tmp_path / "rules").write_text(closed)
    factory.reload()
    assert options.policy.rules == RuleSet.parse(closed)
