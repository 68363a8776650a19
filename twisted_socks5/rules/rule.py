"""
One ``allow``/``deny`` line (:class:`Rule`) and how it matches what a check
knows: the hot path of every check, UDP datagrams included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import FrozenSet, Optional, Sequence, Tuple

from ..codec import Command
from .decision import Decision
from .names import IPAddress, IPNetwork, _canonical_pattern, normalise_network


# A check's view of the world; ``None`` means "not known at this stage".
@dataclass
class _Facts:
    client: IPAddress
    user_known: bool = False
    user: Optional[str] = None
    command: Optional[Command] = None
    port: Optional[int] = None
    destination_known: bool = False
    names: Optional[Tuple[str, ...]] = None
    ip: Optional[IPAddress] = None
    #: ``ip`` is in the ``self`` network (computed only if a rule names it).
    ip_is_self: bool = False
    #: What the client speaks (``None``: not known yet, at accept).
    protocol: Optional[str] = None
    #: A client without a password on a server that requires one: only an
    #: ``allow`` naming its protocol and ``from`` networks may allow it.
    explicit: bool = False


_COMMAND_WORDS = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
}
_COMMAND_NAMES = {value: key for key, value in _COMMAND_WORDS.items()}
#: What ``protocol`` may name (the server's ``--protocols``).
PROTOCOL_WORDS = ("socks5", "socks4", "http")
ANY_USER = "*"
ANONYMOUS = "-"

#: A route's name: a rule's ``via``, --upstream NAME=, --outgoing NAME=.
ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]+")


# Networks as (mask, network) integers, IPv4 then IPv6: a membership test is
# then one AND and one comparison per network.
_Masks = Tuple[Tuple[Tuple[int, int], ...], Tuple[Tuple[int, int], ...]]


def _masks(nets: Sequence[IPNetwork]) -> _Masks:
    def of(version: int) -> Tuple[Tuple[int, int], ...]:
        return tuple(
            (int(n.netmask), int(n.network_address))
            for n in nets
            if n.version == version
        )

    return of(4), of(6)


def _in(ip: IPAddress, masks: _Masks) -> bool:
    value = int(ip)
    return any(value & mask == network for mask, network in masks[ip.version == 6])


@dataclass(frozen=True)
class Rule:
    """
    One ``allow``/``deny`` line.  ``None`` (or an empty ``to``) means "no such
    condition".  Networks are normalised (IPv4-mapped ones become IPv4) and
    host patterns are validated and normalised here, so a rule built in code
    follows the same rules as a parsed one.  ``source`` and ``line`` say where
    it came from and take no part in equality.
    """

    allow: bool
    clients: Optional[Tuple[IPNetwork, ...]] = None
    networks: Tuple[IPNetwork, ...] = ()
    hosts: Tuple[str, ...] = ()
    ports: Optional[Tuple[Tuple[int, int], ...]] = None
    commands: Optional[FrozenSet[Command]] = None
    users: Optional[Tuple[str, ...]] = None
    via: Optional[str] = None
    #: ``to self``: the proxy host (see :mod:`twisted_socks5.selfnet`).
    to_self: bool = False
    #: ``protocol``: what the client speaks (``socks5``, ``socks4``, ``http``).
    protocols: Optional[FrozenSet[str]] = None
    source: str = field(default="<code>", compare=False)
    line: Optional[int] = field(default=None, compare=False)

    # Pre-computed for cheap checks.
    _clients: _Masks = field(init=False, repr=False, compare=False)
    _networks: _Masks = field(init=False, repr=False, compare=False)
    _exact: FrozenSet[str] = field(init=False, repr=False, compare=False)
    _suffixes: FrozenSet[str] = field(init=False, repr=False, compare=False)
    _names: FrozenSet[str] = field(init=False, repr=False, compare=False)
    _description: str = field(init=False, repr=False, compare=False)
    _decision: Decision = field(init=False, repr=False, compare=False)
    _pending: Decision = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        setattr_ = object.__setattr__
        if self.clients is not None:
            setattr_(self, "clients", tuple(map(normalise_network, self.clients)))
        setattr_(self, "networks", tuple(map(normalise_network, self.networks)))
        setattr_(self, "hosts", tuple(map(_canonical_pattern, self.hosts)))
        for low, high in self.ports or ():
            if not 0 <= low <= high <= 0xFFFF:
                raise ValueError(f"invalid port range {low}-{high}")
        for group in (
            self.clients,
            self.ports,
            self.commands,
            self.users,
            self.protocols,
        ):
            if group is not None and not group:
                raise ValueError("a condition needs at least one value")
        unknown = set(self.protocols or ()) - set(PROTOCOL_WORDS)
        if unknown:
            raise ValueError(
                f"unknown protocol {sorted(unknown)[0]!r} (expected socks5, "
                "socks4 or http)"
            )
        if self.via is not None:
            if not self.allow:
                raise ValueError("'via' routes allowed requests: not on 'deny'")
            if not ROUTE_NAME.fullmatch(self.via):
                raise ValueError(
                    f"bad route name {self.via!r} (letters, digits, '-', '_')"
                )
        setattr_(self, "_clients", _masks(self.clients or ()))
        setattr_(self, "_networks", _masks(self.networks))
        exact = set()
        suffixes = set()
        for pattern in self.hosts:
            if pattern.startswith("*."):
                suffixes.add(pattern[2:])
            elif pattern.startswith("."):
                exact.add(pattern[1:])
                suffixes.add(pattern[1:])
            else:
                exact.add(pattern)
        setattr_(self, "_exact", frozenset(exact))
        setattr_(self, "_suffixes", frozenset(suffixes))
        setattr_(self, "_names", frozenset(self.users or ()))
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        setattr_(self, "_description", f"{where}: {self}")
        setattr_(
            self,
            "_decision",
            Decision(self.allow, self._description, True, self.via, self.to_self),
        )
        setattr_(
            self, "_pending", Decision(True, f"depends on {self._description}", False)
        )

    @property
    def has_destination(self) -> bool:
        return bool(self.networks or self.hosts or self.to_self)

    @property
    def matches_everything(self) -> bool:
        return (
            self.clients is None
            and not self.has_destination
            and self.ports is None
            and self.commands is None
            and self.users is None
            and self.protocols is None
        )

    @property
    def description(self) -> str:
        """Where the rule comes from and what it says, for logs."""
        return self._description

    def __str__(self) -> str:
        """The rule in the file syntax (canonical form)."""
        parts = ["allow" if self.allow else "deny"]
        if self.clients is not None:
            parts.append("from " + ", ".join(map(str, self.clients)))
        if self.has_destination:
            targets = ["self"] if self.to_self else []
            targets += [str(n) for n in self.networks] + list(self.hosts)
            parts.append("to " + ", ".join(targets))
        if self.ports is not None:
            parts.append(
                "port "
                + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in self.ports)
            )
        if self.commands is not None:
            names = [_COMMAND_NAMES[c] for c in sorted(self.commands)]
            parts.append("command " + ", ".join(names))
        if self.users is not None:
            parts.append("user " + ", ".join(self.users))
        if self.protocols is not None:
            names = [p for p in PROTOCOL_WORDS if p in self.protocols]
            parts.append("protocol " + ", ".join(names))
        if self.via is not None:
            parts.append("via " + self.via)
        return " ".join(parts)

    def match_host(self, name: str) -> bool:
        """Does the ASCII form ``name`` match one of the host patterns?"""
        if name in self._exact:
            return True
        dot = name.find(".")
        while dot != -1:
            if name[dot + 1 :] in self._suffixes:
                return True
            dot = name.find(".", dot + 1)
        return False

    def match_names(self, forms: Tuple[str, ...]) -> bool:
        """
        Match the forms of one name (see :func:`name_forms`) the stricter
        way: a ``deny`` rule matches if any form does, an ``allow`` rule
        only if every form does.
        """
        if self.allow:
            return all(self.match_host(form) for form in forms)
        return any(self.match_host(form) for form in forms)

    def _match_user(self, user: Optional[str]) -> bool:
        if user is None:
            return ANONYMOUS in self._names
        return ANY_USER in self._names or user in self._names

    def _match_destination(self, facts: _Facts) -> Optional[bool]:
        if not facts.destination_known:
            return None
        if facts.names is not None and self.hosts and self.match_names(facts.names):
            return True
        if facts.ip is not None:
            return (self.to_self and facts.ip_is_self) or _in(facts.ip, self._networks)
        # A name whose addresses are not known yet.
        return None if self.networks or self.to_self else False

    def match(self, facts: _Facts) -> Optional[bool]:
        """``True``/``False``, or ``None`` when undecided on these facts."""
        result: Optional[bool] = True
        if self.clients is not None and not _in(facts.client, self._clients):
            return False
        if (
            facts.explicit
            and self.allow
            and (self.clients is None or self.protocols is None)
        ):
            return False  # only an explicit permission lets such a client in
        if self.protocols is not None:
            if facts.protocol is None:
                result = None
            elif facts.protocol not in self.protocols:
                return False
        if self.commands is not None:
            if facts.command is None:
                result = None
            elif facts.command not in self.commands:
                return False
        if self.users is not None:
            if not facts.user_known:
                result = None
            elif not self._match_user(facts.user):
                return False
        if self.ports is not None:
            port = facts.port
            if port is None:
                result = None
            elif not any(low <= port <= high for low, high in self.ports):
                return False
        if self.has_destination:
            matched = self._match_destination(facts)
            if matched is False:
                return False
            if matched is None:
                result = None
        return result
