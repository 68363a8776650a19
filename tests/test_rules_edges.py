"""
The access rules at their edges: the longest host patterns and port numbers
a rule may hold, names only IDNA 2008 can encode, names with empty labels.
(Found by mutation testing: docs/reliability.rst.)
"""

from __future__ import annotations

from typing import Tuple

import pytest

from twisted_socks5.codec import Address, Command
from twisted_socks5.rules import Decision, Rule, RulesError, RuleSet

CLIENT = "192.0.2.1"


def _connect(rules: RuleSet, host: str, port: int = 80) -> Decision:
    return rules.check_request(
        CLIENT, None, Command.CONNECT, Address.from_host(host, port)
    )


def _name(length: int) -> str:
    """A valid name of exactly ``length`` characters, labels of 63 or fewer."""
    labels = []
    while length > 64:
        labels.append("a" * 63)
        length -= 64
    labels.append("b" * length)
    return ".".join(labels)


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        (_name(253), True),  # the longest name
        (_name(254), False),
        ("x.example", True),
        ("x" * 63 + ".example", True),  # the longest label
        ("x" * 64 + ".example", False),
    ],
)
def test_host_patterns_hold_names_up_to_253_labels_up_to_63(
    name: str, valid: bool
) -> None:
    if valid:
        rules = RuleSet.parse(f"deny to {name}\ndefault allow")
        assert not _connect(rules, name).allowed
    else:
        with pytest.raises(RulesError):
            RuleSet.parse(f"deny to {name}")


@pytest.mark.parametrize("pattern", ["a..example", ".", "*.", "..", "*..example"])
def test_empty_labels_are_not_patterns(pattern: str) -> None:
    with pytest.raises(RulesError):
        RuleSet.parse(f"deny to {pattern}")


@pytest.mark.parametrize(
    ("ports", "valid"),
    [
        ((0, 65535), True),
        ((0, 0), True),
        ((65535, 65535), True),
        ((0, 65536), False),
        ((-1, 80), False),
        ((81, 80), False),
    ],
)
def test_rules_built_in_code_hold_real_ports(
    ports: Tuple[int, int], valid: bool
) -> None:
    if valid:
        Rule(allow=False, ports=(ports,))
    else:
        with pytest.raises(ValueError):
            Rule(allow=False, ports=(ports,))


def test_a_name_only_idna_2008_encodes_is_judged_by_that_form() -> None:
    # IDNA 2003 refuses a right-to-left label ending in a digit; IDNA 2008
    # (what the resolver uses) encodes it: the rules must see that form.
    name = "\u05d01.example"
    deny = RuleSet.parse("deny to xn--1-zhc.example\ndefault allow")
    assert not _connect(deny, name).allowed
    allow = RuleSet.parse("allow to xn--1-zhc.example\ndefault deny")
    assert _connect(allow, name).allowed


@pytest.mark.parametrize("name", ["a..evil.example", "a..b..evil.example"])
def test_empty_labels_do_not_hide_a_denied_domain(name: str) -> None:
    rules = RuleSet.parse("deny to .evil.example\ndefault allow")
    assert not _connect(rules, name).allowed


def test_one_warning_for_the_first_rule_that_matches_everything() -> None:
    rules = RuleSet.parse("deny from 0.0.0.0/0\nallow\ndeny\nallow to 10.0.0.0/8")
    assert len(rules.warnings) == 1
    assert rules.warnings[0].startswith("<string>:2: allow matches everything")
