"""
The rules file syntax: lines and their tokens into :class:`~.rule.Rule`
objects and the ``default`` line.  The grammar is in the package docstring.
"""

from __future__ import annotations

from typing import FrozenSet, List, Optional, Tuple

from .decision import RulesError
from .limit import KINDS, LimitLine, parse_limit
from .names import SELF, IPNetwork, _looks_like_ip, _parse_network
from .rule import _COMMAND_WORDS, Rule

_KEYWORDS = ("from", "to", "port", "command", "user", "protocol", "via")


def _parse_ports(item: str) -> Tuple[int, int]:
    low, dash, high = item.partition("-")
    bounds = []
    for text in (low, high) if dash else (low,):
        digits = text.lstrip("0") or "0"
        if not (text.isascii() and text.isdigit()) or int(digits[:6]) > 0xFFFF:
            raise ValueError(f"invalid port {text!r} (expected 0 to 65535)")
        bounds.append(int(digits))
    if bounds[0] > bounds[-1]:
        raise ValueError(f"empty port range {item!r} (first port above last)")
    return bounds[0], bounds[-1]


def _parse_rule(
    tokens: List[str], source: str, number: int, stop: FrozenSet[str] = frozenset()
) -> Tuple[Rule, int]:
    """
    Parse ``allow|deny`` and its conditions, up to a keyword of ``stop``:
    the rule and the index of that keyword; raises ValueError.
    """
    values: dict[str, List[str]] = {}
    index = 1
    while index < len(tokens):
        keyword = tokens[index].lower()
        if keyword in stop:
            break
        index += 1
        if keyword not in _KEYWORDS:
            raise ValueError(
                f"unknown condition {tokens[index - 1]!r} (expected from, to, "
                "port, command, user, protocol or via; separate list items "
                "with commas)"
            )
        if keyword in values:
            raise ValueError(
                f"{keyword!r} given twice in one rule (list the values after "
                "one keyword, separated by commas)"
            )
        if index == len(tokens):
            raise ValueError(f"{keyword!r} needs a value")
        # A list continues while a token ends or the next one starts with ",".
        parts = [tokens[index]]
        index += 1
        while index < len(tokens) and (
            parts[-1].endswith(",") or tokens[index].startswith(",")
        ):
            parts.append(tokens[index])
            index += 1
        items = "".join(parts).split(",")
        if "" in items:
            raise ValueError(f"empty item in the list after {keyword!r}")
        values[keyword] = items

    clients = None
    if "from" in values:
        clients = tuple(_parse_network(item) for item in values["from"])
    networks: List[IPNetwork] = []
    hosts: List[str] = []
    to_self = False
    for item in values.get("to", ()):
        if item.lower() == SELF:
            to_self = True
        elif _looks_like_ip(item):
            networks.append(_parse_network(item))
        else:
            hosts.append(item)
    ports = None
    if "port" in values:
        ports = tuple(_parse_ports(item) for item in values["port"])
    commands = None
    if "command" in values:
        try:
            commands = frozenset(_COMMAND_WORDS[c.lower()] for c in values["command"])
        except KeyError as e:
            raise ValueError(
                f"unknown command {e.args[0]!r} (expected connect, bind or udp)"
            ) from None
    users = tuple(values["user"]) if "user" in values else None
    protocols = None
    if "protocol" in values:
        protocols = frozenset(p.lower() for p in values["protocol"])
    via = None
    if "via" in values:
        if len(values["via"]) != 1:
            raise ValueError("'via' names one route")
        via = values["via"][0]
    return Rule(
        allow=tokens[0].lower() == "allow",
        clients=clients,
        networks=tuple(networks),
        hosts=tuple(hosts),
        ports=ports,
        commands=commands,
        users=users,
        via=via,
        to_self=to_self,
        protocols=protocols,
        source=source,
        line=number,
    ), index


def parse_lines(text: str, source: str) -> Tuple[List[Rule], bool, Optional[int]]:
    """
    The rules of ``text`` in order, the default action and its line (``None``
    without one: deny); raises :class:`~.decision.RulesError` naming the line.
    """
    rules, default, default_line, _ = parse_text(text, source)
    return rules, default, default_line


_LIMIT_KINDS = frozenset(KINDS)


def _parse_limit_line(tokens: List[str], source: str, number: int) -> LimitLine:
    try:
        when, index = _parse_rule(["allow", *tokens[1:]], source, number, _LIMIT_KINDS)
    except ValueError as e:
        if str(e).startswith("unknown condition"):
            raise ValueError(f"{e}, or a limit: {', '.join(KINDS)}") from None
        raise
    if index == len(tokens):
        raise ValueError(f"a limit line ends with its limit: {', '.join(KINDS)}")
    return parse_limit(when, tuple(tokens[index:]), source, number)


def parse_text(
    text: str, source: str
) -> Tuple[List[Rule], bool, Optional[int], List[LimitLine]]:
    """:func:`parse_lines` and the ``limit`` lines, in order."""
    rules: List[Rule] = []
    limits: List[LimitLine] = []
    default: Optional[bool] = None
    default_line: Optional[int] = None
    for number, raw in enumerate(text.split("\n"), 1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        head = tokens[0].lower()
        if head == "limit":
            # Limits are not access rules: they may follow the default.
            try:
                limits.append(_parse_limit_line(tokens, source, number))
            except ValueError as e:
                raise RulesError(str(e), source, number) from None
            continue
        if default_line is not None:
            raise RulesError(
                f"rule after the 'default' line (line {default_line}); "
                "'default' must come last",
                source,
                number,
            )
        if head == "default":
            if len(tokens) != 2 or tokens[1].lower() not in ("allow", "deny"):
                raise RulesError(
                    "expected 'default allow' or 'default deny'", source, number
                )
            default = tokens[1].lower() == "allow"
            default_line = number
        elif head in ("allow", "deny"):
            try:
                rules.append(_parse_rule(tokens, source, number)[0])
            except ValueError as e:
                raise RulesError(str(e), source, number) from None
        else:
            raise RulesError(
                f"expected 'allow', 'deny', 'limit' or 'default', not {tokens[0]!r}",
                source,
                number,
            )
    return rules, bool(default), default_line, limits
