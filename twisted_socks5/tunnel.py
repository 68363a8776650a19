"""
A relaying connection pair, and the watch that reclaims silent ones.

A :class:`Tunnel` starts once the SOCKS reply is queued (CONNECT, or BIND's
second reply) and owns what happens to the two connections from then on:
end-of-stream both ways, the byte counters, the hand-over to the zero-copy
relay (:mod:`twisted_socks5.splice`), the idle/stall watch, and the close.
The copying relay (:class:`~twisted_socks5.relay.OutboundProtocol`) and the
splice relay call its public methods; the client's side is fed by the server
protocol, which owns the client connection.

Its life (``TunnelState``)::

    RELAYING --(EOF one way)--> HALF_CLOSED --(EOF the other way)--> CLOSED
    RELAYING, HALF_CLOSED --(loss, reset, timeout, close)--> CLOSED

Nothing here runs per chunk: the relays count bytes into
:class:`~twisted_socks5.relay.RelayCounters` and set its ``active`` flag,
which one timer per factory (:class:`ActivityWatch`) looks at.  The watch
also looks at UDP associations' control connections
(:func:`watch_association`), which relay nothing themselves.
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Optional, Protocol, Set, Tuple

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from ._twisted import unregister_producer as _unregister_producer
from ._twisted import write_buffered
from .limits import ConnectionLimits
from .relay import OutboundProtocol, RelayCounters, half_close
from .splice import SpliceRelay, start_splice_relay
from .writenow import close_ended


class TunnelState(enum.Enum):
    RELAYING = "relaying"
    HALF_CLOSED = "half-closed"
    CLOSED = "closed"


class Watched(Protocol):
    """What :class:`ActivityWatch` looks at: a tunnel or a UDP association."""

    def check_activity(self, now: float) -> None: ...


class TunnelSettings(Protocol):
    """What a tunnel reads of its factory's configuration and state."""

    limits: ConnectionLimits
    splice: bool
    splice_after: int
    idle_timeout: Optional[float]
    stall_timeout: Optional[float]

    @property
    def watch(self) -> ActivityWatch: ...


class AssociationSettings(TunnelSettings, Protocol):
    """What the watch of a UDP association reads of its factory."""

    reactor: Any
    udp_idle_timeout: Optional[float]


class WatchedAssociation(Protocol):
    """A UDP association's control connection, as the watch sees it."""

    @property
    def factory(self) -> AssociationSettings: ...

    transport: Any
    counters: RelayCounters
    #: When the association last saw a datagram (or was set up).
    silent_since: float
    outcome: str

    def check_activity(self, now: float) -> None: ...


def silence_verdict(
    counters: RelayCounters,
    since: float,
    now: float,
    idle: Optional[float],
    stall: Optional[float],
    stalled: Callable[[], bool],
) -> Tuple[float, Optional[str]]:
    """
    One look of the watch: when the silence began, and why to give up on
    the connection (``None``: keep it).
    """
    if counters.active:
        counters.active = False
        since = now
    silent = now - since
    if idle and silent >= idle:
        return since, "idle timeout"
    if stall and silent >= stall and stalled():
        # Flow control stopped reading one side while the other does not
        # read: nothing watches the paused socket any more, so a peer that
        # went away would never be noticed.  Reclaim the connection.
        return since, "stalled: no progress with data waiting"
    return since, None


class ActivityWatch:
    """
    The factory's idle/stall watch: one timer for all watched connections,
    every ``min(timeouts)`` seconds, checks whether a byte moved (a flag the
    relays set).  Nothing runs per chunk, nothing is scheduled per tunnel.
    """

    def __init__(self, reactor: Any, periods: Callable[[], list[float]]) -> None:
        self.reactor = reactor
        self._periods = periods
        self.watching: Set[Watched] = set()
        self.call: Any = None

    def add(self, watched: Watched) -> None:
        self.watching.add(watched)
        if self.call is None:
            self._schedule()

    def discard(self, watched: Watched) -> None:
        """Stop checking ``watched``; the timer goes with the last one."""
        self.watching.discard(watched)
        if not self.watching and self.call is not None:
            self.call.cancel()
            self.call = None

    def _schedule(self) -> None:
        periods = self._periods()
        if periods:
            self.call = self.reactor.callLater(min(periods), self.look)

    def look(self) -> None:
        """One look at every watched connection, then the next in one period."""
        self.call = None
        now = self.reactor.seconds()
        for watched in list(self.watching):
            if watched in self.watching:  # not closed meanwhile
                watched.check_activity(now)
        if self.watching:
            self._schedule()


class Tunnel:
    """
    The client's transport and the destination's protocol, relaying.

    :param client: the client's transport (its protocol feeds
        :meth:`client_ended`; the destination's calls :meth:`target_eof`,
        :meth:`target_lost` and :meth:`hand_over_to_splice`).
    """

    __slots__ = (
        "settings",
        "client",
        "outbound",
        "counters",
        "client_eof",
        "splice",
        "state",
        "why",
        "silent_since",
        "__weakref__",
    )

    def __init__(
        self,
        settings: TunnelSettings,
        client: Any,
        outbound: OutboundProtocol,
        counters: RelayCounters,
        client_eof: bool = False,
    ) -> None:
        self.settings = settings
        self.client = client
        self.outbound: Optional[OutboundProtocol] = outbound
        outbound.tunnel = self
        self.counters = counters
        #: The client's EOF came (maybe during the connect, before us).
        self.client_eof = client_eof
        #: The zero-copy relay, when one took over.
        self.splice: Optional[SpliceRelay] = None
        self.state = TunnelState.RELAYING
        #: Why the tunnel ended, when not cleanly (for the connection log).
        self.why: Optional[str] = None
        self.silent_since = 0.0

    @property
    def outcome(self) -> str:
        """The connection log's text, derived from the state."""
        if self.why is not None:
            return self.why
        return "closed" if self.state is TunnelState.CLOSED else "relaying"

    def start(self, early: bytes, now: float) -> bool:
        """
        Move bytes: the reply is queued, ``early`` is what the client sent
        ahead.  False when the client must stay paused (the splice relay
        took over, or the client's EOF already ended its side).
        """
        settings = self.settings
        if settings.idle_timeout or settings.stall_timeout:
            self.silent_since = now
            settings.watch.add(self)
        if settings.splice:
            if settings.splice_after <= 0:
                self._start_splice(early)
                if self.splice is not None:
                    return False
            else:
                self.counters.splice_at = settings.splice_after
        outbound = self.outbound
        if outbound is None:  # closed before it could start: nothing to relay
            return False
        outbound.start_relay(self)
        if early:
            self.counters.bytes_up += len(early)
            outbound.transport.write(early)
        if self.client_eof:
            self.client_ended()
            return False
        return True

    # ------------------------------------------------------------------
    # The splice hand-over

    def _start_splice(self, early: bytes = b"", handover: bool = False) -> None:
        """Let the zero-copy relay take over, if the descriptors allow."""
        limits = self.settings.limits
        if not limits.may_splice():
            return
        relay = start_splice_relay(self, early, handover)
        if relay is not None:
            limits.splice_started()
            relay.on_stop = limits.splice_ended
            self.splice = relay

    def hand_over_to_splice(self) -> None:
        """The tunnel moved ``splice_after`` bytes: worth a pair of pipes."""
        counters = self.counters
        if (
            self.outbound is None
            or self.splice is not None
            or self.state is not TunnelState.RELAYING
            or counters.up_closed
            or counters.down_closed
        ):
            return
        self._start_splice(handover=True)

    def splice_called_off(self) -> None:
        """The hand-over timed out (see splice.py): back to copying."""
        self.splice = None
        outbound = self.outbound
        if outbound is None or self.state is TunnelState.CLOSED:
            return
        outbound.start_relay(self)
        self.client.resumeProducing()

    # ------------------------------------------------------------------
    # End of stream and loss

    def client_ended(self) -> None:
        """The client sent EOF: pass it on."""
        self.client_eof = True
        self.counters.up_closed = True
        if self.outbound is not None and not half_close(self.outbound.transport):
            # TLS toward the destination (an upstream over TLS) has no
            # half-close: keep the tunnel open for the answer instead.
            return
        self._one_way_ended()

    def target_eof(self) -> None:
        """The destination sent EOF (ignored while the splice relay owns it)."""
        if self.splice is not None:
            return
        self.counters.down_closed = True
        if not half_close(self.client):
            # A TLS client cannot be half-closed; all the destination had to
            # say is queued, so end the tunnel cleanly (close_notify).
            self.counters.up_closed = True
        self._one_way_ended()

    def _one_way_ended(self) -> None:
        counters = self.counters
        if not (counters.up_closed and counters.down_closed):
            if self.state is TunnelState.RELAYING:
                self.state = TunnelState.HALF_CLOSED
            return
        self.state = TunnelState.CLOSED
        self._unlink_producers()
        # Ours to close, not the protocol's connectionLost (which would close
        # it the ordinary way) nor target_lost's.
        outbound, self.outbound = self.outbound, None
        if outbound is not None:
            outbound.tunnel = None
        close_ended(self.client)
        if outbound is not None:
            close_ended(outbound.transport)

    def _unlink_producers(self) -> None:
        """
        Undo the mutual producer registration before a clean close: a TLS
        transport waits for its producer to go before sending close_notify,
        and a closing transport stops its producer, which for a TLS
        transport means a bare TCP close the peer sees as truncation.
        """
        _unregister_producer(self.client)
        if self.outbound is not None:
            _unregister_producer(self.outbound.transport)

    def target_failed(self, why: str) -> None:
        """A write to or read from the destination failed (a reset)."""
        self.why = f"target connection lost: {why}"

    def target_lost(self, reason: Failure) -> None:
        """The destination connection is gone: end the client side too."""
        splice = self.splice
        if splice is not None:
            if splice.stopped:
                return  # the splice relay closed both ends itself
            splice.stop()  # lost before it took over (writing early data)
        self.outbound = None
        self.state = TunnelState.CLOSED
        if isinstance(reason.value, ConnectionDone):
            _unregister_producer(self.client)
            self.client.loseConnection()
        else:
            if self.why is None:  # not already told by a failed write
                self.why = f"target connection lost: {reason.getErrorMessage()}"
            self.client.abortConnection()

    def close(self, reason: Failure) -> None:
        """The client connection is gone: so is the tunnel."""
        self.state = TunnelState.CLOSED
        self.settings.watch.discard(self)
        if self.counters.meter is not None:
            self.counters.meter.stop()
        if self.splice is not None:
            self.splice.stop()
        outbound, self.outbound = self.outbound, None
        if outbound is not None:
            outbound.tunnel = None
            if isinstance(reason.value, ConnectionDone):
                outbound.transport.loseConnection()
            else:
                outbound.transport.abortConnection()

    # ------------------------------------------------------------------
    # The idle/stall watch

    def check_activity(self, now: float) -> None:
        """The watch looks: close the tunnel if silent or stalled too long."""
        settings = self.settings
        self.silent_since, verdict = silence_verdict(
            self.counters,
            self.silent_since,
            now,
            settings.idle_timeout,
            settings.stall_timeout,
            self.stalled,
        )
        if verdict is not None:
            # Its close comes a turn later.
            settings.watch.discard(self)
            self.why = verdict
            self.client.abortConnection()

    def stalled(self) -> bool:
        """Bytes are waiting for a peer that does not take them."""
        if self.splice is not None:
            return bool(self.splice.buffered)
        outbound = self.outbound
        transports = [self.client, outbound.transport if outbound else None]
        return any(write_buffered(t) for t in transports if t is not None)


# ----------------------------------------------------------------------
# UDP associations under the watch: the control connection is watched, as
# the tunnel is; the association's datagrams set its counters' flag.


def association_idle(settings: AssociationSettings) -> Optional[float]:
    """An association's idle limit: the shorter of the two timeouts."""
    limits = [t for t in (settings.udp_idle_timeout, settings.idle_timeout) if t]
    return min(limits) if limits else None


def watch_association(control: WatchedAssociation) -> None:
    """A UDP association is up: watch it, if a timeout applies."""
    settings = control.factory
    if settings.idle_timeout or settings.stall_timeout or association_idle(settings):
        control.silent_since = settings.reactor.seconds()
        settings.watch.add(control)


def check_association(control: WatchedAssociation, now: float) -> None:
    """The watch looks: close the association if silent or stalled too long."""
    settings = control.factory
    transport = control.transport
    control.silent_since, verdict = silence_verdict(
        control.counters,
        control.silent_since,
        now,
        association_idle(settings),
        settings.stall_timeout,
        lambda: bool(write_buffered(transport)),
    )
    if verdict is not None:
        # The watch gives up on it (its close comes a turn later).
        settings.watch.discard(control)
        control.outcome = verdict
        transport.abortConnection()
