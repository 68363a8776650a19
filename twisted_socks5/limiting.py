"""
Enforcing the rules file's ``limit`` lines: sessions, rates and quotas on
each request (once the user is known), the bytes of live tunnels counted
into the quotas, tunnels cut when a quota is used up, and what a store that
cannot answer means (``--limits-on-store-failure``).

A server whose rules have no ``limit`` line pays two tests per request (a
limiter, and :attr:`Limiter.active`): no store call, no object per
connection.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .limitstore import ILimitStore, LimitStoreUnavailable
from .logs import escape
from .rules.limit import BandwidthLimit, LimitLine

#: How often the bytes of live tunnels are added to their quotas (seconds).
DEFAULT_FLUSH_INTERVAL = 5.0
#: Users whose last known quota usage the console can show.
USAGE_SHOWN = 65536
#: --limits-on-store-failure values.
STORE_FAILURE_MODES = ("open", "closed")


def _shown(text: str) -> str:
    """``text`` for an error message, any URL password hidden (i14-redis)."""
    head, at, tail = text.rpartition("@")
    if not at:
        return repr(text)
    scheme, sep, _ = head.partition("://")
    return repr(f"{scheme}{sep}***@{tail}" if sep else f"***@{tail}")


def parse_store_url(text: str) -> str:
    """``memory``, ``redis://HOST:PORT/DB`` or ``rediss://...``, else ValueError."""
    if text == "memory":
        return text
    scheme, sep, rest = text.partition("://")
    if scheme not in ("redis", "rediss") or not sep:
        raise ValueError(
            f"memory, redis://HOST:PORT/DB or rediss://..., not {_shown(text)}"
        )
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ValueError(f"bad URL {_shown(text)}: {e}") from None
    if not parts.hostname:
        raise ValueError(f"no host in {_shown(text)}")
    database = parts.path.lstrip("/")
    if database and not (database.isascii() and database.isdigit()):
        raise ValueError(f"the database of {_shown(text)} is a number")
    return text


def build_store(
    url: str, reactor: Any, state_file: Optional[str] = None
) -> ILimitStore:
    """The store ``url`` names (see :func:`parse_store_url`)."""
    if url == "memory":
        from .limitstore import MemoryLimitStore

        return MemoryLimitStore(reactor, state_file)
    # Written by the Redis branch; options.py checked that it loads.
    redisstore = importlib.import_module("twisted_socks5.redisstore")
    store: ILimitStore = redisstore.RedisLimitStore(url, reactor)
    return store


def _bandwidth() -> Any:
    """The bandwidth module (written by the bandwidth branch), if present."""
    try:
        return importlib.import_module("twisted_socks5.bandwidth")
    except ImportError:
        return None


class Held:
    """
    What one admitted connection holds in the limits: its counted session
    (released once, at close), its quotas and the bytes already reported.
    """

    __slots__ = ("who", "session", "quotas", "reported", "bandwidth", "unsent")

    def __init__(self, who: str) -> None:
        #: The store key of whom the limits count (``user:NAME``, ``client:IP``).
        self.who = who
        #: The key of the session counted for it, ``None`` when none was.
        self.session: Optional[str] = None
        self.quotas: Tuple[LimitLine, ...] = ()
        self.bandwidth: Tuple[LimitLine, ...] = ()
        self.reported = 0
        #: Bytes a failed store call did not add, by period (sent again).
        self.unsent: Dict[str, int] = {}


def _bytes_of(ctx: Any) -> int:
    """Bytes both ways so far: the tunnel's, or a UDP association's."""
    counters = ctx.counters
    total: int = counters.bytes_up + counters.bytes_down
    udp = ctx.udp
    if udp is not None:
        total += udp.counters.bytes_up + udp.counters.bytes_down
    return total


def within_limits(
    ctx: Any, request: Any, handler: Any, proceed: Callable[[], None]
) -> None:
    """
    ``proceed()`` once the server's limits allow ``request`` (at once when
    its rules have no ``limit`` line), else answer it 0x02: the one entry
    for every protocol (SOCKS5, SOCKS4, HTTP CONNECT and forwarded requests).
    """
    limiter = ctx.factory.limiter
    if limiter is not None and limiter.active:
        limiter.admit(ctx, request, handler, proceed)
    else:
        proceed()


class Limiter:
    """
    The ``limit`` lines of a server's rules, enforced with ``store``.  One
    per factory (``factory.limiter``), made only when the server has rules.
    """

    log = Logger()

    def __init__(
        self,
        factory: Any,
        store: ILimitStore,
        on_store_failure: str = "closed",
        per_user_metrics: bool = False,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
    ) -> None:
        if on_store_failure not in STORE_FAILURE_MODES:
            raise ValueError(
                f"--limits-on-store-failure: open or closed, not {on_store_failure!r}"
            )
        self.factory = factory
        self.store = store
        self.fail_open = on_store_failure == "open"
        self.per_user_metrics = per_user_metrics
        self.flush_interval = flush_interval
        #: Admitted connections holding a session, a quota or a bandwidth.
        self.live: Set[Any] = set()
        #: Whether the store failed last time it was asked (logged once).
        self.store_down = False
        self._flushing: Optional[task.LoopingCall] = None
        #: The last usage the store reported, by (who, period): what the
        #: console shows, with no store call while nobody looks.
        self.usage: Dict[Tuple[str, str], int] = {}

    def __repr__(self) -> str:
        return f"<limits of the rules, store {self.store!r}>"

    # -- lifecycle -----------------------------------------------------

    def start(self) -> defer.Deferred[None]:
        loop = self._flushing = task.LoopingCall(self.flush)
        loop.clock = self.factory.reactor
        loop.start(self.flush_interval, now=False)
        return self.store.start()

    def stop(self) -> defer.Deferred[None]:
        if self._flushing is not None and self._flushing.running:
            self._flushing.stop()
        self.flush()
        return self.store.stop()

    def stop_after(self, drained: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """``drained``, then :meth:`stop` (the last tunnels' bytes count)."""

        def stop(result: Any) -> Any:
            return self.stop().addCallback(lambda _: result)

        return drained.addBoth(stop)

    @property
    def active(self) -> bool:
        """Whether the rules in force have a ``limit`` line."""
        return bool(getattr(self.factory.policy, "limits", ()))

    # -- the request ---------------------------------------------------

    def lines_for(self, ctx: Any, request: Any, handler: Any) -> Tuple[LimitLine, ...]:
        decision = ctx.decision
        lines: Tuple[LimitLine, ...] = self.factory.policy.limits_for(
            ctx.policy_ip,
            ctx.user,
            request.command,
            handler.rules_destination(request),
            getattr(decision, "via", None),
            getattr(ctx, "protocol", "socks5"),
        )
        return lines

    def who(self, ctx: Any) -> str:
        """Whom the limits count: the user, else the client (its per-client key)."""
        if ctx.user is not None:
            return f"user:{ctx.user}"
        return f"client:{self.factory.limits.key(ctx.policy_ip)}"

    def admit(
        self, ctx: Any, request: Any, handler: Any, proceed: Callable[[], None]
    ) -> None:
        """
        Check the limits that apply to ``request``; ``proceed()`` when they
        allow it, else answer 0x02 naming the limit.
        """
        lines = self.lines_for(ctx, request, handler)
        if not lines:
            proceed()
            return
        who = self.who(ctx)
        held = Held(who)
        by_kind: Dict[str, List[LimitLine]] = {}
        for line in lines:
            by_kind.setdefault(line.kind, []).append(line)
        held.quotas = tuple(by_kind.get("quota", ()))
        held.bandwidth = tuple(by_kind.get("bandwidth", ()))
        steps: List[Callable[[], defer.Deferred[Optional[str]]]] = []
        # Rates first (every request counts), sessions last (only an
        # admitted request holds one).
        for rate in by_kind.get("rate", ()):
            steps.append(functools.partial(self._rate, who, rate))
        for quota in held.quotas:
            steps.append(functools.partial(self._quota, who, quota))
        for sessions in by_kind.get("sessions", ()):
            steps.append(functools.partial(self._session, held, sessions))
        self._run(ctx, held, steps, proceed)

    def _run(
        self,
        ctx: Any,
        held: Held,
        steps: List[Callable[[], defer.Deferred[Optional[str]]]],
        proceed: Callable[[], None],
    ) -> None:
        """
        The checks in order, the first refusal ending them.  A store that
        answers at once (the memory store) runs them in this call, without
        chaining Deferreds; one that answers later holds the request.
        """
        while steps:
            box: List[Any] = []
            d = steps.pop(0)().addBoth(box.append)
            if not box:
                ctx.hold()  # a remote store: stop parsing until it answers
                d.addCallback(self._resumed, box, ctx, held, steps, proceed)
                d.addErrback(self._unexpected, ctx, held)
                return
            if not self._go_on(box[0], ctx, held):
                return
        self._decided(ctx, held, proceed)

    def _resumed(
        self,
        _: None,
        box: List[Any],
        ctx: Any,
        held: Held,
        steps: List[Callable[[], defer.Deferred[Optional[str]]]],
        proceed: Callable[[], None],
    ) -> None:
        if self._go_on(box[0], ctx, held):
            self._run(ctx, held, steps, proceed)

    def _go_on(self, outcome: Any, ctx: Any, held: Held) -> bool:
        """Whether the checks go on after one answered ``outcome``."""
        if isinstance(outcome, Failure):
            self._unexpected(outcome, ctx, held)
            return False
        if ctx.closing:  # the client left while the store answered
            self._release(held)
            return False
        if outcome is not None:
            self._release(held)
            ctx.deny(outcome)
            return False
        return True

    def _decided(self, ctx: Any, held: Held, proceed: Callable[[], None]) -> None:
        if ctx.closing:
            self._release(held)
            return
        if held.session is not None or held.quotas or held.bandwidth:
            held.reported = _bytes_of(ctx)
            ctx.limited = held
            self.live.add(ctx)
        proceed()

    def _unexpected(self, failure: Failure, ctx: Any, held: Held) -> None:
        self.log.failure("checking the limits failed", failure)
        self._release(held)
        if not ctx.closing:
            ctx.deny("limits: internal error")

    def _refused(self, line: LimitLine, who: str, detail: str) -> str:
        self._count(line.kind, who)
        return f"limit {line.description} ({detail})"

    def _count(self, kind: str, who: str) -> None:
        metrics = self.factory.metrics
        if metrics is None:
            return
        user = None
        if self.per_user_metrics:
            user = who[5:] if who.startswith("user:") else "-"
        metrics.limit_refused(kind, user)

    def _store_failed(self, failure: Failure, what: str) -> bool:
        """Log a store outage once; True when a refused check allows (open)."""
        failure.trap(LimitStoreUnavailable)
        if not self.store_down:
            self.store_down = True
            self.log.error(
                "the limits store is unavailable ({error}); "
                "limits {mode} until it is back",
                error=escape(failure.getErrorMessage()),
                mode="are not enforced" if self.fail_open else "refuse requests",
                event="socks5.limits_store_down",
            )
        return self.fail_open

    def _store_answered(self) -> None:
        if self.store_down:
            self.store_down = False
            self.log.info(
                "the limits store is available again",
                event="socks5.limits_store_up",
            )

    def _rate(self, who: str, line: LimitLine) -> defer.Deferred[Optional[str]]:
        def answered(allowed: bool) -> Optional[str]:
            self._store_answered()
            if allowed:
                return None
            return self._refused(line, who, f"more than {line.count} requests")

        def failed(failure: Failure) -> Optional[str]:
            # A rate that cannot be counted allows, whatever the mode: see
            # docs/limits.rst (sessions and quotas follow the mode).
            self._store_failed(failure, "rate")
            return None

        return self.store.hit_rate(who, line.count, line.interval).addCallbacks(
            answered, failed
        )

    def _quota(self, who: str, line: LimitLine) -> defer.Deferred[Optional[str]]:
        def answered(used: int) -> Optional[str]:
            self._store_answered()
            if used < line.nbytes:
                return None
            return self._refused(line, who, f"{used} bytes used this {line.period}")

        def failed(failure: Failure) -> Optional[str]:
            if self._store_failed(failure, "quota"):
                return None
            self._count("store", who)
            return f"limit {line.description} (limits store unavailable)"

        return self.store.quota_used(who, line.period).addCallbacks(answered, failed)

    def _session(self, held: Held, line: LimitLine) -> defer.Deferred[Optional[str]]:
        def answered(admitted: bool) -> Optional[str]:
            self._store_answered()
            if admitted:
                held.session = held.who
                return None
            return self._refused(line, held.who, f"{line.count} open")

        def failed(failure: Failure) -> Optional[str]:
            if self._store_failed(failure, "sessions"):
                return None
            self._count("store", held.who)
            return f"limit {line.description} (limits store unavailable)"

        return self.store.open_session(held.who, line.count).addCallbacks(
            answered, failed
        )

    # -- the tunnel ----------------------------------------------------

    def bandwidth_limits(self, ctx: Any, held: Held) -> List[BandwidthLimit]:
        """The bandwidth limits of ``ctx``'s tunnel, with their bucket keys."""
        limits = []
        for line in held.bandwidth:
            if line.scope == "per-user":
                key = held.who
            elif line.scope == "per-rule":
                key = f"rule:{line.line}"
            else:
                key = f"connection:{id(ctx)}"
            limits.append(BandwidthLimit(float(line.nbytes), line.scope, key))
        return limits

    def tunnel_started(self, ctx: Any, tunnel: Any) -> None:
        """Throttle a new tunnel whose request a bandwidth line applied to."""
        held = ctx.limited
        if held is None or not held.bandwidth:
            return
        bandwidth = _bandwidth()
        if bandwidth is not None:
            bandwidth.throttle(tunnel, self.bandwidth_limits(ctx, held), self.store)

    def closed(self, ctx: Any) -> None:
        """The connection is gone: report its last bytes, release its session."""
        held = ctx.limited
        if held is None:
            return
        ctx.limited = None
        self.live.discard(ctx)
        self._report(ctx, held)
        self._release(held)

    def _release(self, held: Held) -> None:
        key, held.session = held.session, None
        if key is not None:
            self.store.close_session(key).addErrback(self._release_failed)

    def _release_failed(self, failure: Failure) -> None:
        # A shared store's sessions are leases that expire by themselves.
        self._store_failed(failure, "sessions")

    # -- quotas of live tunnels -----------------------------------------

    def flush(self) -> None:
        """Add the bytes of live tunnels to their quotas (a timer calls it)."""
        for ctx in list(self.live):
            held = ctx.limited
            if held is not None:
                self._report(ctx, held)

    def _report(self, ctx: Any, held: Held) -> None:
        if not held.quotas:
            return
        total = _bytes_of(ctx)
        delta = max(0, total - held.reported)
        held.reported = total
        for line in held.quotas:
            nbytes = delta + held.unsent.pop(line.period, 0)
            self._add(held, line, nbytes)

    def _add(self, held: Held, line: LimitLine, nbytes: int) -> None:
        """Add ``nbytes`` to ``held``'s usage of ``line``'s period, then check it."""
        d = self.store.add_usage(held.who, line.period, nbytes)
        d.addCallbacks(
            self._used,
            self._usage_failed,
            callbackArgs=(held.who, line),
            errbackArgs=(held, line, nbytes),
        )

    def _usage_failed(
        self, failure: Failure, held: Held, line: LimitLine, nbytes: int
    ) -> None:
        self._store_failed(failure, "quota")
        held.unsent[line.period] = held.unsent.get(line.period, 0) + nbytes

    def _used(self, total: int, who: str, line: LimitLine) -> None:
        self._store_answered()
        usage, key = self.usage, (who, line.period)
        usage.pop(key, None)  # the newest last, the oldest forgotten first
        usage[key] = total
        if len(usage) > USAGE_SHOWN:
            del usage[next(iter(usage))]
        if total >= line.nbytes:
            self.used_up(who, line.period, total)

    def used_up(self, who: str, period: str, total: int) -> None:
        """Cut the live tunnels of ``who`` whose ``period`` quota ``total`` reaches."""
        for ctx in list(self.live):
            held = ctx.limited
            if held is None or held.who != who or ctx.closing:
                continue
            for line in held.quotas:
                if line.period == period and total >= line.nbytes:
                    self._cut(ctx, line)
                    break

    def _cut(self, ctx: Any, line: LimitLine) -> None:
        self.log.warn(
            "quota used up: closing a tunnel of {who} ({limit})",
            who=escape(ctx.limited.who),
            limit=escape(line.description),
            event="socks5.quota_cut",
        )
        ctx.rule = f"limit {line.description}"
        ctx.outcome = f"quota used up: limit {line.description}"
        ctx.transport.abortConnection()

    def user_view(self, user: str) -> Dict[str, Any]:
        """
        What the limits hold of ``user`` now, for the console: sessions
        open, and the quotas and bandwidth lines of their live tunnels
        (usage as of the last flush, ``None`` before the first).
        """
        who = f"user:{user}"
        sessions = 0
        quotas: Dict[str, Dict[str, Any]] = {}
        bandwidth: Set[str] = set()
        for ctx in self.live:
            held = ctx.limited
            if held is None or held.who != who:
                continue
            sessions += held.session is not None
            for line in held.quotas:
                quotas[line.description] = {
                    "line": line.description,
                    "limit": line.nbytes,
                    "used": self.usage.get((who, line.period)),
                }
            bandwidth.update(line.description for line in held.bandwidth)
        return {
            "sessions": sessions,
            "quotas": sorted(quotas.values(), key=lambda q: str(q["line"])),
            "bandwidth": sorted(bandwidth),
        }

    # -- reload --------------------------------------------------------

    def reload(self) -> None:
        """
        Apply the reloaded rules' limits to live tunnels: their quotas (cut
        at once when used up) and bandwidth; sessions already open stay.
        """
        handlers = self.factory.handlers
        for ctx in list(self.factory.active):
            # An HTTP connection's forwarded request holds its own limits.
            ctx = getattr(ctx, "forward", None) or ctx
            request = ctx.request
            if request is None or ctx.closing or ctx.reply is None:
                continue
            handler = handlers.get(request.command)
            if handler is None:
                continue
            held = ctx.limited
            lines = self.lines_for(ctx, request, handler) if self.active else ()
            quotas = tuple(line for line in lines if line.kind == "quota")
            bandwidth = tuple(line for line in lines if line.kind == "bandwidth")
            if held is None:
                if not (quotas or bandwidth):
                    continue
                held = ctx.limited = Held(self.who(ctx))
                held.reported = _bytes_of(ctx)
                self.live.add(ctx)
            else:
                self._report(ctx, held)  # at the old quotas' rates
            held.quotas, old_bandwidth, held.bandwidth = (
                quotas,
                held.bandwidth,
                bandwidth,
            )
            self._check_quotas(held)
            tunnel = getattr(ctx, "tunnel", None) or getattr(ctx, "udp", None)
            if tunnel is not None and (bandwidth or old_bandwidth):
                self._update_bandwidth(tunnel, self.bandwidth_limits(ctx, held))

    def _check_quotas(self, held: Held) -> None:
        for line in held.quotas:
            self._add(held, line, 0)

    def _update_bandwidth(self, tunnel: Any, limits: List[BandwidthLimit]) -> None:
        bandwidth = _bandwidth()
        if bandwidth is not None:
            bandwidth.update(tunnel, limits)
