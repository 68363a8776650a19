"""
:class:`RuleSet`: the rules in order, first match wins, and the default;
the three checks of :class:`~.decision.IPolicy` over them.
"""

from __future__ import annotations

import contextlib
import os
from typing import FrozenSet, List, Optional, Sequence, Tuple, Union

from zope.interface import implementer

from ..addresses import parse_ip
from ..codec import Address, AddressType, Command
from ..selfnet import HostAddresses, default_host
from .decision import Decision, IPolicy, RulesError
from .limit import LimitLine
from .names import IPLike, _looks_like_ip, name_forms
from .rule import Rule, _Facts
from .syntax import parse_text


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
        limits: Sequence[LimitLine] = (),
    ) -> None:
        self.rules: Tuple[Rule, ...] = tuple(rules)
        #: The ``limit`` lines, in order (empty: nothing is limited).
        self.limits: Tuple[LimitLine, ...] = tuple(limits)
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
        #: The default for a client without the password the server wants.
        self._explicit_only = Decision(
            False,
            f"{source}: no 'allow from NETWORKS protocol PROTOCOL' rule for a "
            "client without a password (the server requires one)",
        )

    def __repr__(self) -> str:
        return f"<RuleSet {self.source}: {len(self.rules)} rules>"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return (self.rules, self.default_allow, self.limits) == (
            other.rules,
            other.default_allow,
            other.limits,
        )

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
        rules, default_allow, default_line, limits = parse_text(text, source)
        return cls(
            rules,
            default_allow,
            source=source,
            default_line=default_line,
            host=host,
            limits=limits,
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
        lines.extend(str(limit) for limit in self.limits)
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
        lines.extend(f"  {limit.description}" for limit in self.limits)
        lines.extend(f"  warning: {w}" for w in self.warnings)
        return "\n".join(lines)

    # -- checking ----------------------------------------------------------

    def _decide(self, facts: _Facts) -> Decision:
        if facts.ip is not None and self.host is not None:
            facts.ip_is_self = facts.ip in self.host
        first_undecided: Optional[Rule] = None
        undecided_allow = undecided_deny = False
        decision = self._default
        if facts.explicit and decision.allowed:
            decision = self._explicit_only
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

    def _request_facts(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        protocol: str = "socks5",
        explicit: bool = False,
    ) -> _Facts:
        facts = _Facts(
            parse_ip(client_ip),
            user_known=True,
            user=user,
            command=command,
            port=destination.port,
            destination_known=True,
            protocol=protocol,
            explicit=explicit,
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
        return facts

    def check_request(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        protocol: str = "socks5",
        explicit: bool = False,
    ) -> Decision:
        return self._decide(
            self._request_facts(
                client_ip, user, command, destination, protocol, explicit
            )
        )

    def limits_for(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        via: Optional[str] = None,
        protocol: str = "socks5",
    ) -> Tuple[LimitLine, ...]:
        """
        The limit lines that apply to a request (routed ``via``): the first
        matching line of each slot (:attr:`LimitLine.slot`).  A condition
        not known yet (a ``to`` network for a name) matches: the stricter way.
        """
        if not self.limits:
            return ()
        facts = self._request_facts(client_ip, user, command, destination, protocol)
        if facts.ip is not None and self.host is not None:
            facts.ip_is_self = facts.ip in self.host
        chosen: dict[str, LimitLine] = {}
        for line in self.limits:
            if line.slot in chosen:
                continue
            if line.when.via is not None and line.when.via != via:
                continue
            if line.when.match(facts) is not False:
                chosen[line.slot] = line
        return tuple(chosen.values())

    def check_resolved(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        resolved_ip: IPLike,
        protocol: str = "socks5",
        explicit: bool = False,
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
                protocol=protocol,
                explicit=explicit,
            )
        )

    # -- the open-relay question -------------------------------------------

    def check_anonymous_client(
        self, client: IPLike, explicit: bool = False
    ) -> Decision:
        """
        Like :meth:`check_client`, for a client that did not authenticate:
        denied when no request it could make would be allowed (``explicit``:
        on a server that requires a password, as SOCKS4 clients there).
        """
        facts = _Facts(parse_ip(client), user_known=True, explicit=explicit)
        return self._decide(facts)
