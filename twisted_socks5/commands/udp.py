"""
UDP ASSOCIATE (RFC 1928 section 7): open the association's relay
(:class:`~twisted_socks5.udp.UDPAssociation`) and name its port; the rules
check each datagram's destination, and the control connection only waits.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Optional

from twisted.internet import defer

from ..addresses import family_of
from ..codec import NULL_ADDRESS, Address, Command, ReplyCode, Request
from ..logs import escape_word
from ..relay import RelayCounters
from ..resolver import FamilyPreference
from ..rules import Decision
from ..selfnet import UNSPECIFIED_RULE, unspecified
from ..udp import UDPAssociation
from .base import RequestContext, advertised, local_host, rules_and_self

_UNSPECIFIED = Decision(False, UNSPECIFIED_RULE)


class AssociateHandler:
    """
    UDP ASSOCIATE: the request names the client's own source, which the
    rules never see (the association is pinned to the TCP peer's IP).
    """

    #: Stays in the request state until the association is up.
    phase: Optional[str] = None

    def rules_destination(self, request: Request) -> Address:
        # Not a destination: those are checked datagram by datagram.
        return NULL_ADDRESS

    def handle(self, ctx: RequestContext, request: Request) -> None:
        factory = ctx.factory
        limits = factory.limits
        if not limits.may_associate():
            ctx.fail(ReplyCode.GENERAL_FAILURE, "udp associate: out of descriptors")
            return
        client = ctx.transport.getPeer()
        listen = local_host(ctx)
        association = UDPAssociation(
            factory.reactor,
            getattr(client, "host", ""),
            request.address,
            _resolver(factory),
            allow_unknown_sources=factory.udp_allow_unknown_sources,
            check_destination=partial(udp_decision, ctx),
            on_activity=partial(_active, ctx.counters),
            sources=factory.outgoing_for(getattr(ctx.decision, "via", None)),
            listen=listen,
        )
        local = listen
        try:
            bound = association.listen(
                factory.udp_bind.get(family_of(local), local), factory.udp_ports
            )
        except Exception as e:  # noqa: BLE001 - CannotListenError and kin
            ctx.fail(ReplyCode.GENERAL_FAILURE, f"udp associate failed: {e}")
            return
        ctx.udp = association
        # Counted as the four descriptors it may come to hold, before it does.
        limits.udp_started()
        ctx.udp_counted = True
        ctx.bound = bound
        if bound.is_unspecified:  # --udp-bind 0.0.0.0: the address reached
            bound = Address.from_host(local, bound.port)
        ctx.send_reply(
            ReplyCode.SUCCEEDED, advertised(factory.udp_advertise, local, bound)
        )
        ctx.associated()


def _resolver(factory: Any) -> Callable[[str], defer.Deferred[List[str]]]:
    """
    How the association resolves a datagram's name: the connector's
    resolver, with ``--prefer``'s order (and family) applied.  The rules
    then check the addresses in that order, which picks the address that
    filtering first would (a rule's verdict on one address does not depend
    on the others); a name left with no address is dropped as unresolvable.
    """
    resolve: Callable[[str], defer.Deferred[List[str]]] = factory.connector.resolve
    prefer: Optional[FamilyPreference] = getattr(factory, "prefer", None)
    if prefer is None:
        return resolve

    def preferred(addresses: List[str], name: str) -> List[str]:
        kept = prefer.split(addresses)[0]
        if not kept:
            raise prefer.no_address(name)
        return kept

    return lambda name: resolve(name).addCallback(preferred, name)


def _active(counters: RelayCounters) -> None:
    counters.active = True


def udp_decision(ctx: RequestContext, destination: Address, ip: str) -> Decision:
    """
    May this datagram go to ``ip``?  Never to an unspecified one, before
    the rules see it.  The association's first refusal is logged (a name's
    next address may still take the datagram).
    """
    policy = ctx.factory.policy
    if unspecified(ip):
        decision = _UNSPECIFIED
    else:
        if policy is not None:
            decision = policy.check_request(
                ctx.policy_ip, ctx.user, Command.UDP_ASSOCIATE, destination
            )
        if policy is None or decision.allowed:
            decision = rules_and_self(ctx, destination, ip)
            if decision.allowed:
                return decision
    if ctx.rule is None:
        # One line per association: a client must not flood the log.
        ctx.rule = decision.rule
        ctx.log.info(
            "UDP destination {destination} ({ip}) refused for {client}: "
            "denied by {rule}",
            event="socks5.udp_denied",
            client=escape_word(ctx.client_ip),
            # A name from the wire: escaped, never a raw newline or ESC.
            destination=repr(str(destination))[1:-1],
            ip=ip,
            rule=decision.rule,
        )
    return decision


ASSOCIATE = AssociateHandler()
