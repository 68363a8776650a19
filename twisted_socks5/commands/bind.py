"""
BIND (RFC 1928 section 4): wait for one inbound connection on a fresh port.

The proxy listens on the address it uses toward the client (the control
connection's local address), sends the first reply with that port (at the
``--bind-advertise`` address, behind NAT), and
accepts exactly one connection from the expected peer; any other peer is
refused and the wait goes on.  The port closes as soon as the peer is in,
on timeout, or when the client leaves first.  The second reply names the
peer, and a :class:`~twisted_socks5.tunnel.Tunnel` relays from then on.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Collection, List, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..addresses import address_of, canonical_ip_text
from ..codec import Address, AddressType, ReplyCode, Request
from ..logs import escape_word
from ..relay import OutboundProtocol
from ..replies import reply_for_failure
from ..rules import Decision, allows
from ..selfnet import UNSPECIFIED_RULE, unspecified
from .base import RequestContext, advertised, local_host, resolved_decision


class _BoundPeer(OutboundProtocol):
    """The accepted peer; tells the waiter once its transport is attached."""

    def __init__(self, on_connected: Callable[[_BoundPeer], None]) -> None:
        super().__init__()
        self._on_connected = on_connected

    def connectionMade(self) -> None:
        super().connectionMade()
        self._on_connected(self)


class BindWaiter(Factory):
    """
    Listens for the single connection of one BIND request.

    :param allowed: the peer IPs allowed to connect (normalized), or ``None``
        to accept any peer (DST.ADDR all zeros).
    :param check_peer: a policy hook: its
        :class:`~twisted_socks5.rules.Decision` on a connecting peer's IP.  A
        hook answering a bool, as before 0.1.0, is still understood.
    """

    noisy = False
    log = Logger()

    def __init__(
        self,
        reactor: Any,
        allowed: Optional[Collection[str]],
        timeout: float,
        check_peer: Optional[Callable[[str], Decision]] = None,
    ) -> None:
        self.reactor = reactor
        self.allowed = (
            None if allowed is None else {canonical_ip_text(a) for a in allowed}
        )
        self.timeout = timeout
        self.check_peer = check_peer
        self.refused = 0
        self.port: Any = None
        self.accepted: defer.Deferred[OutboundProtocol] = defer.Deferred()
        self._timer: Any = None
        self._done = False

    def listen(self, host: str, port: int = 0) -> Address:
        """
        Start listening on ``host``; the first reply's address.  ``port`` is
        tried first when given (Dante's client asks for the port its program
        bound, and gives up if it gets another), then any free port.
        """
        try:
            self.port = self.reactor.listenTCP(port, self, interface=host)
        except error.CannotListenError:
            if not port:
                raise
            self.port = self.reactor.listenTCP(0, self, interface=host)
        self._timer = self.reactor.callLater(self.timeout, self._expire)
        bound = self.port.getHost()
        return Address.from_host(bound.host, bound.port)

    def buildProtocol(self, addr: Any) -> Optional[_BoundPeer]:  # type: ignore[override]
        if self._done:
            return None
        host = canonical_ip_text(getattr(addr, "host", ""))
        if (self.allowed is not None and host not in self.allowed) or (
            self.check_peer is not None and not allows(self.check_peer(host))
        ):
            # Returning None makes Twisted close the connection at once.
            self.refused += 1
            self.log.info(
                "BIND refused a connection from unexpected peer {peer}",
                peer=host,
            )
            return None
        self._done = True
        self._stop()
        return _BoundPeer(self._connected)

    def _connected(self, peer: _BoundPeer) -> None:
        if not self.accepted.called:
            self.accepted.callback(peer)
        else:  # pragma: no cover - cancelled in the meantime
            peer.transport.abortConnection()

    def _expire(self) -> None:
        self._timer = None
        self._done = True
        self._stop()
        if not self.accepted.called:
            self.accepted.errback(
                error.TimeoutError(f"no connection within {self.timeout} s")
            )

    def cancel(self) -> None:
        """The client went away: stop listening, forget the wait."""
        self._done = True
        self._stop()
        if not self.accepted.called:
            self.accepted.cancel()

    def _stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.port is not None:
            port, self.port = self.port, None
            port.stopListening()


class BindHandler:
    """BIND: the request's address names the peer expected to connect."""

    phase: Optional[str] = "binding"

    def rules_destination(self, request: Request) -> Address:
        return request.address

    def handle(self, ctx: RequestContext, request: Request) -> None:
        address = request.address
        if address.type is AddressType.DOMAIN:
            ctx.wait()
            d = ctx.factory.connector.resolve(address.host)
            ctx.pending = d
            d.addCallbacks(_listen, _failed, callbackArgs=(ctx,), errbackArgs=(ctx,))
            d.addBoth(ctx.unwait)
        elif address.is_unspecified:
            _listen(None, ctx)  # 0.0.0.0 or :: exactly: any peer (RFC 1928)
        else:
            _listen([address.host], ctx)


def _listen(allowed: Optional[List[str]], ctx: RequestContext) -> None:
    ctx.pending = None
    if ctx.closing:
        return
    if allowed is not None:
        # No peer comes from 0.1.2.3 or from a name's 0.0.0.0: a client
        # naming one is probing, not binding.
        allowed = [ip for ip in allowed if not unspecified(ip)]
        if not allowed:
            ctx.deny(UNSPECIFIED_RULE)
            return
    factory = ctx.factory
    requested = ctx.request.address  # type: ignore[union-attr]
    check_peer = partial(_peer_decision, ctx, requested)
    waiter = BindWaiter(factory.reactor, allowed, factory.bind_timeout, check_peer)
    wanted = factory.bind_port_for(requested)
    local = local_host(ctx)
    try:
        first = waiter.listen(local, wanted)
    except Exception as e:  # noqa: BLE001 - CannotListenError and kin
        ctx.fail(ReplyCode.GENERAL_FAILURE, f"bind failed: {e}")
        return
    ctx.binding = waiter
    ctx.bound = first
    reply = advertised(factory.bind_advertise, local, first)
    ctx.send_reply(ReplyCode.SUCCEEDED, reply)
    waiter.accepted.addCallbacks(
        _accepted, _failed, callbackArgs=(ctx,), errbackArgs=(ctx,)
    )


def _peer_decision(ctx: RequestContext, destination: Address, ip: str) -> Decision:
    decision = resolved_decision(ctx, destination, ip)
    if not decision.allowed:
        ctx.log.info(
            "BIND peer {peer} denied by {rule}",
            peer=escape_word(ip),
            rule=decision.rule,
        )
    return decision


def _accepted(peer: OutboundProtocol, ctx: RequestContext) -> None:
    ctx.binding = None
    remote = address_of(peer.transport.getPeer())
    ctx.peer = remote
    ctx.send_reply(ReplyCode.SUCCEEDED, remote)
    ctx.wait()
    ctx.start_tunnel(peer)


def _failed(failure: Failure, ctx: RequestContext) -> None:
    ctx.binding = None
    ctx.pending = None
    if failure.check(defer.CancelledError) or ctx.closing:
        return
    ctx.fail(reply_for_failure(failure), f"bind failed: {failure.getErrorMessage()}")


BIND = BindHandler()
