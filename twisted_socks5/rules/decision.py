"""
The answer a policy gives (:class:`Decision`), the questions the server asks
(:class:`IPolicy`), and the policy without rules (:class:`AllowAll`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from zope.interface import Interface, implementer

from ..codec import Address, Command
from .names import IPLike


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
    * A client that does not speak SOCKS5 (``--protocols``): the same calls
      of ``check_request`` and ``check_resolved`` with two keywords more,
      ``protocol`` (``"socks4"``, ``"http"``) and ``explicit``: ``True``
      for a client without a password on a server that requires one
      (SOCKS4 has none), which only an explicit permission may let in.  A
      policy that takes no such keywords serves SOCKS5 only: a factory with
      other ``protocols`` refuses it (``ValueError``).
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
    #: No rule can allow a client without the password the server requires.
    refused = Decision(False, "no access rules to allow a client without a password")

    def check_client(self, client: IPLike) -> Decision:
        return self.decision

    def check_request(
        self,
        client_ip: IPLike,
        user: Optional[str],
        command: Command,
        destination: Address,
        protocol: str = "socks5",
        explicit: bool = False,
    ) -> Decision:
        return self.refused if explicit else self.decision

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
        return self.refused if explicit else self.decision

    def describe(self) -> str:
        return "access rules: none, every client and destination is allowed"
