"""
What a command handler is, and what it may use of the connection.

A handler is stateless and shared by every connection (no object per
request): its state lives on the connection (:class:`RequestContext`), which
it receives with the validated request.  The rules' checks on resolved
addresses, shared by every command, live here too.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Protocol

from twisted.internet import defer
from twisted.logger import Logger

from ..addresses import canonical_ip_text, family_of
from ..codec import Address, ReplyCode, Request
from ..relay import OutboundProtocol, RelayCounters
from ..rules import Decision
from ..selfnet import (
    SELF_RULE,
    UNSPECIFIED_RULE,
    reached_from_outside,
    unspecified,
)
from ..udp import UDPAssociation

_ALLOWED = Decision(True, "no access rules")
_UNSPECIFIED = Decision(False, UNSPECIFIED_RULE)
_SELF_REFUSED = Decision(False, SELF_RULE)


class RequestContext(Protocol):
    """
    The connection a request came on (the server protocol), as its handler
    sees it: the facts for the log, the rules' first answer, and the steps
    a handler takes (reply, fail, hold the client, start a tunnel).
    """

    @property
    def log(self) -> Logger: ...

    factory: Any
    transport: Any
    #: Whether a PROXY header named the client (its claims are its own).
    behind_proxy: bool
    counters: RelayCounters
    user: Optional[str]
    client_ip: str
    request: Optional[Request]
    #: The rules' answer to the request (its route, when final).
    decision: Any
    #: The access rule that denied this connection, if one did.
    rule: Optional[str]
    bound: Optional[Address]
    #: The source an --outgoing set chose (for the log).
    outgoing: Optional[str]
    #: The address a CONNECT reached, when known (access log, revocation).
    resolved: Optional[Address]
    peer: Optional[Address]
    udp: Optional[UDPAssociation]
    #: Holds a UDP association's extra descriptors in the limits.
    udp_counted: bool
    #: The look-up or connect under way (cancelled if the client goes).
    pending: Optional[defer.Deferred[Any]]
    #: A BIND's wait for its peer (a
    #: :class:`~twisted_socks5.commands.bind.BindWaiter`).
    binding: Any
    outcome: str

    @property
    def policy_ip(self) -> str: ...

    @property
    def closing(self) -> bool: ...

    def send_reply(self, code: ReplyCode, address: Optional[Address] = None) -> None:
        """Queue the reply (the first one counts for the metrics)."""

    def fail(self, code: ReplyCode, outcome: str) -> None:
        """Answer with a failure code, then close (RFC 1928 s. 6)."""

    def deny(self, rule: str) -> None:
        """Answer 0x02 for ``rule``, then close."""

    def hold(self) -> None:
        """Stop parsing while something asynchronous runs; keep reading."""

    def wait(self) -> None:
        """Stop reading the client while something asynchronous runs."""

    def unwait(self, result: Any) -> Any:
        """Read and parse again (a Deferred callback: passes ``result`` on)."""

    def start_tunnel(self, peer: OutboundProtocol) -> None:
        """Both ends are connected and the reply is queued: relay."""

    def associated(self) -> None:
        """A UDP association is up: the control connection only waits."""


class ICommandHandler(Protocol):
    """
    One SOCKS command: receives the validated request, does its work and
    sends its reply(ies).  Registered by command in
    :data:`twisted_socks5.commands.HANDLERS`.
    """

    #: The server protocol's state (``State`` value) while the command
    #: runs, entered with the handshake timeout off; ``None``: the handler
    #: moves on itself.
    phase: Optional[str]

    def rules_destination(self, request: Request) -> Address:
        """The address the rules check the request against."""

    def handle(self, ctx: RequestContext, request: Request) -> None:
        """Run the command (the rules allowed the request)."""


def handler_for(ctx: RequestContext, request: Request) -> Optional[ICommandHandler]:
    """
    The handler of a request the server serves and the rules allow (their
    first answer, kept as ``ctx.decision`` for its route); ``None`` once the
    request was refused: 0x07 for a command not served, 0x02 when denied.
    """
    factory = ctx.factory
    handler: Optional[ICommandHandler] = factory.handlers.get(request.command)
    if handler is None or request.command not in factory.commands:
        ctx.fail(
            ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.phrase} not enabled"
        )
        return None
    policy = factory.policy
    if policy is not None:
        decision = ctx.decision = policy.check_request(
            ctx.policy_ip, ctx.user, request.command, handler.rules_destination(request)
        )
        if not decision.allowed:
            ctx.deny(decision.rule)
            return None
    return handler


def resolved_decision(ctx: RequestContext, destination: Address, ip: str) -> Decision:
    """
    The final word on using ``ip`` for this request: never an unspecified
    address, whatever the rules say; then the rules; and on a server
    listening beyond loopback (``protect_host``), never the proxy host
    itself unless the allowing rule names ``self``.
    """
    if unspecified(ip):
        return _UNSPECIFIED
    return rules_and_self(ctx, destination, ip)


def rules_and_self(ctx: RequestContext, destination: Address, ip: str) -> Decision:
    """:func:`resolved_decision` for an ``ip`` known to be specified."""
    factory = ctx.factory
    policy = factory.policy
    request = ctx.request
    decision = _ALLOWED
    if policy is not None and request is not None:
        decision = policy.check_resolved(
            ctx.policy_ip, ctx.user, request.command, destination, ip
        )
    host = factory.protect_host
    if (
        host is not None
        and decision.allowed
        and not getattr(decision, "names_self", False)
        and ip in host
        and (not factory.protect_when_exposed or reached_from_outside_of(ctx))
    ):
        return _SELF_REFUSED
    return decision


def reached_from_outside_of(ctx: RequestContext) -> bool:
    """
    Whether this client came in on an address other hosts can reach.
    Behind a PROXY header the local address is the header's claim, which
    the client may forge: such a client counts as from outside.
    """
    if ctx.behind_proxy:
        return True
    return reached_from_outside(getattr(ctx.transport.getHost(), "host", None))


def local_host(ctx: RequestContext) -> str:
    """The address the client reached us on, IPv4-mapped made plain."""
    return canonical_ip_text(ctx.transport.getHost().host)


def advertised(addresses: Dict[int, str], local: str, bound: Address) -> Address:
    """
    The BND of a reply: ``bound``'s port at the address given for the
    client's family (``--udp-advertise``, ``--bind-advertise``), else
    ``bound``.  Never IPv4-mapped: the family is the client's (``local``,
    the address it reached, canonical).
    """
    host = addresses.get(family_of(local))
    return bound if host is None else Address.from_host(host, bound.port)
