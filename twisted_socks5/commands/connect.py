"""
CONNECT (RFC 1928 section 4): route by the rules, connect out, reply, and
hand both connections to a :class:`~twisted_socks5.tunnel.Tunnel`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, List, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure

from ..addresses import address_of as address_of  # re-exported: its old home
from ..codec import Address, AddressType, ReplyCode, Request
from ..outbound import (
    DirectConnector,
    IOutboundConnector,
    denial_check,
    pick_preferred,
)
from ..relay import OutboundProtocol
from ..replies import PolicyDenied, reply_for_failure
from ..selfnet import local_literal
from .base import RequestContext, local_host, resolved_decision


class _OutboundFactory(Factory):
    noisy = False
    protocol = OutboundProtocol
    #: Its protocols announce their own connection (``connected_deferred``).
    fast_connect = True


OUTBOUND_FACTORY = _OutboundFactory()


class ConnectHandler:
    """CONNECT: the destination is the request's address."""

    phase: Optional[str] = "connecting"

    def rules_destination(self, request: Request) -> Address:
        return request.address

    def handle(self, ctx: RequestContext, request: Request) -> None:
        factory = ctx.factory
        check = None
        address = request.address
        route = None
        policy = factory.policy
        decision = ctx.decision
        if address.type is not AddressType.DOMAIN:
            decision = resolved_decision(ctx, address, address.host)
            if not decision.allowed:
                ctx.deny(decision.rule)
                return
            route = decision.via
        elif policy is not None and not decision.final:
            # Which rule allows the name, and so its route, depends on the
            # addresses: resolve here, check each, connect by IP.
            ctx.hold()
            resolving = factory.connector.resolve(address.host)
            ctx.pending = resolving
            resolving.addCallback(_route_resolved, ctx, address)
            resolving.addCallbacks(
                _connected, _connect_failed, callbackArgs=(ctx,), errbackArgs=(ctx,)
            )
            return
        else:
            # The route is known: the connector checks each address the
            # name resolves to and uses only the allowed ones (with
            # HostnameEndpoint's fallback among them).  One check per name,
            # here or in _route_resolved, never both.  Without rules, an
            # upstream resolves names on its own host: nothing to guard.
            route = decision.via if decision is not None else None
            if policy is not None or isinstance(
                factory.connector_for(route), DirectConnector
            ):
                check = denial_check(partial(resolved_decision, ctx, address))
            elif factory.protect_host is not None:
                # An upstream on this host would read a numeric or loopback
                # name as this host: those need no resolver to refuse.
                literal = local_literal(address.host)
                if literal is not None:
                    refused = resolved_decision(ctx, address, literal)
                    if not refused.allowed:
                        ctx.deny(refused.rule)
                        return
        ctx.hold()
        d = _connect(ctx, factory.connector_for(route), address, check)
        ctx.pending = d
        d.addCallbacks(
            _connected, _connect_failed, callbackArgs=(ctx,), errbackArgs=(ctx,)
        )


def _route_resolved(
    addresses: List[str], ctx: RequestContext, address: Address
) -> defer.Deferred[IProtocol]:
    """
    Connect to the first allowed address (of the family ``--prefer``
    prefers), by the route its rule names.
    """
    ip, decision = pick_preferred(
        addresses,
        partial(resolved_decision, ctx, address),
        getattr(ctx.factory, "prefer", None),
        address.host,
    )
    resolved = ctx.resolved = Address.from_host(ip, address.port)
    d = _connect(ctx, ctx.factory.connector_for(decision.via), resolved)
    ctx.pending = d
    return d


def _connect(
    ctx: RequestContext,
    connector: IOutboundConnector,
    address: Address,
    check: Optional[Callable[[str], Optional[str]]] = None,
) -> defer.Deferred[IProtocol]:
    """
    ``connector.connect``; a connector with an --outgoing set also learns
    where the client came in (``same-as-listen``), and the source it used
    is noted for the log.
    """
    if getattr(connector, "outgoing", None) is None:
        if check is None:
            return connector.connect(address, OUTBOUND_FACTORY)
        return connector.connect(address, OUTBOUND_FACTORY, check)
    d: defer.Deferred[IProtocol] = connector.connect(  # type: ignore[call-arg]
        address, OUTBOUND_FACTORY, check, listen=local_host(ctx)
    )
    return d.addCallback(_note_outgoing, ctx)


def _note_outgoing(protocol: IProtocol, ctx: RequestContext) -> IProtocol:
    source = address_of(protocol.transport.getHost())  # type: ignore[attr-defined]
    ctx.outgoing = str(source) if source is not None else None
    return protocol


def _connected(protocol: IProtocol, ctx: RequestContext) -> None:
    ctx.pending = None
    if not isinstance(protocol, OutboundProtocol):  # pragma: no cover
        raise TypeError(f"unexpected outbound protocol {protocol!r}")
    # Through an upstream, the address that matters is the upstream's.
    bound = getattr(protocol.transport, "bound", None)
    ctx.bound = bound if isinstance(bound, Address) else None
    if ctx.bound is None:
        ctx.bound = address_of(protocol.transport.getHost())
    if ctx.resolved is None and getattr(ctx.factory, "access_log", None):
        ctx.resolved = _reached(protocol.transport, ctx.request, bound)
    ctx.send_reply(ReplyCode.SUCCEEDED, ctx.bound)
    ctx.start_tunnel(protocol)


def _reached(transport: Any, request: Optional[Request], bound: Any) -> Any:
    """
    The destination's address: the peer of a direct connection; through an
    upstream (``bound`` set), the request's IP, or ``None`` for a name the
    upstream resolved.
    """
    if not isinstance(bound, Address):
        return address_of(transport.getPeer())
    if request is not None and request.address.type is not AddressType.DOMAIN:
        return request.address
    return None


def _connect_failed(failure: Failure, ctx: RequestContext) -> None:
    ctx.pending = None
    if ctx.transport.disconnected:
        # The client left and cancelled the attempt; its connectionLost
        # said so (HostnameEndpoint reports a cancelled look-up as a DNS
        # failure, not as a cancellation).
        return
    code = reply_for_failure(failure)
    if failure.check(PolicyDenied):
        ctx.rule = failure.value.rule  # type: ignore[union-attr]
    ctx.fail(code, f"connect failed: {failure.getErrorMessage()}")


CONNECT = ConnectHandler()
