"""
BIND (RFC 1928 section 4): wait for one inbound connection on a fresh port.

The proxy listens on the address it uses toward the client (the control
connection's local address), sends the first reply with that port, and
accepts exactly one connection from the expected peer; any other peer is
refused and the wait goes on.  The port closes as soon as the peer is in,
on timeout, or when the client leaves first.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Optional

from twisted.internet import defer, error
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from .addresses import canonical_ip_text
from .codec import Address
from .relay import OutboundProtocol
from .rules import Decision, allows

#: Deprecated name of :func:`~twisted_socks5.addresses.canonical_ip_text`
#: (it returns text, unlike the rules' ``normalise_ip``), kept for one release.
normalize_ip = canonical_ip_text


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
