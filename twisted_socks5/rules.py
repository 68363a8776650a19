"""
Access rules: who may connect, and where to.

The server asks an :class:`IPolicy` three questions, each at the earliest
moment it can be answered:

1. :meth:`IPolicy.check_client` when a TCP client connects, before any SOCKS
   byte is read;
2. :meth:`IPolicy.check_request` for every request (CONNECT, BIND, UDP
   ASSOCIATE, and every UDP datagram), with the destination as sent: an IP
   address or a domain name;
3. :meth:`IPolicy.check_resolved` for every IP address the server is about to
   use: each address a name resolves to, the peer that connects to a BIND, the
   destination of each UDP datagram.

:class:`AllowAll` is the policy when no rules are configured; :class:`RuleSet`
reads a rules file.

Rules file
==========

One rule per line; ``#`` starts a comment, blank lines are ignored.  The
rules are tried from the top and the **first rule that matches decides**.
When none matches, the ``default`` line decides; without one the default is
``deny``: a rules file exists to restrict access, and a forgotten last line
must not silently open the proxy (fail closed).  Example::

    deny  from 198.51.100.7           # refused before any SOCKS byte
    # Never reach the proxy host or private networks, whatever the name used.
    deny  to self, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16
    deny  to 169.254.0.0/16, 100.64.0.0/10, fc00::/7, fe80::/10
    # The office may browse these sites; alice may also use UDP for DNS.
    allow from 192.0.2.0/24 to .example.com, *.example.net port 80, 443
    allow user alice command udp to 9.9.9.9 port 53
    allow user *                      # any authenticated user, anywhere else
    default deny

Grammar (ABNF-like; keywords and host names are case-insensitive, user names
are not; items of a list are separated by commas, with optional spaces around
the commas)::

    file        = *( [ statement ] [ "#" comment ] newline )
    statement   = rule / default
    rule        = action *condition          ; each keyword at most once
    default     = "default" action           ; at most once, after every rule
    action      = "allow" / "deny"
    condition   = "from"    cidr *( "," cidr )
                / "to"      target *( "," target )
                / "port"    ports *( "," ports )
                / "command" command *( "," command )
                / "user"    user *( "," user )
                / "via"     route              ; allow rules only
    cidr        = ip-address [ "/" prefix-length ]  ; host bits must be zero
    target      = cidr / host-pattern / "self"
    host-pattern = name                ; exactly this name
                / "*." name            ; any name below it, not the name itself
                / "." name             ; the name and any name below it
    ports       = port / port "-" port ; 0 to 65535, first <= last; inclusive
    command     = "connect" / "bind" / "udp"
    user        = user-name            ; exactly this authenticated user
                / "*"                  ; any authenticated user
                / "-"                  ; an anonymous client (no authentication)
    route       = "direct" / upstream-name     ; see --upstream NAME=URL

A rule matches when **all** its conditions match; a rule without conditions
matches everything.  Within one condition, **any** item may match.

``from``
    The client's IP address.
``to``
    The destination.  A CIDR matches an IP destination, and each address a
    domain name resolves to: ``deny to 127.0.0.0/8, ::1/128`` also refuses
    ``localhost`` and any name pointing into those networks, so rules cannot be
    bypassed with DNS.  A host pattern matches a destination given as a domain
    name (compared in lower case, IDNA encoded, without a trailing dot); it
    never matches an IP destination, nor a name that is an IP literal.  An
    item made of digits and dots only, or containing ``:`` or ``/``, is read
    as a CIDR.  Write internationalised names whose IDNA 2003 and IDNA 2008
    encodings differ (``straße.de``) in their ``xn--`` form; a client sending
    such a name is judged on both encodings, the stricter way.  A host has
    many names: protect networks with CIDRs, not with ``deny to NAME``.
    ``self`` is the proxy host: loopback, the unspecified addresses and the
    host's own interface addresses (see :mod:`twisted_socks5.selfnet`).
``port``
    The destination port.
``command``
    The SOCKS command; ``udp`` is UDP ASSOCIATE.
``user``
    The name the client authenticated as.  Names may not contain spaces,
    commas or ``#``.
``via``
    Not a condition but a route, on ``allow`` rules: a CONNECT this rule
    allows leaves through the upstream server named ``NAME`` (``twistd socks5
    --upstream NAME=URL``), or straight to the destination with ``direct``.
    The rule that finally allows the request decides, after name resolution
    when it needs the addresses.  Requests allowed by a rule without ``via``
    take the default route.

IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are IPv4 addresses
everywhere: clients, destinations, resolved addresses and networks written in
the file (``::ffff:10.0.0.0/104`` is read as ``10.0.0.0/8``).  An IPv6 network
therefore never matches an IPv4 address, even ``::/0``.  Other IPv6 forms that
embed an IPv4 address (NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are plain
IPv6 addresses: deny them explicitly if your network routes them.

What each check knows
=====================

A rule is decided on what is known at the time of a check; a condition that
cannot be decided yet makes the rule *undecided*:

* ``check_client`` knows only ``from``.  It denies a client when **every**
  request it could make would be denied (for instance ``deny from 198.51.100.7``,
  or ``allow from 192.0.2.0/24`` followed by ``default deny`` for any other
  client), so refusing early never changes an outcome.  Put ``deny from``
  lines first: a rule above them that some request could match (``allow user
  alice``) keeps the client connected until its request is known.
* ``check_request`` knows everything but, for a domain name, the addresses it
  resolves to: host patterns decide, CIDRs are undecided.  For BIND and UDP
  ASSOCIATE, an unspecified address (``0.0.0.0``, ``::``) leaves ``to`` and
  ``port`` undecided, and port 0 leaves ``port`` undecided: such requests do
  not name a destination yet.
* ``check_resolved`` knows everything: it is the final word.

When an undecided rule comes before the rule that decides, and the two would
answer differently, the answer depends on the address: the check returns a
provisional ``Decision(allowed=True, final=False)`` and the server must call
``check_resolved`` for each address before using it.  A ``final`` decision can
be relied on: ``check_resolved`` will agree with it.

First match wins across both steps: with ``allow to .example.com`` above
``deny to 10.0.0.0/8``, ``example.com`` is allowed even when it resolves to
``10.0.0.1``.  Put the ``deny to`` lines that protect internal networks first.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable, FrozenSet, List, Optional, Sequence, Tuple, Union

from zope.interface import Interface, implementer

from twisted_socks5.addresses import parse_ip
from twisted_socks5.codec import Address, AddressType, Command
from twisted_socks5.selfnet import HostAddresses, default_host

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: IP addresses may be passed as ``ipaddress`` objects or as text.
IPLike = Union[IPAddress, str]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

# --------------------------------------------------------------------------
# Interface


@dataclass(frozen=True)
class Decision:
    """
    The answer of a policy check.

    :ivar allowed: whether to go on.
    :ivar rule: which rule decided, for logs, e.g.
        ``"rules.conf:12: deny to 10.0.0.0/8"``.
    :ivar final: ``False`` when ``allowed`` is provisional: the answer depends
        on something not known yet (the resolved address, or the request for
        :meth:`IPolicy.check_client`), and a later check decides.
    """

    allowed: bool
    rule: str
    final: bool = True
    #: The upstream a ``via NAME`` rule routes an allowed request through
    #: (``"direct"`` for none), or ``None`` for the server's default route.
    via: Optional[str] = None
    #: The deciding rule names ``self`` in its ``to``: an explicit allow of
    #: the proxy host, which the exposed-server protection respects.
    names_self: bool = False

    def __str__(self) -> str:
        if not self.final:
            return f"undecided ({self.rule})"
        return f"{'allowed' if self.allowed else 'denied'} by {self.rule}"


def allows(answer: Union[Decision, bool]) -> bool:
    """
    Whether a policy hook's answer allows.  Hooks answer a :class:`Decision`;
    a bool, from a hook written before 0.1.0, is still understood (one
    release).
    """
    return answer if isinstance(answer, bool) else answer.allowed


class IPolicy(Interface):
    """
    Decides which clients may use the proxy and where they may go.

    Every method is called in the reactor thread and must be cheap; none may
    block.  IP addresses may be ``ipaddress`` objects or strings;
    IPv4-mapped IPv6 addresses must be treated as IPv4.

    How the server calls it:

    * CONNECT: ``check_request`` with DST; if allowed, resolve a name and call
      ``check_resolved`` for each address before connecting to it (also for
      an IP destination when ``final`` is ``False``).
    * BIND: ``check_request`` with DST (the peer the client expects, often
      ``0.0.0.0:0``); when a peer connects, ``check_resolved`` with the same
      DST and the peer's IP.
    * UDP ASSOCIATE: ``check_request`` with an unspecified address such as
      ``codec.NULL_ADDRESS`` (the request's DST is the client's own source,
      not a destination); then, for each datagram, ``check_request`` with its
      destination and ``check_resolved`` with the address it is sent to.
    """

    def check_client(client: IPLike) -> Decision:
        """
        A TCP client connected: may it talk to the proxy at all?  Called
        before any SOCKS byte, so a denied client can be dropped at once.
        """

    def check_request(
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
    ) -> Decision:
        """
        A request arrived (or a UDP datagram, with ``command`` UDP ASSOCIATE).
        ``user`` is the authenticated name, ``None`` for anonymous clients;
        ``destination`` is as the client sent it.  A denial is final: answer
        "connection not allowed by ruleset" without resolving the name.
        """

    def check_resolved(
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        resolved_ip: IPLike,
    ) -> Decision:
        """
        The server is about to use ``resolved_ip`` for ``destination`` (an
        address the name resolved to, a BIND peer, a datagram's target).
        Always final.
        """


class RulesError(ValueError):
    """A rules file cannot be used; ``str()`` says where and why."""

    def __init__(self, reason: str, source: str, line: Optional[int] = None) -> None:
        where = source if line is None else f"{source}:{line}"
        super().__init__(f"{where}: {reason}")
        self.reason = reason
        self.source = source
        self.line = line


@implementer(IPolicy)
class AllowAll:
    """The policy without a rules file: everything is allowed."""

    decision = Decision(True, "allow all (no access rules configured)")

    def check_client(self, client: IPLike) -> Decision:
        return self.decision

    def check_request(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
    ) -> Decision:
        return self.decision

    def check_resolved(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        resolved_ip: IPLike,
    ) -> Decision:
        return self.decision

    def describe(self) -> str:
        return "access rules: none, every client and destination is allowed"


# --------------------------------------------------------------------------
# Normalisation, shared by the parser and the checks


#: Deprecated name of :func:`~twisted_socks5.addresses.parse_ip` (it returns
#: an ``ipaddress`` object, unlike BIND's ``normalize_ip``), kept for one release.
normalise_ip = parse_ip


def normalise_network(net: IPNetwork) -> IPNetwork:
    """``::ffff:a.b.c.d/N`` (N >= 96) is the IPv4 network ``a.b.c.d/(N-96)``."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)
        )
    return net


def _idna2003(name: str) -> str:
    return name.encode("idna").decode("ascii")


_ENCODERS: List[Callable[[str], str]] = [_idna2003]
try:  # Twisted's HostnameEndpoint uses the idna package (IDNA 2008) if present.
    import idna as _idna_package
except ImportError:  # pragma: no cover - idna is usually installed
    pass
else:
    _ENCODERS.append(lambda name: _idna_package.encode(name).decode("ascii"))


def name_forms(name: str) -> Tuple[str, ...]:
    """
    The ASCII forms a resolver may look ``name`` up as: lower case, no
    trailing dot, IDNA encoded.  An ASCII name has one form.  A few
    internationalised names have two, because IDNA 2003 (Python's codec) and
    IDNA 2008 (the ``idna`` package) disagree on them (``straße.de`` is
    ``strasse.de`` or ``xn--strae-oqa.de``): rules then judge both forms,
    the stricter way (see :meth:`Rule.match_names`).
    """
    name = name.rstrip(".").lower()
    if name.isascii():
        return (name,)
    name = unicodedata.normalize("NFC", name)
    forms: List[str] = []
    for encode in _ENCODERS:
        try:
            form = encode(name).rstrip(".")
        except UnicodeError:
            continue
        if form not in forms:
            forms.append(form)
    return tuple(forms) or (name,)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _canonical_pattern(pattern: str) -> str:
    """Validate a host pattern; return it normalised. Raises ValueError."""
    prefix = next(p for p in ("*.", ".", "") if pattern.startswith(p))
    forms = name_forms(pattern[len(prefix) :])
    if len(forms) > 1:
        raise ValueError(
            f"ambiguous internationalised name in {pattern!r}: write it as "
            + " or ".join(prefix + form for form in forms)
        )
    name = forms[0]
    if not prefix and name == SELF:
        # "self." or "SELF" spelled as a name would be a host called self,
        # not the proxy host: "deny to self." must not silently mean that.
        raise ValueError(
            f"{pattern!r} would name a host called 'self'; write self (no dot) "
            "for the proxy host"
        )
    labels = name.split(".")
    if (
        not name
        or _looks_like_ip(name)
        or len(name) > 253
        or not all(0 < len(label) <= 63 for label in labels)
        or not all(char in _NAME_CHARS for char in name.replace(".", ""))
    ):
        raise ValueError(
            f"invalid host pattern {pattern!r} (expected name, *.name or .name)"
        )
    return prefix + name


def _parse_network(text: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(
                f"{text} has host bits set (did you mean {loose}?)"
            ) from None
        raise ValueError(f"invalid IP network {text!r}") from None
    return normalise_network(network)


def _looks_like_ip(text: str) -> bool:
    return ":" in text or "/" in text or all(c in "0123456789." for c in text)


# --------------------------------------------------------------------------
# Rules


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


_COMMAND_WORDS = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
}
_COMMAND_NAMES = {value: key for key, value in _COMMAND_WORDS.items()}
ANY_USER = "*"
ANONYMOUS = "-"
#: The ``to`` item naming the proxy host (a name, not a host pattern).
SELF = "self"


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
        for group in (self.clients, self.ports, self.commands, self.users):
            if group is not None and not group:
                raise ValueError("a condition needs at least one value")
        if self.via is not None:
            if not self.allow:
                raise ValueError("'via' routes allowed requests: not on 'deny'")
            if not _ROUTE_NAME.fullmatch(self.via):
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


# --------------------------------------------------------------------------
# Parser


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


def _parse_rule(tokens: List[str], source: str, number: int) -> Rule:
    """Parse ``allow|deny`` and its conditions; raises ValueError."""
    values: dict[str, List[str]] = {}
    index = 1
    while index < len(tokens):
        keyword = tokens[index].lower()
        index += 1
        if keyword not in ("from", "to", "port", "command", "user", "via"):
            raise ValueError(
                f"unknown condition {tokens[index - 1]!r} (expected from, to, "
                "port, command, user or via; separate list items with commas)"
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
        source=source,
        line=number,
    )


# --------------------------------------------------------------------------
# The rule set

_ROUTE_NAME = re.compile(r"[A-Za-z0-9_-]+")


@implementer(IPolicy)
class RuleSet:
    """
    An ordered list of rules, first match wins, and a default action.

    Build it with :meth:`parse` or :meth:`from_file`, or from :class:`Rule`
    objects.  It is immutable, so a reload builds a new one and swaps it in.
    """

    def __init__(
        self,
        rules: Sequence[Rule],
        default_allow: bool = False,
        *,
        source: str = "<code>",
        default_line: Optional[int] = None,
        host: Optional[HostAddresses] = None,
    ) -> None:
        self.rules: Tuple[Rule, ...] = tuple(rules)
        #: The ``self`` network, when a rule names it (read on first use).
        self.host: Optional[HostAddresses] = host
        if host is None and any(rule.to_self for rule in self.rules):
            self.host = default_host()
        self.default_allow = default_allow
        self.source = source
        self.default_line = default_line
        action = "allow" if default_allow else "deny"
        if default_line is None:
            text = f"{source}: default {action} (no rule matched)"
        else:
            text = f"{source}:{default_line}: default {action}"
        self._default = Decision(default_allow, text)

    def __repr__(self) -> str:
        return f"<RuleSet {self.source}: {len(self.rules)} rules>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return (self.rules, self.default_allow) == (other.rules, other.default_allow)

    __hash__ = None  # type: ignore[assignment]

    # -- building ----------------------------------------------------------

    @classmethod
    def parse(
        cls,
        text: str,
        source: str = "<string>",
        host: Optional[HostAddresses] = None,
    ) -> RuleSet:
        """
        Parse rules text; raises :class:`RulesError` naming the line.
        ``host`` is the ``self`` network (default: this host's, read once).
        """
        rules: List[Rule] = []
        default: Optional[bool] = None
        default_line: Optional[int] = None
        for number, raw in enumerate(text.split("\n"), 1):
            tokens = raw.split("#", 1)[0].split()
            if not tokens:
                continue
            head = tokens[0].lower()
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
                    rules.append(_parse_rule(tokens, source, number))
                except ValueError as e:
                    raise RulesError(str(e), source, number) from None
            else:
                raise RulesError(
                    f"expected 'allow', 'deny' or 'default', not {tokens[0]!r}",
                    source,
                    number,
                )
        return cls(
            rules,
            bool(default),
            source=source,
            default_line=default_line,
            host=host,
        )

    @classmethod
    def from_file(
        cls,
        path: Union[str, os.PathLike[str]],
        host: Optional[HostAddresses] = None,
    ) -> RuleSet:
        """Read and parse a UTF-8 rules file; any failure is a RulesError."""
        source = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise RulesError(f"cannot read rules: {e.strerror or e}", source) from e
        except UnicodeDecodeError as e:
            raise RulesError(f"not UTF-8 text: {e}", source) from e
        return cls.parse(text, source, host)

    def render(self) -> str:
        """The rule set in the file syntax; ``parse(render())`` is equal."""
        lines = [str(rule) for rule in self.rules]
        lines.append("default allow" if self.default_allow else "default deny")
        return "\n".join(lines) + "\n"

    @property
    def warnings(self) -> List[str]:
        """Likely mistakes that are not errors: rules that can never match."""
        found = []
        for index, rule in enumerate(self.rules):
            if rule.matches_everything and index + 1 < len(self.rules):
                later = self.rules[index + 1].description
                found.append(
                    f"{rule.description} matches everything: the rules after it "
                    f"(from {later}) and the default are never used"
                )
                break
        return found

    @property
    def routes(self) -> FrozenSet[str]:
        """The route names ``via`` uses (checked against ``--upstream``)."""
        return frozenset(r.via for r in self.rules if r.via is not None)

    def describe(self) -> str:
        """A summary for the start-up log."""
        how = "" if self.default_line is not None else " (implicit)"
        action = "allow" if self.default_allow else "deny"
        lines = [
            f"access rules from {self.source}: {len(self.rules)} rules, first "
            f"match wins, otherwise default {action}{how}"
        ]
        lines.extend(f"  {rule.description}" for rule in self.rules)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    # -- checking ----------------------------------------------------------

    def _decide(self, facts: _Facts) -> Decision:
        if facts.ip is not None and self.host is not None:
            facts.ip_is_self = facts.ip in self.host
        first_undecided: Optional[Rule] = None
        undecided_allow = undecided_deny = False
        decision = self._default
        for rule in self.rules:
            matched = rule.match(facts)
            if matched is None:
                if first_undecided is None:
                    first_undecided = rule
                if rule.allow:
                    undecided_allow = True
                else:
                    undecided_deny = True
            elif matched:
                decision = rule._decision
                break
        if first_undecided is None or not (
            undecided_deny if decision.allowed else undecided_allow
        ):
            return decision
        return first_undecided._pending

    def check_client(self, client: IPLike) -> Decision:
        return self._decide(_Facts(parse_ip(client)))

    def check_request(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
    ) -> Decision:
        facts = _Facts(
            parse_ip(client_ip),
            user_known=True,
            user=user,
            command=command,
            port=destination.port,
            destination_known=True,
        )
        if destination.type is AddressType.DOMAIN:
            facts.names = name_forms(destination.host)
            if _looks_like_ip(destination.host):
                # A name that is an IP literal is that IP (patterns never
                # match IP-like names, so nothing is lost).
                with contextlib.suppress(ValueError):
                    facts.ip = parse_ip(destination.host)
                    facts.names = None
        else:
            facts.ip = parse_ip(destination.host)
        if command is not Command.CONNECT:
            # BIND and UDP ASSOCIATE requests may not name a destination yet.
            if facts.ip is not None and facts.ip.is_unspecified:
                facts.destination_known = False
                facts.port = None
            if destination.port == 0:
                facts.port = None
        return self._decide(facts)

    def check_resolved(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        resolved_ip: IPLike,
    ) -> Decision:
        names = None
        if destination.type is AddressType.DOMAIN:
            names = name_forms(destination.host)
        return self._decide(
            _Facts(
                parse_ip(client_ip),
                user_known=True,
                user=user,
                command=command,
                port=destination.port,
                destination_known=True,
                names=names,
                ip=parse_ip(resolved_ip),
            )
        )

    # -- the open-relay question -------------------------------------------

    def check_anonymous_client(self, client: IPLike) -> Decision:
        """
        Like :meth:`check_client`, for a client that did not authenticate:
        denied when no request it could make would be allowed.
        """
        return self._decide(_Facts(parse_ip(client), user_known=True))


#: ``from`` networks of public addresses wider than this prefix length (by
#: IP version) name much of the Internet, not a list of clients.
WIDEST_CLIENT_LIST = {4: 8, 6: 32}

_SPACES = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


def client_allow_list(rules: RuleSet) -> List[IPNetwork]:
    """
    The client networks the rules name on purpose: the ``from`` networks of
    ``allow`` rules, less public ones wider than :data:`WIDEST_CLIENT_LIST`
    (``0.0.0.0/0`` is everyone; ``10.0.0.0/8`` or ``fc00::/7`` is a LAN).
    """
    return [
        net
        for rule in rules.rules
        if rule.allow
        for net in rule.clients or ()
        if net.prefixlen >= WIDEST_CLIENT_LIST[net.version] or net.is_private
    ]


def open_relay_clients(rules: RuleSet) -> Optional[Tuple[IPAddress, IPAddress]]:
    """
    The first range of client addresses outside :func:`client_allow_list`
    that some request without authentication could be allowed for (an open
    relay for them), or ``None`` when there is none.

    The rules see a client only through the ``from`` networks that contain
    it, so the answer is the same for every address between two network
    boundaries: cutting the IPv4 and IPv6 address spaces at every boundary
    and asking once per piece checks the whole space exactly.
    """
    listed = _masks(client_allow_list(rules))
    for space in _SPACES:
        cuts = {int(space.network_address), int(space.broadcast_address) + 1}
        nets = [net for rule in rules.rules for net in rule.clients or ()]
        if space.version == 6:
            nets.append(_MAPPED)  # IPv4 addresses: checked as such above
        for net in nets:
            if net.version == space.version:
                cuts.add(int(net.network_address))
                cuts.add(int(net.broadcast_address) + 1)
        bounds = sorted(cuts)
        make = type(space.network_address)
        for start, end in zip(bounds, bounds[1:]):
            first: IPAddress = make(start)
            if first in _MAPPED or _in(first, listed):
                continue
            if rules.check_anonymous_client(first).allowed:
                return first, make(end - 1)
    return None
