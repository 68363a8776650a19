"""
Bandwidth limits: token buckets that pause the side a tunnel reads from.

A tunnel with a limit gets a :class:`Meter` (``tunnel.counters.meter``; a
UDP association's ``meter``), holding its buckets by direction.  Each
direction is counted **separately** by default: ``2MiB/s`` lets 2 MiB/s
through each way, as a link speed does, so a download is not slowed by its
own requests; a limit whose ``directions`` is ``"together"`` puts both ways
in one bucket.

- The copying relay moves a chunk, then charges it; a bucket in debt pauses
  the transport that reads that direction (through a :class:`_Gate`
  registered with the consumer, so that the consumer's own flow control
  cannot resume it early) until a timer finds the debt paid.  The kernel's
  flow control does the rest: nothing is buffered beyond one read.
- The splice relay asks for tokens before each splice and splices no more
  than granted (bounded lengths), waiting on a timer when there are none.
- A UDP datagram passes whole or is dropped (``drops["bandwidth"]``).

``per-connection`` buckets are the tunnel's own; ``per-user`` and
``per-rule`` ones are shared by every tunnel of the key in the process
(:class:`_Budgets`).  With a limits store those shared buckets hold no
budget of their own: they lease slices of the store's (``take_bandwidth``)
when they run low, so every process shares one budget and the store is
asked about once per lease, never per chunk.  A tunnel without a limit has
``meter is None``: the relays test that and nothing else.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .limitstore import MemoryLimitStore
from .rules.limit import SCOPES, BandwidthLimit

__all__ = [
    "BandwidthLimit",
    "Meter",
    "TokenBucket",
    "throttle",
    "update",
]

#: A bucket holds this many seconds of its rate, and at least MIN_BURST.
BURST_SECONDS = 0.05
#: One socket read of the copying relay (Twisted reads 64 KiB at most).
MIN_BURST = 64 * 1024
#: The least a splice is granted (unless the bucket is smaller): fewer,
#: larger splices rather than one per trickle of tokens.
MIN_GRANT = 16 * 1024
#: A shared bucket leases this many seconds of its rate from the store at
#: a time (at least MIN_BURST), and asks for more at half of it.
LEASE_SECONDS = 0.05
#: The store failed: the shared bucket refills from the clock alone (this
#: process enforcing the limit by itself) for this long, then asks again.
FALLBACK_SECONDS = 1.0

#: Directions, as indices (a splice direction's ``up`` is True for 1).
DOWN, UP = 0, 1

PER_CONNECTION = "per-connection"
EACH = "each"
TOGETHER = "together"


def default_burst(rate: float) -> int:
    """What a bucket of ``rate`` holds when full."""
    return max(int(rate * BURST_SECONDS), MIN_BURST)


class TokenBucket:
    """
    Bytes allowed, refilled at ``rate`` per second of ``clock`` (an
    IReactorTime) up to ``burst``.  :meth:`take` never grants more than is
    there; :meth:`charge` books bytes already moved and may leave a debt,
    which the caller waits out before moving more.
    """

    __slots__ = ("clock", "rate", "burst", "least", "tokens", "stamp")

    def __init__(self, clock: Any, rate: float, burst: Optional[int] = None) -> None:
        if not rate > 0:
            raise ValueError(f"bandwidth: not a rate: {rate!r}")
        self.clock = clock
        self.rate = float(rate)
        self.burst = default_burst(rate) if burst is None else burst
        self.least = min(self.burst, MIN_GRANT)
        self.tokens = float(self.burst)
        self.stamp = clock.seconds()

    def refill(self) -> float:
        """The balance now."""
        now = self.clock.seconds()
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, want: int) -> int:
        """Up to ``want`` bytes, or 0 when fewer than ``min(want, least)`` are there."""
        grant = min(want, int(self.refill()))
        if grant <= 0 or grant < min(want, self.least):
            return 0
        self.tokens -= grant
        return grant

    def give_back(self, n: int) -> None:
        """Return granted bytes that were not moved."""
        self.tokens = min(self.burst, self.tokens + n)

    def charge(self, n: int) -> float:
        """Book ``n`` bytes moved; seconds to wait before moving more (0: none)."""
        # refill(), inlined: this runs per chunk of the copying relay.
        now = self.clock.seconds()
        tokens = self.tokens
        if now > self.stamp:
            tokens += (now - self.stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.stamp = now
        tokens -= n
        self.tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def wait(self, need: float) -> float:
        """Seconds until ``need`` bytes are there (0: now)."""
        missing = need - self.refill()
        return missing / self.rate if missing > 0 else 0.0

    def set_rate(self, rate: float) -> None:
        """A new rate from now on (a reload); a lowered one applies at once."""
        if not rate > 0:
            raise ValueError(f"bandwidth: not a rate: {rate!r}")
        self.refill()
        self.rate = float(rate)
        self.burst = default_burst(rate)
        self.least = min(self.burst, MIN_GRANT)
        self.tokens = min(self.tokens, self.burst)


class _Outage:
    """Whether a store is failing, to log an outage once, and its end."""

    log = Logger()

    def __init__(self) -> None:
        self.down = False

    def failed(self, failure: Failure) -> None:
        if not self.down:
            self.down = True
            self.log.warn(
                "bandwidth: the limits store failed ({why}); each process "
                "enforces shared bandwidth limits alone until it is back",
                event="socks5.bandwidth_store_down",
                why=failure.getErrorMessage(),
            )

    def recovered(self) -> None:
        if self.down:
            self.down = False
            self.log.info(
                "bandwidth: the limits store answers again",
                event="socks5.bandwidth_store_up",
            )


class LeasedBucket(TokenBucket):
    """
    A shared bucket whose budget is the store's: it refills by leasing
    slices (``store.take_bandwidth``) when below half a lease, one lease in
    flight at a time; from the clock alone while the store is failing.
    """

    __slots__ = (
        "store",
        "key",
        "lease",
        "leasing",
        "next_lease",
        "local_until",
        "outage",
    )

    def __init__(
        self, clock: Any, rate: float, store: Any, key: str, outage: _Outage
    ) -> None:
        super().__init__(clock, rate)
        self.tokens = 0.0
        self.store = store
        self.key = key
        self.lease = max(int(rate * LEASE_SECONDS), MIN_BURST)
        self.leasing = False
        self.next_lease = 0.0
        self.local_until = 0.0
        self.outage = outage

    def refill(self) -> float:
        now = self.clock.seconds()
        if now < self.local_until:
            return super().refill()
        self.stamp = now
        if self.tokens < self.lease / 2 and not self.leasing and now >= self.next_lease:
            self._ask(now)
        return self.tokens

    def give_back(self, n: int) -> None:
        self.tokens += n  # leased bytes are paid for: never capped away

    def charge(self, n: int) -> float:
        tokens = self.refill() - n
        self.tokens = tokens
        return 0.0 if tokens >= 0 else -tokens / self.rate

    def set_rate(self, rate: float) -> None:
        super().set_rate(rate)
        self.lease = max(int(rate * LEASE_SECONDS), MIN_BURST)

    def _ask(self, now: float) -> None:
        want = int(self.lease - self.tokens)
        self.leasing = True
        try:
            d = self.store.take_bandwidth(self.key, self.rate, self.burst, want)
        except Exception:  # noqa: BLE001 - a store that raises is a failing store
            self._unavailable(Failure())
            return
        d.addCallbacks(self._leased, self._unavailable, callbackArgs=(want,))

    def _leased(self, granted: int, want: int) -> None:
        self.leasing = False
        self.outage.recovered()
        self.tokens += granted
        if granted < want:
            # The shared budget is dry: it refills at ``rate`` for everyone.
            wait = min(LEASE_SECONDS, (want - granted) / self.rate)
            self.next_lease = self.clock.seconds() + wait

    def _unavailable(self, failure: Failure) -> None:
        self.leasing = False
        self.outage.failed(failure)
        now = self.clock.seconds()
        self.stamp = now
        self.local_until = now + FALLBACK_SECONDS


class _Budgets:
    """The shared buckets of one store and clock in this process, by key."""

    def __init__(self, clock: Any, store: Any) -> None:
        self.clock = clock
        #: Leased from, when other processes may share it: the memory
        #: store's budget would be this process's bucket again, with a
        #: Deferred per lease.
        self.store = None if isinstance(store, MemoryLimitStore) else store
        self.buckets: Dict[str, List[Any]] = {}  # key: [bucket, tunnels]
        self.outage = _Outage()

    def acquire(self, key: str, rate: float) -> TokenBucket:
        entry = self.buckets.get(key)
        if entry is None:
            bucket: TokenBucket
            if self.store is None:
                bucket = TokenBucket(self.clock, rate)
            else:
                bucket = LeasedBucket(self.clock, rate, self.store, key, self.outage)
            entry = self.buckets[key] = [bucket, 0]
        elif entry[0].rate != rate:
            entry[0].set_rate(rate)
        entry[1] += 1
        bucket = entry[0]
        return bucket

    def release(self, key: str) -> None:
        entry = self.buckets.get(key)
        if entry is not None:
            entry[1] -= 1
            if entry[1] <= 0:
                del self.buckets[key]
                if not self.buckets:
                    _BUDGETS.pop((id(self.clock), id(self.store)), None)


_BUDGETS: Dict[Tuple[int, int], _Budgets] = {}


def budgets(clock: Any, store: Any) -> _Budgets:
    """The shared buckets of ``store`` (``None``: this process alone)."""
    key = (id(clock), id(store))
    found = _BUDGETS.get(key)
    if found is None:
        found = _BUDGETS[key] = _Budgets(clock, store)
    return found


@implementer(IPushProducer)
class _Gate:
    """
    What a consumer sees as its producer in place of the transport that
    feeds it: the transport reads only while neither the consumer (its
    buffer is full) nor the bucket (``held``) says stop.
    """

    __slots__ = ("source", "consumer", "paused", "held")

    def __init__(self, source: Any, consumer: Any) -> None:
        self.source = source
        self.consumer = consumer
        self.paused = bool(getattr(consumer, "producerPaused", False))
        self.held = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.source.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        if not self.held:
            self.source.resumeProducing()

    def stopProducing(self) -> None:
        self.source.stopProducing()

    def hold(self) -> None:
        self.held = True
        # Not once the splice relay or the close took the transports over:
        # the reactor knows a socket by its descriptor, and stopReading()
        # would unregister the splice relay's reader.
        if self.consumer.producer is self:
            self.source.pauseProducing()

    def release(self) -> None:
        self.held = False
        if not self.paused and self.consumer.producer is self:
            self.source.resumeProducing()


class Meter:
    """One tunnel's (or UDP association's) buckets, by direction."""

    def __init__(self, clock: Any, store: Any, counters: Any = None) -> None:
        self.clock = clock
        self.store = store
        self.counters = counters
        self.buckets: List[Tuple[TokenBucket, ...]] = [(), ()]
        self.limits: Tuple[Any, ...] = ()
        #: Shared buckets held, to release: (budgets, key).
        self.held: List[Tuple[_Budgets, str]] = []
        self.gates: List[Optional[_Gate]] = [None, None]
        #: By direction: (the producer that reads it, the consumer it is
        #: registered with), once known (see :meth:`link`, :meth:`feed`).
        self.feeds: List[Optional[Tuple[Any, Any]]] = [None, None]
        self.timers: List[Any] = [None, None]
        self.waiting: List[Optional[Callable[[], None]]] = [None, None]
        #: The (down, up) buckets of each limit, in ``limits``' order.
        self._pairs: List[Tuple[TokenBucket, TokenBucket]] = []

    # ------------------------------------------------------------------
    # Limits

    def set_limits(self, limits: Sequence[Any]) -> None:
        """Use these limits' buckets from now on (shared ones acquired)."""
        old_held = self.held
        # A reload keeps a tunnel's own buckets (and what they hold).
        own = {
            _identity(limit): pair
            for limit, pair in zip(self.limits, self._pairs)
            if limit.scope == PER_CONNECTION
        }
        held = self.held = []
        pairs = self._pairs = []
        for limit in limits:
            rate = float(limit.rate_bytes_per_s)
            together = getattr(limit, "directions", EACH) == TOGETHER
            if limit.scope != PER_CONNECTION:
                shared = budgets(self.clock, self.store)
                key = limit.key
                if together:
                    one = shared.acquire(f"{key}:both", rate)
                    held.append((shared, f"{key}:both"))
                    pairs.append((one, one))
                    continue
                pairs.append(
                    (
                        shared.acquire(f"{key}:down", rate),
                        shared.acquire(f"{key}:up", rate),
                    )
                )
                held += ((shared, f"{key}:down"), (shared, f"{key}:up"))
                continue
            pair = own.get(_identity(limit)) if own else None
            if pair is None:
                first = TokenBucket(self.clock, rate)
                pair = (first, first if together else TokenBucket(self.clock, rate))
            for bucket in pair:
                if bucket.rate != rate:
                    bucket.set_rate(rate)
            pairs.append(pair)
        self.limits = tuple(limits)
        self.buckets = [tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)]
        for shared, key in old_held:
            shared.release(key)

    # ------------------------------------------------------------------
    # The copying relay

    def link(self, outbound_transport: Any, client: Any) -> None:
        """
        The ordinary relay has just cross-registered the two transports:
        each way gets its gate when its bucket first runs dry (most tunnels
        never do), at once if in debt already.
        """
        self.feeds = [(outbound_transport, client), (client, outbound_transport)]
        self.gates = [None, None]
        for way in (DOWN, UP):
            if any(b.tokens < 0 for b in self.buckets[way]):
                self._hold(way, 0.0)

    def feed(self, way: int, source: Any, consumer: Any) -> None:
        """
        ``source`` (a push producer registered with ``consumer``) carries
        ``way`` from now on: a forwarded HTTP request's origin transport and
        the client's request (down), its body and the origin (up).  Booked
        with :meth:`moved` as the copying relay's bytes are.
        """
        self.feeds[way] = (source, consumer)
        self.gates[way] = None
        if any(b.tokens < 0 for b in self.buckets[way]):
            self._hold(way, 0.0)

    def _gate(self, way: int) -> Optional[_Gate]:
        """Put a gate between ``way``'s consumer and the transport feeding it."""
        feed = self.feeds[way]
        if feed is None:
            return None
        source, consumer = feed
        if consumer.producer is not source:  # the splice relay or the close has it
            return None
        gate = self.gates[way] = _Gate(source, consumer)
        consumer.unregisterProducer()
        consumer.registerProducer(gate, True)
        return gate

    def _hold(self, way: int, delay: float) -> None:
        """Stop reading ``way`` for ``delay`` seconds (then look again)."""
        gate = self.gates[way] or self._gate(way)
        if gate is not None:
            gate.hold()
            self._later(way, delay, lambda: self._reopen(way))

    def moved(self, way: int, n: int) -> None:
        """The copying relay moved ``n`` bytes ``way``: hold it if in debt."""
        buckets = self.buckets[way]
        if len(buckets) == 1:  # the common case, per chunk
            delay = buckets[0].charge(n)
        else:
            delay = max([b.charge(n) for b in buckets], default=0.0)
        if delay > 0.0:
            self._hold(way, delay)

    def _reopen(self, way: int) -> None:
        gate = self.gates[way]
        if gate is None:
            return
        delay = max([b.wait(0) for b in self.buckets[way]], default=0.0)
        if delay > 0.0:
            gate.hold()
            self._later(way, delay, lambda: self._reopen(way))
        elif gate.held and not self._ended(way):
            gate.release()

    def _ended(self, way: int) -> bool:
        counters = self.counters
        if counters is None:
            return False
        return bool(counters.up_closed if way == UP else counters.down_closed)

    # ------------------------------------------------------------------
    # The splice relay

    def splice(self, relay: Any, d: Any, splice: Callable[..., int], flags: int) -> int:
        """
        Splice from ``d``'s source into its pipe no more than the buckets
        grant: the bytes moved, or -1 when there are no tokens (``relay``'s
        pump runs again once there should be).
        """
        way = UP if d.up else DOWN
        want = self.grant(way, d.size)
        if not want:
            delay = max(b.wait(min(d.size, b.least)) for b in self.buckets[way])
            self._later(way, delay, lambda: relay.pump(d))
            return -1
        try:
            n = splice(d.src.fd, d.pipe_w, want, None, None, flags)
        except BaseException:
            self.give_back(way, want)
            raise
        if n < want:
            self.give_back(way, want - n)
        return n

    def grant(self, way: int, want: int) -> int:
        """Up to ``want`` bytes from every bucket of ``way`` (0: not now)."""
        buckets = self.buckets[way]
        if len(buckets) == 1:  # the common case, per splice
            bucket = buckets[0]
            grant = min(want, int(bucket.refill()))
            if grant <= 0 or grant < min(want, bucket.least):
                return 0
            bucket.tokens -= grant
            return grant
        if not buckets:
            return want
        grant = min(want, int(min(b.refill() for b in buckets)))
        least = min(want, min(b.least for b in buckets))
        if grant <= 0 or grant < least:
            return 0
        for bucket in buckets:
            bucket.tokens -= grant
        return grant

    def give_back(self, way: int, n: int) -> None:
        for bucket in self.buckets[way]:
            bucket.give_back(n)

    # ------------------------------------------------------------------
    # UDP

    def admit(self, way: int, n: int) -> bool:
        """Whether a datagram of ``n`` bytes may go ``way`` (booked if so)."""
        buckets = self.buckets[way]
        if any(b.refill() < n for b in buckets):
            return False
        for bucket in buckets:
            bucket.tokens -= n
        return True

    # ------------------------------------------------------------------
    # Timers

    def _later(self, way: int, delay: float, then: Callable[[], None]) -> None:
        """
        Run ``then`` in ``delay`` seconds, or when the wait already pending
        ends (``then`` looks again, and waits more if need be): the latest
        ``then`` wins, as the relay of a direction may change meanwhile.
        """
        self.waiting[way] = then
        if self.timers[way] is None:
            self.timers[way] = self.clock.callLater(delay, self._fire, way)

    def _fire(self, way: int) -> None:
        self.timers[way] = None
        then, self.waiting[way] = self.waiting[way], None
        if then is not None:
            then()

    def wake(self) -> None:
        """Look again now (the limits changed): waits are recomputed."""
        for way in (DOWN, UP):
            timer = self.timers[way]
            if timer is not None:
                timer.cancel()
                self._fire(way)

    def stop(self) -> None:
        """The tunnel ended: no more timers, shared buckets released."""
        for way in (DOWN, UP):
            timer, self.timers[way] = self.timers[way], None
            self.waiting[way] = None
            if timer is not None and timer.active():
                timer.cancel()
        self.gates = [None, None]
        self.feeds = [None, None]
        held, self.held = self.held, []
        for shared, key in held:
            shared.release(key)


def _identity(limit: Any) -> Tuple[str, str, str]:
    return (limit.scope, limit.key, getattr(limit, "directions", EACH))


def throttle(target: Any, limits: Sequence[Any], store: Any = None) -> Optional[Meter]:
    """
    Put ``limits`` (:class:`BandwidthLimit` or alike) on ``target``, a
    :class:`~twisted_socks5.tunnel.Tunnel`, or anything that keeps its
    ``meter`` itself and has a ``reactor`` (a
    :class:`~twisted_socks5.udp.UDPAssociation`, a forwarded HTTP request),
    before or after it started.
    ``store`` (an ``ILimitStore``, or ``None``) backs the shared buckets.
    """
    if not limits:
        return None
    for limit in limits:
        if limit.scope not in SCOPES:
            raise ValueError(f"bandwidth: unknown scope {limit.scope!r}")
    if hasattr(target, "meter"):  # a UDP association, a forwarded request
        meter = Meter(target.reactor, store)
        meter.set_limits(limits)
        target.meter = meter
        return meter
    counters = target.counters
    meter = Meter(target.settings.reactor, store, counters)
    meter.set_limits(limits)
    counters.meter = meter
    outbound = target.outbound
    if outbound is not None and outbound.counters is not None and target.splice is None:
        meter.link(outbound.transport, target.client)  # copying already
    return meter


def update(target: Any, limits: Sequence[Any], store: Any = None) -> None:
    """
    The rules were reloaded: ``limits`` apply to ``target`` from now on
    (none: it runs free).  A lowered rate holds at once.
    """
    holder = target if hasattr(target, "meter") else target.counters
    meter: Optional[Meter] = holder.meter
    if meter is None:
        if store is None:  # the server's store, for shared budgets
            settings = getattr(target, "settings", None)
            store = getattr(getattr(settings, "limiter", None), "store", None)
        throttle(target, limits, store)
        return
    if not limits:
        holder.meter = None
        meter.set_limits(())
        meter.wake()
        meter.stop()
        return
    meter.set_limits(limits)
    meter.wake()
