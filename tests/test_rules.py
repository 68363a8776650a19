"""
Tests for the access rules engine: the file format, each condition, first
match wins, the default action, the two-step decision for domain names,
IPv4-mapped addresses, and Hypothesis properties (the parser fails only with
RulesError, rendering round-trips, a provisional or early answer never
contradicts the final one, an allow-list never lets an outside address out).
"""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from twisted_socks5.addresses import parse_ip
from twisted_socks5.codec import NULL_ADDRESS, Address, AddressType, Command
from twisted_socks5.outbound import first_allowed
from twisted_socks5.replies import PolicyDenied
from twisted_socks5.rules import (
    AllowAll,
    Decision,
    IPolicy,
    Rule,
    RulesError,
    RuleSet,
    name_forms,
    normalise_network,
)
from twisted_socks5.rules.rule import PROTOCOL_WORDS

CONNECT = Command.CONNECT
BIND = Command.BIND
UDP = Command.UDP_ASSOCIATE
CLIENT = "192.0.2.1"


def at(host: str, port: int = 80) -> Address:
    """A destination as a client would send it (IP literal or name)."""
    return Address.from_host(host, port)


def request(
    rules: RuleSet,
    host: str,
    port: int = 80,
    *,
    client: str = CLIENT,
    user: Optional[str] = None,
    command: Command = CONNECT,
) -> Decision:
    return rules.check_request(client, user, command, at(host, port))


def allowed(rules: RuleSet, host: str, **kwargs: Any) -> bool:
    """The final answer for an IP destination."""
    decision = request(rules, host, **kwargs)
    assert decision.final
    return decision.allowed


# --------------------------------------------------------------------------
# Interface


def test_both_policies_provide_ipolicy() -> None:
    assert verifyObject(IPolicy, AllowAll())
    assert verifyObject(IPolicy, RuleSet.parse("allow"))


def test_allow_all() -> None:
    policy = AllowAll()
    for decision in (
        policy.check_client("203.0.113.1"),
        policy.check_request("203.0.113.1", None, CONNECT, at("127.0.0.1")),
        policy.check_resolved("::1", "u", UDP, at("localhost"), "127.0.0.1"),
    ):
        assert decision.allowed and decision.final
    assert "allowed" in policy.describe()


def test_decision_str() -> None:
    assert str(Decision(True, "x:1: allow")) == "allowed by x:1: allow"
    assert str(Decision(False, "x:2: deny")) == "denied by x:2: deny"
    assert str(Decision(True, "depends on x:1", False)) == "undecided (depends on x:1)"


# --------------------------------------------------------------------------
# Parsing: accepted lines and their canonical form


@pytest.mark.parametrize(
    ("line", "canonical"),
    [
        ("allow", "allow"),
        ("deny", "deny"),
        ("DENY FROM 10.0.0.0/8", "deny from 10.0.0.0/8"),
        ("allow from 10.0.0.0/8,2001:db8::/32", "allow from 10.0.0.0/8, 2001:db8::/32"),
        ("allow from 10.0.0.0/8 , 10.1.0.0/16", "allow from 10.0.0.0/8, 10.1.0.0/16"),
        ("allow from 10.0.0.0/8 ,10.1.0.0/16", "allow from 10.0.0.0/8, 10.1.0.0/16"),
        ("allow to 1.2.3.4", "allow to 1.2.3.4/32"),
        ("allow to ::1", "allow to ::1/128"),
        ("allow to ::ffff:10.0.0.0/104", "allow to 10.0.0.0/8"),
        ("allow to ::ffff:0:0/96", "allow to 0.0.0.0/0"),
        ("allow to ::ffff:127.0.0.1", "allow to 127.0.0.1/32"),
        ("allow to example.com, 10.0.0.0/8", "allow to 10.0.0.0/8, example.com"),
        ("allow to Example.COM.", "allow to example.com"),
        ("allow to *.Example.com", "allow to *.example.com"),
        ("allow to .example.com", "allow to .example.com"),
        ("allow to *.Bücher.de", "allow to *.xn--bcher-kva.de"),
        ("allow to my_host-1.lan", "allow to my_host-1.lan"),
        ("allow port 80,443, 1000-2000", "allow port 80, 443, 1000-2000"),
        ("allow port 0-0, 65535-65535", "allow port 0, 65535"),
        ("allow port 080", "allow port 80"),
        ("allow port 00-0000065535", "allow port 0-65535"),
        ("allow command UDP,connect", "allow command connect, udp"),
        ("allow command bind", "allow command bind"),
        ("allow user alice,*,-", "allow user alice, *, -"),
        ("allow user Alice", "allow user Alice"),
        (
            "deny user - port 25 command connect to 1.2.3.0/24 from ::/0",
            "deny from ::/0 to 1.2.3.0/24 port 25 command connect user -",
        ),
        ("allow to example.com# comment", "allow to example.com"),
        ("\tallow   to   example.com   # comment\r", "allow to example.com"),
    ],
)
def test_parse_canonical(line: str, canonical: str) -> None:
    rules = RuleSet.parse(line)
    assert [str(rule) for rule in rules.rules] == [canonical]
    # The canonical form parses to the same rule.
    assert RuleSet.parse(canonical).rules == rules.rules


def test_comments_and_blank_lines_ignored() -> None:
    text = "# header\n\n   \n  # indented comment\nallow from 10.0.0.0/8\n#\n"
    rules = RuleSet.parse(text, "t.conf")
    assert len(rules.rules) == 1
    assert rules.rules[0].line == 5
    assert rules.rules[0].description == "t.conf:5: allow from 10.0.0.0/8"


def test_empty_file_denies_everything() -> None:
    rules = RuleSet.parse("", "empty.conf")
    decision = request(rules, "1.2.3.4")
    assert not decision.allowed and decision.final
    assert decision.rule == "empty.conf: default deny (no rule matched)"


# --------------------------------------------------------------------------
# Parsing: errors name the line


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("permit", "expected 'allow', 'deny', 'limit' or 'default', not 'permit'"),
        ("allow form 10.0.0.0/8", "unknown condition 'form'"),
        ("allow from", "'from' needs a value"),
        ("allow to 10.0.0.0/8 port", "'port' needs a value"),
        ("allow from 10.0.0.1/8", "host bits set (did you mean 10.0.0.0/8?)"),
        ("allow from example.com", "invalid IP network 'example.com'"),
        ("allow from 10.0.0.0/33", "invalid IP network"),
        ("allow from ::1/129", "invalid IP network"),
        ("allow to 10.0.0.0/8 ::1/128", "unknown condition '::1/128'"),
        ("allow to 10.0.0.0/8,", "empty item in the list after 'to'"),
        ("allow to , 10.0.0.0/8", "empty item"),
        ("allow to a.com,,b.com", "empty item"),
        ("allow to 300.1.2.3", "invalid IP network"),
        ("allow to 10.0.0", "invalid IP network"),
        ("allow to 1e100:", "invalid IP network"),
        ("allow to foo*.example.com", "invalid host pattern"),
        ("allow to *", "invalid host pattern"),
        ("allow to *.", "invalid host pattern"),
        ("allow to .", "invalid IP network"),
        ("allow to a..b", "invalid host pattern"),
        ("allow to *.*.example.com", "invalid host pattern"),
        ("allow to exa$mple.com", "invalid host pattern"),
        ("allow to " + "a" * 64 + ".com", "invalid host pattern"),
        ("allow port 65536", "invalid port '65536'"),
        ("allow port " + "9" * 5000, "invalid port"),
        ("allow port 100000", "invalid port '100000'"),  # six digits, small head
        ("allow port 0000100000", "invalid port '0000100000'"),
        ("allow port 80-", "invalid port ''"),
        ("allow port -1", "invalid port ''"),
        ("allow port 1-2-3", "invalid port '2-3'"),
        ("allow port 2000-1000", "empty port range '2000-1000'"),
        ("allow port http", "invalid port 'http'"),
        ("allow port ８０", "invalid port"),
        ("allow command resolve", "unknown command 'resolve'"),
        ("allow command udp_associate", "unknown command"),
        ("allow to a.com to b.com", "'to' given twice"),
        ("allow from ::1 port 1 FROM ::2", "'from' given twice"),
        ("default", "expected 'default allow' or 'default deny'"),
        ("default permit", "expected 'default allow' or 'default deny'"),
        ("default deny to 10.0.0.0/8", "expected 'default allow' or 'default deny'"),
    ],
)
def test_parse_errors(bad: str, message: str) -> None:
    text = f"allow from 10.0.0.0/8\n# comment\n\n{bad}\nallow"
    with pytest.raises(RulesError) as caught:
        RuleSet.parse(text, "bad.conf")
    error = caught.value
    assert error.line == 4
    assert error.source == "bad.conf"
    assert message in error.reason
    assert str(error).startswith("bad.conf:4: ")


def test_rule_after_default_is_an_error() -> None:
    with pytest.raises(RulesError) as caught:
        RuleSet.parse("allow\ndefault deny\n# fine\ndeny", "t.conf")
    assert caught.value.line == 4
    assert "'default' must come last" in str(caught.value)


def test_two_defaults_are_an_error() -> None:
    with pytest.raises(RulesError) as caught:
        RuleSet.parse("default deny\ndefault allow")
    assert caught.value.line == 2


def test_from_file(tmp_path: Path) -> None:
    path = tmp_path / "rules.conf"
    path.write_text("deny to 10.0.0.0/8\n\nallow user *\ndefault deny\n", "utf-8")
    rules = RuleSet.from_file(path)
    assert rules.source == str(path)
    decision = request(rules, "10.1.2.3", user="alice")
    assert decision.rule == f"{path}:1: deny to 10.0.0.0/8"
    assert request(rules, "1.2.3.4", user=None).rule == f"{path}:4: default deny"


def test_from_file_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "rules.conf"
    path.write_text("allow\nallow port 99999\n", "utf-8")
    with pytest.raises(RulesError, match=r"rules\.conf:2: invalid port '99999'"):
        RuleSet.from_file(str(path))


def test_from_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "missing.conf"
    with pytest.raises(RulesError, match="cannot read rules") as caught:
        RuleSet.from_file(path)
    assert caught.value.source == str(path)
    assert caught.value.line is None


def test_from_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.conf"
    path.write_bytes("allow user josé\n".encode("latin-1"))
    with pytest.raises(RulesError, match="not UTF-8"):
        RuleSet.from_file(path)


# --------------------------------------------------------------------------
# Conditions, one kind at a time (IP destinations: always final)


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        ("10.0.0.0", True),
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.0", False),
        ("9.255.255.255", False),
        ("::ffff:10.0.0.1", True),
        (ipaddress.ip_address("10.9.9.9"), True),
        ("2001:db8::1", True),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", True),
        ("2001:db9::1", False),
        ("fe80::1%eth0", False),
        ("::a00:1", False),  # IPv4-compatible: not normalised, plain IPv6.
    ],
)
def test_from(client: object, expected: bool) -> None:
    rules = RuleSet.parse("allow from 10.0.0.0/8, 2001:db8::/32")
    assert allowed(rules, "1.2.3.4", client=client) is expected


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("192.0.2.0", True),
        ("192.0.2.255", True),
        ("192.0.3.0", False),
        ("::ffff:192.0.2.7", True),
        ("2001:db8::", True),
        ("2001:db8:0:0:0:0:0:1", True),
        ("2001:db9::", False),
        ("::", False),
        ("0.0.0.0", False),
    ],
)
def test_to_cidr(destination: str, expected: bool) -> None:
    rules = RuleSet.parse("allow to 192.0.2.0/24, 2001:db8::/32")
    assert allowed(rules, destination) is expected


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("example.com", "example.com", True),
        ("example.com", "www.example.com", False),
        ("example.com", "example.com.", True),
        ("example.com", "EXAMPLE.COM", True),
        ("example.com", "example.co", False),
        ("example.com", "example.com.evil.net", False),
        ("*.example.com", "example.com", False),
        ("*.example.com", "www.example.com", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "WWW.Example.Com.", True),
        ("*.example.com", "wwwexample.com", False),
        (".example.com", "example.com", True),
        (".example.com", "example.com.", True),
        (".example.com", "x.example.com", True),
        (".example.com", "x.y.example.com", True),
        (".example.com", "badexample.com", False),
        (".example.com", "example.com.au", False),
        ("bücher.de", "xn--bcher-kva.de", True),
        ("xn--bcher-kva.de", "BÜCHER.de", True),
        ("*.bücher.de", "www.bücher.de", True),
        ("example.com", "example。com", True),  # an IDNA full stop
    ],
)
def test_to_host_pattern(pattern: str, name: str, expected: bool) -> None:
    rules = RuleSet.parse(f"allow to {pattern}")
    decision = request(rules, name)
    # Patterns only: the name alone decides, no resolution needed.
    assert decision.final
    assert decision.allowed is expected
    resolved = rules.check_resolved(CLIENT, None, CONNECT, at(name), "1.2.3.4")
    assert resolved.allowed is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # IDNA 2003 reads straße.de as strasse.de, IDNA 2008 as xn--strae-oqa.de.
        ("deny to strasse.de\nallow", False),
        ("deny to xn--strae-oqa.de\nallow", False),
        ("allow to strasse.de", False),
        ("allow to xn--strae-oqa.de", False),
        ("allow to strasse.de, xn--strae-oqa.de", True),
        ("allow to .de", True),
    ],
)
def test_ambiguous_international_name_judged_strictly(
    text: str, expected: bool
) -> None:
    rules = RuleSet.parse(text)
    decision = request(rules, "STRAßE.de.")
    assert decision.final and decision.allowed is expected


def test_ambiguous_international_pattern_is_an_error() -> None:
    with pytest.raises(
        RulesError, match="write it as .*strasse.de or .*xn--strae-oqa.de"
    ):
        RuleSet.parse("deny to *.straße.de")


def test_name_forms() -> None:
    assert name_forms("WWW.Example.COM.") == ("www.example.com",)
    assert name_forms("Bücher.de") == ("xn--bcher-kva.de",)
    assert name_forms("straße.de") == ("strasse.de", "xn--strae-oqa.de")
    assert name_forms("ｅｘａｍｐｌｅ.com") == ("example.com",)
    assert name_forms("a..é") == ("a..é",)


def test_host_pattern_never_matches_ip_destination() -> None:
    rules = RuleSet.parse("allow to .example.com")
    assert not allowed(rules, "93.184.216.34")
    resolved = rules.check_resolved(
        CLIENT, None, CONNECT, at("93.184.216.34"), "93.184.216.34"
    )
    assert not resolved.allowed


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        (0, True),
        (1, False),
        (79, False),
        (80, True),
        (81, False),
        (999, False),
        (1000, True),
        (1500, True),
        (2000, True),
        (2001, False),
        (65534, False),
        (65535, True),
    ],
)
def test_port(port: int, expected: bool) -> None:
    rules = RuleSet.parse("allow port 0, 80, 1000-2000, 65535")
    assert allowed(rules, "1.2.3.4", port=port) is expected


@pytest.mark.parametrize(
    ("command", "expected"),
    [(CONNECT, True), (BIND, False), (UDP, True)],
)
def test_command(command: Command, expected: bool) -> None:
    rules = RuleSet.parse("allow command connect, udp")
    assert allowed(rules, "1.2.3.4", command=command) is expected


@pytest.mark.parametrize(
    ("users", "user", "expected"),
    [
        ("alice", "alice", True),
        ("alice", "Alice", False),
        ("alice", "bob", False),
        ("alice", None, False),
        ("alice, bob", "bob", True),
        ("*", "bob", True),
        ("*", "", True),
        ("*", None, False),
        ("-", None, True),
        ("-", "bob", False),
        ("alice, -", None, True),
        ("alice, -", "alice", True),
        ("alice, -", "bob", False),
        ("*, -", None, True),
        ("*, -", "anyone", True),
    ],
)
def test_user(users: str, user: Optional[str], expected: bool) -> None:
    rules = RuleSet.parse(f"allow user {users}")
    assert allowed(rules, "1.2.3.4", user=user) is expected


def test_all_conditions_must_match() -> None:
    rules = RuleSet.parse(
        "allow from 10.0.0.0/8 to 192.0.2.0/24 port 443 command connect user alice"
    )
    good = {"client": "10.0.0.1", "port": 443, "command": CONNECT, "user": "alice"}
    assert allowed(rules, "192.0.2.1", **good)
    for key, bad in [
        ("client", "11.0.0.1"),
        ("port", 80),
        ("command", UDP),
        ("user", "bob"),
    ]:
        assert not allowed(rules, "192.0.2.1", **{**good, key: bad})
    assert not allowed(rules, "192.0.3.1", **good)


# --------------------------------------------------------------------------
# First match wins, default action


@pytest.mark.parametrize(
    ("text", "destination", "expected", "line"),
    [
        ("allow to 10.0.0.0/8\ndeny to 10.1.0.0/16", "10.1.2.3", True, 1),
        ("deny to 10.1.0.0/16\nallow to 10.0.0.0/8", "10.1.2.3", False, 1),
        ("deny to 10.1.0.0/16\nallow to 10.0.0.0/8", "10.2.0.1", True, 2),
        ("allow port 22\ndeny\nallow", "10.0.0.1", False, 2),
        ("deny port 22\nallow to 10.0.0.0/8\ndefault deny", "10.0.0.1", True, 2),
        ("deny port 22\nallow to 10.0.0.0/8\ndefault deny", "11.0.0.1", False, 3),
        ("deny port 22\nallow to 10.0.0.0/8\ndefault allow", "11.0.0.1", True, 3),
    ],
)
def test_first_match_wins(
    text: str, destination: str, expected: bool, line: int
) -> None:
    rules = RuleSet.parse(text, "t.conf")
    decision = request(rules, destination)
    assert decision.final
    assert decision.allowed is expected
    assert decision.rule.startswith(f"t.conf:{line}: ")


@pytest.mark.parametrize(
    ("text", "expected", "rule"),
    [
        ("deny to 10.0.0.0/8", False, "t.conf: default deny (no rule matched)"),
        ("deny to 10.0.0.0/8\ndefault deny", False, "t.conf:2: default deny"),
        ("deny to 10.0.0.0/8\n\ndefault allow # open", True, "t.conf:3: default allow"),
        ("default allow", True, "t.conf:1: default allow"),
    ],
)
def test_default_action(text: str, expected: bool, rule: str) -> None:
    decision = request(RuleSet.parse(text, "t.conf"), "1.2.3.4")
    assert (decision.allowed, decision.rule, decision.final) == (expected, rule, True)


# --------------------------------------------------------------------------
# Domain names: decided by patterns, or again once resolved

SSRF = "deny to 127.0.0.0/8, ::1/128\ndeny to 10.0.0.0/8\nallow\n"


@pytest.mark.parametrize(
    ("resolved", "expected", "line"),
    [
        ("10.1.2.3", False, 2),
        ("::ffff:10.1.2.3", False, 2),
        ("127.0.0.1", False, 1),
        ("127.255.255.254", False, 1),
        ("::1", False, 1),
        ("::ffff:127.0.0.1", False, 1),
        (ipaddress.ip_address("::ffff:127.0.0.1"), False, 1),
        ("93.184.216.34", True, 3),
        ("2606:2800:220:1::1", True, 3),
    ],
)
def test_name_resolving_into_denied_network(
    resolved: object, expected: bool, line: int
) -> None:
    rules = RuleSet.parse(SSRF, "ssrf.conf")
    for name in ("localhost", "internal.example.com"):
        first = request(rules, name)
        # A CIDR cannot judge a name: allowed for now, decided once resolved.
        assert first.allowed and not first.final
        assert first.rule == "depends on ssrf.conf:1: deny to 127.0.0.0/8, ::1/128"
        final = rules.check_resolved(CLIENT, None, CONNECT, at(name), resolved)
        assert final.final
        assert final.allowed is expected
        assert final.rule.startswith(f"ssrf.conf:{line}: ")


def test_name_denied_without_resolving() -> None:
    """A name denied by a pattern or a known condition needs no DNS lookup."""
    rules = RuleSet.parse(
        "deny to .evil.example\ndeny to 10.0.0.0/8\nallow port 80, 443"
    )
    decision = request(rules, "www.evil.example")
    assert not decision.allowed and decision.final
    # Every rule that could allow port 25 is gone: final deny.
    decision = request(rules, "mail.example.com", port=25)
    assert not decision.allowed and decision.final


def test_name_allowed_by_allow_list_after_resolving() -> None:
    rules = RuleSet.parse("allow to 203.0.113.0/24\ndefault deny")
    first = request(rules, "service.example")
    assert first.allowed and not first.final
    inside = rules.check_resolved(
        CLIENT, None, CONNECT, at("service.example"), "203.0.113.9"
    )
    outside = rules.check_resolved(
        CLIENT, None, CONNECT, at("service.example"), "198.51.100.1"
    )
    assert inside.allowed and not outside.allowed


def test_pattern_above_cidr_wins() -> None:
    """First match wins across both steps: an earlier name rule decides."""
    rules = RuleSet.parse("allow to .example.com\ndeny to 10.0.0.0/8\ndefault deny")
    decision = request(rules, "example.com")
    assert decision.allowed and decision.final
    resolved = rules.check_resolved(
        CLIENT, None, CONNECT, at("example.com"), "10.0.0.1"
    )
    assert resolved.allowed


def test_cidr_above_pattern_wins() -> None:
    rules = RuleSet.parse("deny to 10.0.0.0/8\nallow to .example.com\ndefault deny")
    decision = request(rules, "example.com")
    assert decision.allowed and not decision.final
    resolved = rules.check_resolved(
        CLIENT, None, CONNECT, at("example.com"), "10.0.0.1"
    )
    assert not resolved.allowed
    resolved = rules.check_resolved(CLIENT, None, CONNECT, at("example.com"), "1.2.3.4")
    assert resolved.allowed


@pytest.mark.parametrize("host", ["10.0.0.1", "::ffff:10.0.0.1", "::1"])
def test_ip_literal_sent_as_name_is_an_ip(host: str) -> None:
    rules = RuleSet.parse("deny to 10.0.0.0/8, ::1/128\nallow")
    destination = Address(AddressType.DOMAIN, host, 80)
    decision = rules.check_request(CLIENT, None, CONNECT, destination)
    assert not decision.allowed and decision.final


def test_odd_ip_spelling_is_caught_once_resolved() -> None:
    """``127.1`` is not an IP literal here, but the resolver turns it into one."""
    rules = RuleSet.parse(SSRF)
    destination = Address(AddressType.DOMAIN, "127.1", 80)
    assert not rules.check_request(CLIENT, None, CONNECT, destination).final
    resolved = rules.check_resolved(CLIENT, None, CONNECT, destination, "127.0.0.1")
    assert not resolved.allowed


# --------------------------------------------------------------------------
# IPv4-mapped IPv6 addresses are IPv4


@pytest.mark.parametrize("written", ["10.0.0.0/8", "::ffff:10.0.0.0/104"])
def test_ipv4_mapped_everywhere(written: str) -> None:
    rules = RuleSet.parse(f"deny to {written}\ndeny from {written}\nallow")
    mapped = Address(AddressType.IPV6, "::ffff:10.0.0.1", 80)
    assert not rules.check_request(CLIENT, None, CONNECT, mapped).allowed
    assert not rules.check_request(CLIENT, None, CONNECT, at("10.0.0.1")).allowed
    assert not rules.check_resolved(
        CLIENT, None, CONNECT, at("x.test"), "::ffff:a00:1"
    ).allowed
    assert not rules.check_client("::ffff:10.0.0.1").allowed
    assert not rules.check_client(ipaddress.ip_address("::ffff:10.0.0.1")).allowed
    assert rules.check_client("::ffff:11.0.0.1").allowed


def test_ipv6_network_never_matches_ipv4() -> None:
    rules = RuleSet.parse("deny to ::/0\nallow")
    mapped = Address(AddressType.IPV6, "::ffff:1.2.3.4", 80)
    assert rules.check_request(CLIENT, None, CONNECT, mapped).allowed
    assert not allowed(rules, "2001:db8::1")


def test_parse_ip() -> None:
    assert parse_ip("::ffff:1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert parse_ip("::1") == ipaddress.IPv6Address("::1")
    assert parse_ip(ipaddress.ip_address("1.2.3.4")) == ipaddress.IPv4Address("1.2.3.4")


# --------------------------------------------------------------------------
# Client-level checks: deny early only when every request would be denied


@pytest.mark.parametrize(
    ("text", "client", "expected", "final"),
    [
        ("deny from 198.51.100.7\nallow", "198.51.100.7", False, True),
        ("deny from 198.51.100.7\nallow", "198.51.100.8", True, True),
        ("allow from 192.0.2.0/24", "192.0.2.1", True, True),
        ("allow from 192.0.2.0/24", "203.0.113.1", False, True),
        ("allow from 192.0.2.0/24 port 80", "192.0.2.1", True, False),
        ("allow from 192.0.2.0/24 port 80", "203.0.113.1", False, True),
        ("allow user alice\ndeny from 198.51.100.7", "198.51.100.7", True, False),
        ("deny user -\nallow", "198.51.100.7", True, False),
        ("deny to 10.0.0.0/8\ndefault allow", "198.51.100.7", True, False),
        (
            "deny to 10.0.0.0/8\ndeny from 198.51.100.7\nallow",
            "198.51.100.7",
            False,
            True,
        ),
        ("", "198.51.100.7", False, True),
    ],
)
def test_check_client(text: str, client: str, expected: bool, final: bool) -> None:
    decision = RuleSet.parse(text).check_client(client)
    assert (decision.allowed, decision.final) == (expected, final)


# --------------------------------------------------------------------------
# BIND and UDP ASSOCIATE: no destination yet


def test_udp_association_then_datagrams() -> None:
    rules = RuleSet.parse(
        "deny to 127.0.0.0/8\nallow command udp to 9.9.9.9 port 53\ndefault deny"
    )
    association = rules.check_request(CLIENT, None, UDP, NULL_ADDRESS)
    assert association.allowed and not association.final
    assert allowed(rules, "9.9.9.9", port=53, command=UDP)
    assert not allowed(rules, "9.9.9.9", port=54, command=UDP)
    assert not allowed(rules, "8.8.8.8", port=53, command=UDP)
    # A datagram to a name: decided per resolved address.
    name = request(rules, "dns.example", port=53, command=UDP)
    assert name.allowed and not name.final
    assert not rules.check_resolved(
        CLIENT, None, UDP, at("dns.example", 53), "127.0.0.1"
    ).allowed
    assert rules.check_resolved(
        CLIENT, None, UDP, at("dns.example", 53), "9.9.9.9"
    ).allowed
    # The same rules refuse CONNECT outright.
    assert not allowed(rules, "9.9.9.9", port=53)


def test_udp_association_denied_outright() -> None:
    rules = RuleSet.parse("deny from 10.0.0.0/8\nallow command udp")
    association = rules.check_request("10.0.0.5", None, UDP, NULL_ADDRESS)
    assert not association.allowed and association.final
    association = rules.check_request("11.0.0.5", None, UDP, NULL_ADDRESS)
    assert association.allowed and association.final


def test_bind_peer_checked_when_it_connects() -> None:
    rules = RuleSet.parse("allow command bind to 203.0.113.0/24\ndefault deny")
    for destination in (at("0.0.0.0", 0), at("::", 0)):
        first = rules.check_request(CLIENT, "u", BIND, destination)
        assert first.allowed and not first.final
        inside = rules.check_resolved(CLIENT, "u", BIND, destination, "203.0.113.5")
        outside = rules.check_resolved(CLIENT, "u", BIND, destination, "198.51.100.5")
        assert inside.allowed and not outside.allowed
    # A BIND naming its peer is judged on it at once.
    assert not allowed(rules, "198.51.100.5", port=21, command=BIND)


def test_port_zero_is_unknown_only_for_bind_and_udp() -> None:
    rules = RuleSet.parse("allow port 1024-65535\ndefault deny")
    bind = rules.check_request(CLIENT, None, BIND, at("203.0.113.5", 0))
    assert bind.allowed and not bind.final
    assert not allowed(rules, "203.0.113.5", port=0)


def test_connect_to_unspecified_address_is_an_ip() -> None:
    """``0.0.0.0`` reaches the proxy host on Linux: it is a real destination."""
    rules = RuleSet.parse("deny to 0.0.0.0/8, ::/128\nallow")
    assert not allowed(rules, "0.0.0.0", port=22)
    assert not allowed(rules, "::", port=22)


# --------------------------------------------------------------------------
# Rules built in code, description, warnings


def test_rule_in_code_is_normalised_and_validated() -> None:
    rule = Rule(
        allow=False,
        networks=(ipaddress.ip_network("::ffff:10.0.0.0/104"),),
        hosts=("*.Example.COM.",),
    )
    assert str(rule) == "deny to 10.0.0.0/8, *.example.com"
    assert rule.description == "<code>: deny to 10.0.0.0/8, *.example.com"
    # A client network in its IPv4-mapped form denies the IPv4 clients.
    deny = Rule(allow=False, clients=(ipaddress.ip_network("::ffff:10.0.0.0/104"),))
    assert str(deny) == "deny from 10.0.0.0/8"
    rules = RuleSet([deny], default_allow=True)
    assert not rules.check_client("10.0.0.1").allowed
    assert rules.check_client("192.0.2.1").allowed
    with pytest.raises(ValueError, match="port range"):
        Rule(allow=True, ports=((10, 5),))
    with pytest.raises(ValueError, match="at least one value"):
        Rule(allow=True, users=())
    with pytest.raises(ValueError, match="host pattern"):
        Rule(allow=True, hosts=("1.2.3.4",))


def test_describe() -> None:
    rules = RuleSet.parse("deny to 10.0.0.0/8\nallow user *", "r.conf")
    text = rules.describe()
    assert text.splitlines() == [
        "access rules from r.conf: 2 rules, first match wins, otherwise "
        "default deny (implicit)",
        "  r.conf:1: deny to 10.0.0.0/8",
        "  r.conf:2: allow user *",
    ]
    assert "(implicit)" not in RuleSet.parse("default allow").describe()


def test_unreachable_rules_warned() -> None:
    rules = RuleSet.parse("deny to 10.0.0.0/8\nallow\ndeny from 1.2.3.4", "r.conf")
    assert rules.warnings == [
        "r.conf:2: allow matches everything: the rules after it "
        "(from r.conf:3: deny from 1.2.3.4/32) and the default are never used"
    ]
    assert "warning: r.conf:2: allow matches everything" in rules.describe()
    assert RuleSet.parse("deny to 10.0.0.0/8\nallow").warnings == []


def test_render() -> None:
    text = "deny to 10.0.0.0/8  # private\nallow user alice,bob port 80"
    rules = RuleSet.parse(text)
    assert rules.render() == (
        "deny to 10.0.0.0/8\nallow port 80 user alice, bob\ndefault deny\n"
    )
    assert RuleSet.parse(rules.render()) == rules
    assert RuleSet.parse("allow") != RuleSet.parse("allow\ndefault allow")


# --------------------------------------------------------------------------
# Properties

KEYWORDS = ["allow", "deny", "default", "from", "to", "port", "command", "user"]
VALUES = [
    "10.0.0.0/8", "::1", "::ffff:1.2.3.4", "1.2.3.4/33", "*.a.b", ".a.b", "a.b",
    "80", "1-2", "65536", "connect", "udp", "bind", "*", "-", "alice", ",", "#",
    "\n", "\r\n", " , ", "é", "\x00", "\u3002", "xn--", "..",
]  # fmt: skip


@given(st.text())
@example("allow to \udcff")
@example("allow to é\u0301.ß")
@example("allow to xn--zz")
def test_parser_only_raises_rules_error(text: str) -> None:
    with contextlib.suppress(RulesError):
        RuleSet.parse(text)


@given(
    st.lists(st.sampled_from(KEYWORDS + VALUES) | st.text(max_size=8), max_size=25).map(
        " ".join
    )
)
def test_parser_only_raises_rules_error_on_near_misses(text: str) -> None:
    try:
        rules = RuleSet.parse(text)
    except RulesError:
        return
    # What parses renders and parses again to the same thing.
    assert RuleSet.parse(rules.render()) == rules


IP_POOL = [
    "10.0.0.1", "10.1.2.3", "127.0.0.1", "192.0.2.1", "0.0.0.0", "::", "::1",
    "2001:db8::1", "::ffff:10.0.0.1", "fe80::1",
]  # fmt: skip

ips = st.sampled_from(IP_POOL).map(ipaddress.ip_address) | st.ip_addresses()


@st.composite
def networks(draw: st.DrawFn) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    ip = draw(ips)
    prefix = draw(st.integers(0, ip.max_prefixlen))
    return ipaddress.ip_network((ip, prefix), strict=False)


LABELS = ["a", "b", "example", "com", "xn--bcher-kva", "bücher", "x_1", "strasse"]
labels = st.sampled_from(LABELS)
# Requests may also use names with two IDNA forms, and odd spellings.
request_labels = st.sampled_from([*LABELS, "straße", "xn--strae-oqa", "Example"])
names = st.lists(request_labels, min_size=1, max_size=4).map(".".join)
pattern_names = st.lists(labels, min_size=1, max_size=4).map(".".join)
patterns = st.tuples(st.sampled_from(["", "*.", "."]), pattern_names).map("".join)
port_ranges = st.tuples(st.integers(0, 65535), st.integers(0, 65535)).map(
    lambda pair: (min(pair), max(pair))
)
port_pool = st.sampled_from([0, 53, 80, 443, 65535]) | st.integers(0, 65535)
USERS = ["alice", "bob", "*", "-", "Alice"]


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


rule_objects = st.builds(
    Rule,
    allow=st.booleans(),
    clients=optional(st.lists(networks(), min_size=1, max_size=3).map(tuple)),
    networks=st.lists(networks(), max_size=3).map(tuple),
    hosts=st.lists(patterns, max_size=3).map(tuple),
    ports=optional(st.lists(port_ranges, min_size=1, max_size=3).map(tuple)),
    commands=optional(st.frozensets(st.sampled_from(Command), min_size=1)),
    users=optional(st.lists(st.sampled_from(USERS), min_size=1, max_size=3).map(tuple)),
    to_self=st.booleans(),
    protocols=optional(st.frozensets(st.sampled_from(PROTOCOL_WORDS), min_size=1)),
)
rule_sets = st.builds(
    RuleSet, st.lists(rule_objects, max_size=6), default_allow=st.booleans()
)


Query = Tuple[Any, Optional[str], Command, Address, Any]


@st.composite
def queries(draw: st.DrawFn) -> Query:
    """A request and an address to check it with once resolved."""
    client = draw(ips)
    user = draw(st.sampled_from([None, "alice", "bob", "carol"]))
    command = draw(st.sampled_from(Command))
    port = draw(port_pool)
    if draw(st.booleans()):
        destination = at(draw(names), port)
        resolved = draw(ips)
    else:
        ip = draw(ips)
        destination = at(str(ip), port)
        unknown = command is not CONNECT and ip.is_unspecified
        # An IP destination is used as is, unless it is a placeholder.
        resolved = draw(ips) if unknown else ip
    return client, user, command, destination, resolved


@given(rule_sets)
def test_render_round_trips(rules: RuleSet) -> None:
    text = rules.render()
    parsed = RuleSet.parse(text)
    assert parsed == rules
    assert parsed.render() == text


protocol_facts = st.sampled_from(PROTOCOL_WORDS).flatmap(
    lambda p: st.fixed_dictionaries({"protocol": st.just(p), "explicit": st.booleans()})
)

batches = st.lists(st.tuples(queries(), protocol_facts), min_size=1, max_size=5)


@settings(max_examples=300)
@given(rule_sets, batches)
def test_early_answers_never_contradict_the_final_one(
    rules: RuleSet, batch: List[Tuple[Query, Dict[str, Any]]]
) -> None:
    """
    A final answer from check_client or check_request is what check_resolved
    says; a rendered and re-parsed rule set answers the same (determinism).
    A client without the password the server wants (``explicit``) is only
    ever allowed by a rule naming its protocol and ``from`` networks.
    """
    again = RuleSet.parse(rules.render())
    for query, kw in batch:
        client, user, command, destination, resolved = query
        by_client = rules.check_client(client)
        by_request = rules.check_request(client, user, command, destination, **kw)
        final = rules.check_resolved(client, user, command, destination, resolved, **kw)
        assert final.final
        if kw["explicit"] and final.allowed:
            (deciding,) = [r for r in rules.rules if r.description == final.rule]
            assert deciding.clients is not None
            assert deciding.protocols and kw["protocol"] in deciding.protocols
        if by_client.final and not kw["explicit"]:
            assert by_request.final and by_request.allowed == by_client.allowed
            assert final.allowed == by_client.allowed
        if by_request.final:
            assert final.allowed == by_request.allowed
        if not by_request.allowed:
            assert by_request.final
        for a, b in [
            (by_client, again.check_client(client)),
            (by_request, again.check_request(client, user, command, destination, **kw)),
            (final, again.check_resolved(*query, **kw)),
        ]:
            assert (a.allowed, a.final) == (b.allowed, b.final)


@settings(max_examples=300)
@given(
    st.lists(networks(), min_size=1, max_size=5),
    st.booleans(),
    ips,
    st.sampled_from(Command),
)
def test_allow_list_never_lets_an_outside_address_out(
    allowed_networks: List[ipaddress.IPv4Network | ipaddress.IPv6Network],
    explicit_deny: bool,
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    command: Command,
) -> None:
    """Only ``allow to CIDR`` rules, then deny: nothing outside gets out."""
    text = "".join(f"allow to {net}\n" for net in allowed_networks)
    rules = RuleSet.parse(text + ("deny\n" if explicit_deny else ""))
    plain = parse_ip(ip)
    inside = any(plain in normalise_network(net) for net in allowed_networks)
    spellings = {str(ip), str(plain)}
    if plain.version == 4:
        spellings.add(f"::ffff:{plain}")
    for spelling in spellings:
        kind = (
            AddressType.IPV4
            if "." in spelling and ":" not in spelling
            else AddressType.IPV6
        )
        for destination in (
            Address(kind, spelling, 443),
            Address(AddressType.DOMAIN, spelling, 443),
        ):
            decision = rules.check_request(CLIENT, None, CONNECT, destination)
            assert decision.final
            assert decision.allowed is inside
        by_name = rules.check_resolved(
            CLIENT, None, command, at("a.example", 53), spelling
        )
        assert by_name.allowed is inside


def test_via_routes_allowed_requests() -> None:
    from twisted_socks5.codec import Address, Command

    rules = RuleSet.parse(
        "allow to .onion via tor\nallow to 10.0.0.0/8 via direct\nallow\n"
    )
    assert rules.routes == frozenset({"tor", "direct"})
    onion = Address.from_host("abc.onion", 80)
    assert rules.check_request("192.0.2.1", None, Command.CONNECT, onion).via == "tor"
    ip = Address.from_host("10.1.2.3", 80)
    assert rules.check_resolved(
        "192.0.2.1", None, Command.CONNECT, ip, "10.1.2.3"
    ).via == ("direct")
    other = Address.from_host("192.0.2.9", 80)
    assert rules.check_request("192.0.2.1", None, Command.CONNECT, other).via is None
    assert RuleSet.parse(rules.render()) == rules


@pytest.mark.parametrize(
    "line", ["deny via tor", "allow via", "allow via a,b", "allow via bad/name"]
)
def test_bad_via(line: str) -> None:
    with pytest.raises(RulesError):
        RuleSet.parse(line + "\n")


@given(
    st.lists(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "192.0.2.7"])),
    st.sets(st.sampled_from(["10.0.0.1", "10.0.0.2", "::1", "192.0.2.7"])),
)
def test_first_allowed_address_or_the_first_denial(
    addresses: List[str], denied: Set[str]
) -> None:
    """Shared by the routed connect and the upstream connector."""

    def check(ip: str) -> Optional[str]:
        return f"deny {ip}" if ip in denied else None

    allowed = [ip for ip in addresses if ip not in denied]
    if allowed:
        assert first_allowed(addresses, check) == allowed[0]
    else:
        with pytest.raises(PolicyDenied) as caught:
            first_allowed(addresses, check)
        first_rule = f"deny {addresses[0]}" if addresses else "no address"
        assert caught.value.rule == first_rule


@pytest.mark.parametrize("spelling", ["self.", "SELF.", "Self.", "ｓｅｌｆ"])
def test_self_spelled_as_a_host_name_is_an_error(spelling: str) -> None:
    """Found by the fuzz campaign: 'to self.' parsed as a host called self
    (never the proxy host), and rendered back as the keyword self."""
    with pytest.raises(RulesError, match="host called 'self'"):
        RuleSet.parse(f"deny to {spelling}\ndefault allow\n")


def test_patterns_under_a_self_domain_stay_host_patterns() -> None:
    rules = RuleSet.parse("deny to .self, *.self\ndefault allow\n")
    assert RuleSet.parse(rules.render()) == rules
    assert not rules.rules[0].to_self


def test_the_protocol_condition() -> None:
    rules = RuleSet.parse(
        "deny protocol http to .example.com\n"
        "allow from 10.0.0.0/8 protocol SOCKS4, socks5\n"
        "default deny\n"
    )
    assert str(rules.rules[1]) == "allow from 10.0.0.0/8 protocol socks5, socks4"
    assert RuleSet.parse(rules.render()) == rules
    name = at("www.example.com", 80)
    ip = at("192.0.2.1", 80)
    assert not rules.check_request("10.1.1.1", None, CONNECT, name, "http").allowed
    assert rules.check_request("10.1.1.1", None, CONNECT, name, "socks4").allowed
    assert rules.check_request("10.1.1.1", None, CONNECT, ip).allowed  # socks5
    assert not rules.check_request("10.1.1.1", None, CONNECT, ip, "http").allowed
    # At accept the protocol is not known yet: the client may go on.
    assert rules.check_client("10.1.1.1").allowed


def test_without_a_password_only_an_explicit_rule_allows() -> None:
    rules = RuleSet.parse(
        "allow user alice\n"
        "allow from 192.0.2.0/24 to 10.0.0.0/8\n"
        "allow from 10.0.0.0/8 protocol socks4 to 192.0.2.0/24\n"
        "default allow\n"
    )
    ip = at("192.0.2.1", 80)
    other = at("198.51.100.1", 80)
    explicit = {"protocol": "socks4", "explicit": True}
    assert rules.check_request("10.1.1.1", None, CONNECT, ip, **explicit).allowed
    # Neither the protocol-less allow, nor the default allow, count.
    lan = at("10.0.0.1", 80)
    assert not rules.check_request("192.0.2.9", None, CONNECT, lan, **explicit).allowed
    denied = rules.check_request("10.1.1.1", None, CONNECT, other, **explicit)
    assert not denied.allowed and "no 'allow from NETWORKS protocol" in denied.rule
    # Without ``explicit`` (no password required) the default allows.
    assert rules.check_request("10.1.1.1", None, CONNECT, other, "socks4").allowed


@pytest.mark.parametrize(
    "line, why",
    [
        ("allow protocol socks6", "unknown protocol 'socks6'"),
        ("allow protocol", "'protocol' needs a value"),
        ("allow protocol socks4 protocol http", "given twice"),
        ("allow protocol socks4,", "empty item"),
    ],
)
def test_bad_protocol_conditions(line: str, why: str) -> None:
    with pytest.raises(RulesError, match=why):
        RuleSet.parse(line + "\n")
