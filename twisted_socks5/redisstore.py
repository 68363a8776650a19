"""
:class:`RedisLimitStore`: the limits' counters in Redis, shared by every
process and host pointed at the same server (``--limits-store
redis://HOST:PORT/DB`` or ``rediss://`` for TLS).

Every check is one server-side step (a Lua script, or a single command), so
two processes never read-modify-write the same counter.  The client is our
own, over Twisted endpoints: :mod:`.resp` parses the replies (sans-IO); this
module connects, reconnects with a back-off, and bounds every call with a
timeout, so that a request never waits on a Redis that is down: its Deferred
fails with ``LimitStoreUnavailable`` (at once while the
connection is down) and the caller applies ``--limits-on-store-failure``.

Sessions are leases: a sorted set per key of ``PROCESS:COUNTER`` members
scored by their expiry, renewed by a heartbeat; the sessions of a process
that dies without closing them expire after ``lease`` seconds.  Times are
the Redis server's (``TIME`` in the scripts), so hosts' clocks do not matter
except for the quota periods (the store's clock picks the period).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, cast
from urllib.parse import parse_qs, unquote, urlsplit

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from .limitstore import ILimitStore, LimitStoreUnavailable, period_bounds
from .logs import escape_line
from .resp import (
    Argument,
    Reply,
    ReplyParser,
    RespError,
    RespProtocolError,
    encode_command,
)

#: Every key the store writes starts with this.
KEY_PREFIX = "socks5:"
DEFAULT_PORT = 6379
#: The bound on every call (and on connecting), in seconds.
DEFAULT_TIMEOUT = 2.0
#: How long an open session is counted without a heartbeat from its process.
DEFAULT_LEASE = 30.0
#: Reconnection delays: doubling from the first to the last.
RETRY_MIN, RETRY_MAX = 0.25, 10.0
#: A finished quota period's counter is kept this long after its end.
QUOTA_GRACE = 86400

_QUERY = ("ca", "timeout", "lease")


@dataclass(frozen=True)
class RedisURL:
    """A parsed ``redis://`` or ``rediss://`` URL (its repr hides the password)."""

    tls: bool
    host: str
    port: int
    db: int
    username: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    ca: Optional[str] = None
    timeout: float = DEFAULT_TIMEOUT
    lease: float = DEFAULT_LEASE

    def describe(self) -> str:
        """The URL without its credentials: what logs and errors show."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


def _seconds(name: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (0 < value <= 3600):
        raise ValueError(
            f"{name}= takes seconds, more than 0 and at most 3600, not {text!r}"
        )
    return value


def parse_redis_url(url: str) -> RedisURL:
    """
    ``redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB][?ca=PATH&timeout=S&lease=S]``;
    ``ValueError`` (never naming the password) when it is not one.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(
            "a Redis limits store is redis://HOST:PORT/DB or rediss://HOST:PORT/DB"
        )
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError("the Redis URL's port is not a port number") from None
    host = parts.hostname or ""
    if not host:
        raise ValueError("the Redis URL names no host")
    path = parts.path.strip("/") or "0"
    if not path.isdigit() or not path.isascii() or int(path) > 65535:
        raise ValueError(f"the Redis database is a number, not {path[:32]!r}")
    query: Dict[str, List[str]] = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(_QUERY))
    if unknown:
        raise ValueError(
            f"unknown Redis URL parameter {unknown[0][:32]!r}; "
            f"known: {', '.join(_QUERY)}"
        )
    for name, values in query.items():
        if len(values) != 1:
            raise ValueError(f"the Redis URL parameter {name}= is given more than once")
    ca = query["ca"][0] if "ca" in query else None
    if ca is not None and not parts.scheme == "rediss":
        raise ValueError("ca= is for rediss:// (TLS) URLs")
    return RedisURL(
        tls=parts.scheme == "rediss",
        host=host,
        port=port,
        db=int(path),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        ca=ca,
        timeout=_seconds("timeout", query["timeout"][0])
        if "timeout" in query
        else DEFAULT_TIMEOUT,
        lease=_seconds("lease", query["lease"][0])
        if "lease" in query
        else DEFAULT_LEASE,
    )


def _trust_root(url: RedisURL) -> Any:
    """The CA of ``ca=`` (None: the system's roots); ValueError if unreadable."""
    if url.ca is None:
        return None
    from twisted.internet.ssl import Certificate

    try:
        with open(url.ca, "rb") as f:
            return Certificate.loadPEM(f.read())
    except Exception as e:  # OSError, or an OpenSSL error: bad PEM
        raise ValueError(f"cannot read the Redis CA file {url.ca!r}: {e}") from None


def check_url(text: str) -> None:
    """What ``--limits-store`` checks at start (ValueError, never naming a password)."""
    _trust_root(parse_redis_url(text))


def _endpoint(url: RedisURL, reactor: Any) -> Any:
    endpoint = HostnameEndpoint(reactor, url.host, url.port, timeout=url.timeout)
    if not url.tls:
        return endpoint
    from twisted.internet.ssl import optionsForClientTLS

    # Verified against the system's trust roots, or the CA file's.
    return wrapClientTLS(
        optionsForClientTLS(url.host, trustRoot=_trust_root(url)), endpoint
    )


class _RedisProtocol(Protocol):
    """One connection: commands out, replies to their Deferreds in order."""

    def __init__(self) -> None:
        self._parser = ReplyParser()
        self._waiting: Deque[Deferred[Reply]] = deque()
        self.on_lost: Optional[Callable[[Failure], None]] = None
        self.closed: Deferred[None] = Deferred()

    def command(self, arguments: Sequence[Argument]) -> Deferred[Reply]:
        d: Deferred[Reply] = Deferred()
        self._waiting.append(d)
        self.transport.write(encode_command(arguments))  # type: ignore[union-attr]
        return d

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except RespProtocolError:
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        for reply in replies:
            if not self._waiting:  # a reply nobody asked for: not a server we know
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            self._waiting.popleft().callback(reply)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        waiting, self._waiting = self._waiting, deque()
        for d in waiting:
            d.errback(reason)
        if self.on_lost is not None:
            self.on_lost(reason)
        self.closed.callback(None)


def _script(source: str) -> _Script:
    return _Script(
        source, hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()
    )


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str


_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# Keep the set until its last lease could end (PEXPIRE only lengthens).
_KEEP_SET = """
if redis.call('PTTL', KEYS[1]) < lease then redis.call('PEXPIRE', KEYS[1], lease) end
"""

#: KEYS: the set; ARGV: maximum, member, lease ms.  1 if admitted.
OPEN_SESSION = _script(
    _NOW_MS
    + """
local lease = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
"""
    + _KEEP_SET
    + "return 1\n"
)

#: KEYS: the set; ARGV: lease ms, members... (re-added if Redis lost them).
RENEW_SESSIONS = _script(
    _NOW_MS
    + """
local lease = tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], now + lease, ARGV[i]) end
"""
    + _KEEP_SET
    + "return #ARGV - 1\n"
)

#: KEYS: the window counter; ARGV: maximum, interval ms.  1 if allowed.
#: The window starts with its first request, as the memory store's does.
HIT_RATE = _script(
    """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
if used < tonumber(ARGV[1]) then used = redis.call('INCR', KEYS[1]) else used = -1 end
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if used < 0 then return 0 end
return 1
"""
)

#: KEYS: the period's counter; ARGV: bytes, expiry (POSIX ms).  The total.
ADD_USAGE = _script(
    """
local total = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIREAT', KEYS[1], ARGV[2]) end
return total
"""
)

#: KEYS: the bucket (a hash); ARGV: rate (bytes/s), burst, want.  Bytes granted.
TAKE_BANDWIDTH = _script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate, burst, want = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(state[1]), tonumber(state[2])
if tokens == nil or updated == nil then
  tokens, updated = burst, now
elseif now > updated then
  tokens, updated = math.min(burst, tokens + (now - updated) * rate), now
else
  tokens = math.min(burst, tokens)
end
local granted = math.max(0, math.floor(math.min(want, tokens)))
tokens = tokens - granted
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', updated))
-- Once full again the bucket is the same as no bucket: let it go.
local keep = 86400000
if rate > 0 then keep = math.min(keep, math.floor(burst / rate * 1000) + 1000) end
redis.call('PEXPIRE', KEYS[1], keep)
return granted
"""
)


@implementer(ILimitStore)
class RedisLimitStore:
    """
    The limits' counters in Redis.  ``url`` is ``redis://`` or ``rediss://``
    (see :func:`parse_redis_url`); ``ValueError`` at once if it is not one.
    """

    log = Logger()

    def __init__(self, url: str, reactor: Any) -> None:
        self.url = parse_redis_url(url)
        self.reactor = reactor
        self.where = self.url.describe()
        self._endpoint = _endpoint(self.url, reactor)
        self._protocol: Optional[_RedisProtocol] = None
        self._connecting: Optional[Deferred[None]] = None
        self._retry: Any = None
        self._delay = RETRY_MIN
        self._running = False
        self._failing = False
        self._ever_connected = False
        #: This process's name in the session leases: unique across hosts.
        self.process_id = uuid.uuid4().hex
        self._counter = itertools.count()
        self.leases: Dict[str, List[str]] = {}
        self._heartbeat: Optional[task.LoopingCall] = None

    def __repr__(self) -> str:
        return f"<RedisLimitStore {self.where}>"

    # lifecycle

    def start(self) -> Deferred[None]:
        """Connect (a failure is logged, and retried in the background)."""
        if self._running:
            return defer.succeed(None)
        self._running = True
        self._heartbeat = task.LoopingCall(self.renew)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.url.lease / 3, now=False)
        return self._connect()

    def stop(self) -> Deferred[None]:
        """Release this process's sessions (best effort) and disconnect."""
        self._running = False
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._connecting is not None:
            self._connecting.cancel()
        leases, self.leases = self.leases, {}
        released = [
            self._call(["ZREM", self._key("sessions", key), *members])
            for key, members in leases.items()
            if members
        ]
        done: Deferred[Any] = defer.DeferredList(released, consumeErrors=True)

        def disconnect(_: object) -> Deferred[None]:
            protocol, self._protocol = self._protocol, None
            if protocol is None:
                return defer.succeed(None)
            protocol.on_lost = None
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            # A peer that never finishes a TLS close does not hold up the stop.
            abort = self.reactor.callLater(
                self.url.timeout,
                protocol.transport.abortConnection,  # type: ignore[union-attr]
            )

            def closed(_: object) -> None:
                if abort.active():
                    abort.cancel()

            return protocol.closed.addBoth(closed)

        return done.addCallback(disconnect)

    # connecting

    def _connect(self) -> Deferred[None]:
        """Fires once this attempt ended, connected or not (never fails)."""
        self._retry = None
        if not self._running or self._protocol is not None:
            return defer.succeed(None)
        if self._connecting is not None:
            return defer.succeed(None)
        d = self._endpoint.connect(Factory.forProtocol(_RedisProtocol))
        d.addCallback(self._prepare)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)
        return cast("Deferred[None]", d)

    def _prepare(self, protocol: _RedisProtocol) -> Deferred[_RedisProtocol]:
        steps: List[List[Argument]] = []
        if self.url.password is not None:
            steps.append(
                ["AUTH", *filter(None, [self.url.username]), self.url.password]
            )
        if self.url.db:
            steps.append(["SELECT", self.url.db])
        steps.append(["PING"])

        async def run() -> _RedisProtocol:
            try:
                for step in steps:
                    reply = await self._bounded(protocol.command(step))
                    if isinstance(reply, RespError):
                        what = step[0] if isinstance(step[0], str) else "?"
                        raise LimitStoreUnavailable(f"{what}: {reply.message}")
            except BaseException:
                protocol.transport.abortConnection()  # type: ignore[union-attr]
                raise
            return protocol

        return Deferred.fromCoroutine(run())

    def _connected(self, protocol: _RedisProtocol) -> None:
        self._connecting = None
        if not self._running:
            protocol.transport.loseConnection()  # type: ignore[union-attr]
            return
        self._protocol = protocol
        protocol.on_lost = self._lost
        self._delay = RETRY_MIN
        if not self._ever_connected:
            self._ever_connected = True
            self.log.info(
                "the limits store {where} is connected",
                where=self.where,
                event="socks5.limits_store_connected",
            )
        self._recovered()
        self.renew()  # a restarted Redis has forgotten our sessions

    def _connect_failed(self, reason: Failure) -> None:
        self._connecting = None
        if not self._running:
            return
        self._outage(_why(reason))
        delay, self._delay = self._delay, min(RETRY_MAX, self._delay * 2)
        self._retry = self.reactor.callLater(delay, self._connect)

    def _lost(self, reason: Failure) -> None:
        self._protocol = None
        if self._running:
            self._outage(f"connection lost: {_why(reason)}")
            self._retry = self.reactor.callLater(0, self._connect)

    def _outage(self, why: str) -> None:
        if not self._failing:
            self._failing = True
            self.log.warn(
                "the limits store {where} is unavailable ({why}); retrying, and "
                "limits follow --limits-on-store-failure until it is back",
                where=self.where,
                why=escape_line(why),
                event="socks5.limits_store_unreachable",
            )

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            self.log.info(
                "the limits store {where} is back",
                where=self.where,
                event="socks5.limits_store_reconnected",
            )

    # calls

    def _bounded(self, d: Deferred[Reply]) -> Deferred[Reply]:
        return d.addTimeout(self.url.timeout, self.reactor)

    def _call(self, arguments: List[Argument]) -> Deferred[Reply]:
        """One command: its reply (a RespError too), or LimitStoreUnavailable."""
        protocol = self._protocol
        if protocol is None:
            return defer.fail(LimitStoreUnavailable(f"{self.where} is not connected"))

        def failed(reason: Failure) -> Reply:
            if reason.check(defer.TimeoutError):
                self._outage(f"no reply within {self.url.timeout:g} s")
                protocol.transport.abortConnection()  # type: ignore[union-attr]
            raise LimitStoreUnavailable(f"{self.where}: {_why(reason)}")

        return self._bounded(protocol.command(arguments)).addErrback(failed)

    def _run(self, script: _Script, key: str, *arguments: Argument) -> Deferred[Reply]:
        """A script on one key: EVALSHA, EVAL when the server lacks it."""
        tail: List[Argument] = ["1", key, *arguments]

        def loaded(reply: Reply) -> Any:
            if isinstance(reply, RespError) and reply.message.startswith("NOSCRIPT"):
                return self._call(["EVAL", script.source, *tail])
            return reply

        d = self._call(["EVALSHA", script.sha, *tail]).addCallback(loaded)
        return d.addCallback(self._checked)

    def _checked(self, reply: Reply) -> Reply:
        if isinstance(reply, RespError):
            self._outage(f"Redis error: {reply.message}")
            raise LimitStoreUnavailable(f"{self.where}: {reply.message}")
        self._recovered()
        return reply

    def _key(self, kind: str, key: str) -> str:
        return f"{KEY_PREFIX}{kind}:{key}"

    # ILimitStore

    def open_session(self, key: str, maximum: int) -> Deferred[bool]:
        member = f"{self.process_id}:{next(self._counter)}"
        lease_ms = int(self.url.lease * 1000)

        def admitted(reply: Reply) -> bool:
            if reply != 1:
                return False
            self.leases.setdefault(key, []).append(member)
            return True

        return self._run(
            OPEN_SESSION, self._key("sessions", key), maximum, member, lease_ms
        ).addCallback(admitted)

    def close_session(self, key: str) -> Deferred[None]:
        # Forgotten here first: even if Redis is down now, the heartbeat no
        # longer renews the lease, so it ends by itself.
        members = self.leases.get(key)
        if not members:
            return defer.succeed(None)
        member = members.pop()
        if not members:
            del self.leases[key]
        d = self._call(["ZREM", self._key("sessions", key), member])
        return d.addCallback(self._checked).addCallback(lambda _: None)

    def renew(self) -> None:
        """The heartbeat: lengthen every lease this process holds."""
        lease_ms = int(self.url.lease * 1000)
        for key, members in list(self.leases.items()):
            if self._protocol is None:
                return
            d = self._run(
                RENEW_SESSIONS, self._key("sessions", key), lease_ms, *members
            )
            d.addErrback(lambda _: None)  # logged as an outage; retried next beat

    def hit_rate(self, key: str, maximum: int, interval: float) -> Deferred[bool]:
        interval_ms = max(1, int(interval * 1000))
        d = self._run(HIT_RATE, self._key("rate", key), maximum, interval_ms)
        return d.addCallback(lambda reply: reply == 1)

    def _quota_key(self, key: str, period: str) -> tuple[str, int]:
        start, end = period_bounds(period, self.reactor.seconds())
        return self._key(f"quota:{period}:{start}", key), end

    def add_usage(self, key: str, period: str, nbytes: int) -> Deferred[int]:
        if nbytes <= 0:
            return self.quota_used(key, period)
        counter, end = self._quota_key(key, period)
        d = self._run(ADD_USAGE, counter, nbytes, (end + QUOTA_GRACE) * 1000)
        return d.addCallback(_integer)

    def quota_used(self, key: str, period: str) -> Deferred[int]:
        counter, _ = self._quota_key(key, period)
        return (
            self._call(["GET", counter])
            .addCallback(self._checked)
            .addCallback(_integer)
        )

    def take_bandwidth(
        self, key: str, rate: float, burst: int, want: int
    ) -> Deferred[int]:
        d = self._run(
            TAKE_BANDWIDTH, self._key("bandwidth", key), float(rate), burst, want
        )
        return d.addCallback(_integer)


def _integer(reply: Reply) -> int:
    if reply is None:
        return 0
    if isinstance(reply, int):
        return reply
    if isinstance(reply, bytes) and reply.isdigit():
        return int(reply)
    raise LimitStoreUnavailable(f"not a number from Redis: {reply!r:.40}")


def _why(reason: Failure) -> str:
    if reason.check(defer.TimeoutError):
        return "timed out"
    return reason.getErrorMessage() or reason.type.__name__  # type: ignore[union-attr]
