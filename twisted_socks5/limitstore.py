"""
Where the per-user limits keep their counters: open sessions, request
rates, quota usage and bandwidth budgets.

A store is an :class:`ILimitStore`; every method returns a Deferred so that
a shared store (Redis) and the embedded one (:class:`MemoryLimitStore`) are
used the same way.  A store whose backend is down fails its Deferreds with
:class:`LimitStoreUnavailable`; what a refused check then means
(``--limits-on-store-failure``) is decided by the caller, not the store.
"""

from __future__ import annotations

import calendar
import contextlib
import datetime
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface, implementer

#: The quota periods, calendar-aligned in UTC.
PERIODS = ("hour", "day", "week", "month")

#: How often the memory store writes its quota usage (seconds).
DEFAULT_SAVE_INTERVAL = 30.0
#: How often expired rate windows and full, idle buckets are forgotten.
_PRUNE_INTERVAL = 60.0
#: The state file's format.
STATE_VERSION = 1


class LimitStoreUnavailable(Exception):
    """What a store's Deferred fails with when its backend is down."""


class ILimitStore(Interface):
    """
    Counters shared by everything enforcing one set of limits.  ``key`` is
    a string built by the caller (``"user:alice"``, ``"client:10.0.0.1"``,
    ``"rule:3"``); every method returns a Deferred.
    """

    def open_session(key: str, maximum: int) -> Deferred[bool]:
        """Count a session of ``key`` unless it has ``maximum``: True if counted."""

    def close_session(key: str) -> Deferred[None]:
        """Release one session counted by :meth:`open_session`."""

    def hit_rate(key: str, maximum: int, interval: float) -> Deferred[bool]:
        """Count one request of ``key``: True if at most ``maximum`` in its window."""

    def add_usage(key: str, period: str, nbytes: int) -> Deferred[int]:
        """Add ``nbytes`` to ``key``'s usage in the current ``period``; the total."""

    def quota_used(key: str, period: str) -> Deferred[int]:
        """Bytes ``key`` used in the current ``period``."""

    def take_bandwidth(key: str, rate: float, burst: int, want: int) -> Deferred[int]:
        """Bytes granted now (0..want) from the token bucket ``key``."""

    def start() -> Deferred[None]:
        """Begin (load saved state, start timers)."""

    def stop() -> Deferred[None]:
        """End (save state, stop timers)."""


def period_bounds(period: str, now: float) -> Tuple[int, int]:
    """
    The UTC calendar period (``hour``, ``day``, ``week`` from Monday 00:00,
    ``month``) holding the POSIX time ``now``: its start and end, in POSIX
    seconds.
    """
    moment = datetime.datetime.fromtimestamp(int(now), tz=datetime.timezone.utc)
    if period == "hour":
        start = moment.replace(minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(hours=1)
    elif period == "day":
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        end = start + datetime.timedelta(days=1)
    elif period == "week":
        day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - datetime.timedelta(days=day.weekday())
        end = start + datetime.timedelta(days=7)
    elif period == "month":
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        end = (start + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise ValueError(
            f"unknown quota period {period!r}; one of {', '.join(PERIODS)}"
        )
    return calendar.timegm(start.timetuple()), calendar.timegm(end.timetuple())


class _Bucket:
    __slots__ = ("tokens", "updated")

    def __init__(self, tokens: float, updated: float) -> None:
        self.tokens = tokens
        self.updated = updated


@implementer(ILimitStore)
class MemoryLimitStore:
    """
    The embedded store, for one process.

    Rates count in a fixed window per key that starts with its first
    request (as Redis's INCR + EXPIRE does, so both stores mean the same).
    Quota usage is saved to ``state_file`` (when given) every
    ``save_interval`` seconds when it changed and at :meth:`stop`, written
    to a temporary file, synced and renamed over the old one; sessions,
    rates and buckets are not saved (a restart closes every session).
    """

    log = Logger()

    def __init__(
        self,
        clock: Any = None,
        state_file: Optional[str] = None,
        save_interval: float = DEFAULT_SAVE_INTERVAL,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        self.state_file = state_file
        self.save_interval = save_interval
        self.sessions: Dict[str, int] = {}
        self.windows: Dict[str, Tuple[float, int]] = {}
        #: (key, period) -> [period start, bytes used]
        self.usage: Dict[Tuple[str, str], List[int]] = {}
        self.buckets: Dict[str, _Bucket] = {}
        self._periods: Dict[str, Tuple[int, int]] = {}
        self._dirty = False
        self._save_failing = False
        self._loops: List[task.LoopingCall] = []

    def __repr__(self) -> str:
        return f"<MemoryLimitStore state_file={self.state_file!r}>"

    # sessions

    def open_session(self, key: str, maximum: int) -> Deferred[bool]:
        count = self.sessions.get(key, 0)
        if count >= maximum:
            return defer.succeed(False)
        self.sessions[key] = count + 1
        return defer.succeed(True)

    def close_session(self, key: str) -> Deferred[None]:
        count = self.sessions.get(key, 0) - 1
        if count > 0:
            self.sessions[key] = count
        else:
            self.sessions.pop(key, None)
        return defer.succeed(None)

    # rates

    def hit_rate(self, key: str, maximum: int, interval: float) -> Deferred[bool]:
        now = self.clock.seconds()
        start, count = self.windows.get(key, (now, 0))
        if now - start >= interval or now < start:
            start, count = now, 0
        if count >= maximum:
            self.windows[key] = (start, count)
            return defer.succeed(False)
        self.windows[key] = (start, count + 1)
        return defer.succeed(True)

    # quotas

    def _start(self, period: str) -> int:
        """The start of the current ``period`` (computed once per period)."""
        now = self.clock.seconds()
        bounds = self._periods.get(period)
        if bounds is None or not bounds[0] <= now < bounds[1]:
            bounds = self._periods[period] = period_bounds(period, now)
        return bounds[0]

    def _slot(self, key: str, period: str) -> List[int]:
        start = self._start(period)
        slot = self.usage.get((key, period))
        if slot is None or slot[0] != start:
            slot = [start, 0]
            self.usage[(key, period)] = slot
        return slot

    def add_usage(self, key: str, period: str, nbytes: int) -> Deferred[int]:
        slot = self._slot(key, period)
        if nbytes > 0:
            slot[1] += nbytes
            self._dirty = True
        return defer.succeed(slot[1])

    def quota_used(self, key: str, period: str) -> Deferred[int]:
        start = self._start(period)
        slot = self.usage.get((key, period))
        return defer.succeed(slot[1] if slot is not None and slot[0] == start else 0)

    # bandwidth

    def take_bandwidth(
        self, key: str, rate: float, burst: int, want: int
    ) -> Deferred[int]:
        now = self.clock.seconds()
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = _Bucket(float(burst), now)
        elif now > bucket.updated:
            bucket.tokens = min(
                float(burst), bucket.tokens + (now - bucket.updated) * rate
            )
            bucket.updated = now
        else:
            bucket.tokens = min(float(burst), bucket.tokens)
        granted = max(0, min(want, int(bucket.tokens)))
        bucket.tokens -= granted
        return defer.succeed(granted)

    # lifecycle

    def start(self) -> Deferred[None]:
        self.load()
        prune = task.LoopingCall(self.prune)
        prune.clock = self.clock
        prune.start(_PRUNE_INTERVAL, now=False)
        self._loops.append(prune)
        if self.state_file is not None:
            save = task.LoopingCall(self._save_if_dirty)
            save.clock = self.clock
            save.start(self.save_interval, now=False)
            self._loops.append(save)
        return defer.succeed(None)

    def stop(self) -> Deferred[None]:
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        self._save_if_dirty()
        return defer.succeed(None)

    def prune(self) -> None:
        """Forget ended rate windows and past quota periods (bounded memory)."""
        now = self.clock.seconds()
        # A window is kept for the longest interval any line may name.
        for key, (start, _) in list(self.windows.items()):
            if now - start >= _MAX_WINDOW_KEEP:
                del self.windows[key]
        for key, bucket in list(self.buckets.items()):
            if now - bucket.updated >= _PRUNE_INTERVAL:
                del self.buckets[key]
        for (key, period), slot in list(self.usage.items()):
            if slot[0] != period_bounds(period, now)[0]:
                del self.usage[(key, period)]
                self._dirty = True

    # the state file

    def _save_if_dirty(self) -> None:
        if self.state_file is not None and self._dirty:
            self.save()

    def state(self) -> Dict[str, Any]:
        """The saved form of the quota usage."""
        usage = [
            [key, period, start, used]
            for (key, period), (start, used) in self.usage.items()
        ]
        return {"version": STATE_VERSION, "usage": sorted(usage)}

    def save(self) -> bool:
        """Write the quota usage atomically; False (logged once a streak) on failure."""
        path = self.state_file
        if path is None:
            return False
        try:
            directory = os.path.dirname(os.path.abspath(path))
            fd, temporary = tempfile.mkstemp(prefix=".socks5-state-", dir=directory)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump(self.state(), f, separators=(",", ":"))
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(temporary, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary)
                raise
            _sync_directory(directory)
        except OSError as e:
            if not self._save_failing:
                self.log.error(
                    "cannot save the limits' state file {path}: {error}; "
                    "quota usage lives in memory only until it can",
                    path=path,
                    error=str(e),
                    event="socks5.state_save_failed",
                )
            self._save_failing = True
            return False
        if self._save_failing:
            self.log.info("the limits' state file {path} is saved again", path=path)
        self._save_failing = False
        self._dirty = False
        return True

    def load(self) -> None:
        """
        Read the quota usage saved by :meth:`save`.  A missing file is a
        first start; an unreadable or corrupt one is logged, moved aside
        (``PATH.corrupt``) so that it is not overwritten, and usage starts
        at zero: the server keeps serving.
        """
        if self.state_file is None:
            return
        path = self.state_file
        try:
            with open(path, "rb") as f:
                raw = f.read(_MAX_STATE_BYTES + 1)
        except FileNotFoundError:
            self.log.info(
                "no limits' state file at {path} yet: quota usage starts at zero",
                path=path,
            )
            return
        except OSError as e:
            self.log.error(
                "cannot read the limits' state file {path}: {error}; "
                "quota usage starts at zero",
                path=path,
                error=str(e),
                event="socks5.state_unreadable",
            )
            return
        try:
            entries = parse_state(raw)
        except ValueError as e:
            aside = path + ".corrupt"
            try:
                os.replace(path, aside)
            except OSError:
                aside = "(could not move it aside)"
            self.log.error(
                "the limits' state file {path} is corrupt ({error}); moved to {aside}, "
                "quota usage starts at zero",
                path=path,
                error=str(e),
                aside=aside,
                event="socks5.state_corrupt",
            )
            return
        now = self.clock.seconds()
        for key, period, start, used in entries:
            if period_bounds(period, now)[0] == start:
                self.usage[(key, period)] = [start, used]


#: A state file larger than this is not read (corrupt, or not ours).
_MAX_STATE_BYTES = 64 << 20
#: The longest rate window kept (rate intervals are bounded by the rules).
_MAX_WINDOW_KEEP = 86400.0


def parse_state(raw: bytes) -> List[Tuple[str, str, int, int]]:
    """The usage entries of a state file; ValueError if it is not one."""
    if len(raw) > _MAX_STATE_BYTES:
        raise ValueError("too large")
    try:
        document = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(document, dict) or document.get("version") != STATE_VERSION:
        raise ValueError(f"not a version {STATE_VERSION} state file")
    usage = document.get("usage")
    if not isinstance(usage, list):
        raise ValueError("no usage list")
    entries: List[Tuple[str, str, int, int]] = []
    for entry in usage:
        if (
            not isinstance(entry, list)
            or len(entry) != 4
            or not isinstance(entry[0], str)
            or entry[1] not in PERIODS
            or not all(type(n) is int and n >= 0 for n in entry[2:])
        ):
            raise ValueError(f"bad usage entry {entry!r:.80}")
        entries.append((entry[0], entry[1], entry[2], entry[3]))
    return entries


def _sync_directory(directory: str) -> None:
    """Make the rename itself durable (where the platform allows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
