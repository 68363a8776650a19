"""
RedisLimitStore against a real redis-server (started by the test on a free
127.0.0.1 port): every operation, atomicity under concurrent callers, leases
of a process that stops heartbeating, an outage and the recovery, passwords,
databases and rediss://.  Times come from Redis's own expiry; nothing here
asserts on how long anything took.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
from typing import Any, AsyncIterator, Callable, List

import pytest
import pytest_twisted
from helpers import GIVE_UP_AFTER, until, within
from redis_server import RedisServer, needs_redis, tls_supported
from redis_server import redis as redis  # the fixture
from twisted.internet import defer, protocol, reactor, task
from twisted.internet.testing import EventLoggingObserver

from twisted_socks5.limitstore import LimitStoreUnavailable, period_bounds
from twisted_socks5.redisstore import KEY_PREFIX, RedisLimitStore

pytestmark = needs_redis


@pytest_twisted.async_yield_fixture
async def stores() -> AsyncIterator[Callable[..., Any]]:
    """``await make(url)``: a started store, stopped after the test."""
    made: List[RedisLimitStore] = []

    async def make(url: str) -> RedisLimitStore:
        store = RedisLimitStore(url, reactor)
        made.append(store)
        await within(store.start(), "the store's first connection attempt")
        return store

    yield make
    for store in made:
        await within(store.stop(), "the store stopping")


async def pause(seconds: float) -> None:
    """Let real time pass (for Redis's own expiry clock only)."""
    await task.deferLater(reactor, seconds, lambda: None)


async def unavailable(d: defer.Deferred[Any]) -> LimitStoreUnavailable:
    try:
        await within(d, "the call to fail")
    except LimitStoreUnavailable as e:
        return e
    raise AssertionError("the call succeeded")


@pytest_twisted.ensureDeferred
async def test_sessions_are_counted_and_released(
    redis: RedisServer, stores: Any
) -> None:
    store = await stores(redis.url())
    assert await store.open_session("user:alice", 2) is True
    assert await store.open_session("user:alice", 2) is True
    assert await store.open_session("user:alice", 2) is False
    assert await store.open_session("user:bob", 2) is True  # another key
    await store.close_session("user:alice")
    assert await store.open_session("user:alice", 2) is True
    assert await store.open_session("user:alice", 2) is False
    # Closing what this process never opened releases nothing.
    await store.close_session("user:nobody")


@pytest_twisted.ensureDeferred
async def test_a_limit_is_shared_by_two_processes(
    redis: RedisServer, stores: Any
) -> None:
    one, two = await stores(redis.url()), await stores(redis.url())
    assert await one.open_session("user:alice", 2) is True
    assert await two.open_session("user:alice", 2) is True
    assert await one.open_session("user:alice", 2) is False
    assert await two.open_session("user:alice", 2) is False
    await two.close_session("user:alice")
    assert await one.open_session("user:alice", 2) is True


@pytest_twisted.ensureDeferred
async def test_concurrent_callers_never_overshoot(
    redis: RedisServer, stores: Any
) -> None:
    """Fifty requests at once from two connections: exactly the limit gets in."""
    one, two = await stores(redis.url()), await stores(redis.url())
    calls = [(one if n % 2 else two).open_session("user:alice", 7) for n in range(50)]
    results = await within(defer.gatherResults(calls), "the sessions")
    assert results.count(True) == 7
    rates = [(one if n % 2 else two).hit_rate("client:a", 20, 3600) for n in range(50)]
    results = await within(defer.gatherResults(rates), "the rate checks")
    assert results.count(True) == 20
    adds = [
        (one if n % 2 else two).add_usage("user:alice", "day", 3) for n in range(50)
    ]
    totals = await within(defer.gatherResults(adds), "the usage")
    assert sorted(totals) == [3 * n for n in range(1, 51)]
    assert await one.quota_used("user:alice", "day") == 150


@pytest_twisted.ensureDeferred
async def test_rate_window_ends_by_itself(redis: RedisServer, stores: Any) -> None:
    store = await stores(redis.url())
    assert [await store.hit_rate("client:a", 2, 0.2) for _ in range(3)] == [
        True,
        True,
        False,
    ]
    assert await store.hit_rate("client:b", 2, 0.2) is True  # another key

    async def allowed_again() -> bool:
        return bool(await store.hit_rate("client:a", 2, 0.2))

    await poll(allowed_again, "the rate window to end")


async def poll(check: Callable[[], Any], what: str, every: float = 0.05) -> None:
    """Ask ``check`` until it holds: for waits on Redis's expiry clock."""
    deadline = reactor.seconds() + GIVE_UP_AFTER
    while not await check():
        if reactor.seconds() > deadline:
            raise AssertionError(f"never happened: {what}")
        await pause(every)


@pytest_twisted.ensureDeferred
async def test_quota_usage_per_period_and_across_restarts(
    redis: RedisServer, stores: Any
) -> None:
    store = await stores(redis.url())
    assert await store.quota_used("user:bob", "day") == 0
    assert await store.add_usage("user:bob", "day", 1000) == 1000
    assert await store.add_usage("user:bob", "day", 24) == 1024
    assert await store.add_usage("user:bob", "day", 0) == 1024
    assert await store.add_usage("user:bob", "month", 5) == 5
    assert await store.quota_used("user:bob", "week") == 0
    await store.stop()
    # A new process (a restarted server) sees the same usage.
    again = await stores(redis.url())
    assert await again.quota_used("user:bob", "day") == 1024
    assert await again.add_usage("user:bob", "day", 1) == 1025
    # The counter ends after its period (plus a grace), never before.
    start, end = period_bounds("day", reactor.seconds())
    key = f"{KEY_PREFIX}quota:day:{start}:user:bob"
    expires_in = await again._call(["PTTL", key])
    assert isinstance(expires_in, int)
    assert expires_in > (end - reactor.seconds()) * 1000


@pytest_twisted.ensureDeferred
async def test_bandwidth_bucket_is_shared(redis: RedisServer, stores: Any) -> None:
    one, two = await stores(redis.url()), await stores(redis.url())
    # A slow refill: a test's run time can only add a few bytes.
    assert await one.take_bandwidth("user:alice", 1.0, 1000, 600) == 600
    granted = await two.take_bandwidth("user:alice", 1.0, 1000, 600)
    assert 400 <= granted < 600
    assert await one.take_bandwidth("user:alice", 1.0, 1000, 0) == 0
    assert await one.take_bandwidth("user:bob", 1.0, 1000, 5000) == 1000


@pytest_twisted.ensureDeferred
async def test_bandwidth_refills_concurrently_without_overdraw(
    redis: RedisServer, stores: Any
) -> None:
    one, two = await stores(redis.url()), await stores(redis.url())
    takes = [
        (one if n % 2 else two).take_bandwidth("k", 1.0, 100, 10) for n in range(40)
    ]
    grants = await within(defer.gatherResults(takes), "the grants")
    assert 100 <= sum(grants) < 110


@pytest_twisted.ensureDeferred
async def test_leases_of_a_silent_process_expire(
    redis: RedisServer, stores: Any
) -> None:
    """A process that stops heartbeating (it died) loses its sessions."""
    url = redis.url(query="lease=0.5")
    dying, other = await stores(url), await stores(url)
    beats = []
    renew = dying.renew
    dying._heartbeat.f = lambda: (beats.append(1), renew())  # type: ignore[union-attr]
    # The other process holds a session too: its heartbeat keeps the set.
    assert await other.open_session("user:alice", 3) is True
    assert await dying.open_session("user:alice", 3) is True
    assert await dying.open_session("user:alice", 3) is True
    # Alive: its heartbeat keeps the leases past their first expiry.
    await until(lambda: len(beats) >= 4, "four heartbeats")
    assert await other.open_session("user:alice", 3) is False
    # Dead: no heartbeat, no goodbye (the connection just drops).
    dying._running = False
    dying._heartbeat.stop()  # type: ignore[union-attr]
    dying._protocol.transport.abortConnection()  # type: ignore[union-attr]

    async def admitted() -> bool:
        return bool(await other.open_session("user:alice", 3))

    await poll(admitted, "the dead process's leases to expire")
    # Both of its leases ended; the other process's one stays counted.
    assert await other.open_session("user:alice", 3) is True
    assert await other.open_session("user:alice", 3) is False


@pytest_twisted.ensureDeferred
async def test_stop_releases_this_process_sessions(
    redis: RedisServer, stores: Any
) -> None:
    one, two = await stores(redis.url()), await stores(redis.url())
    assert await one.open_session("user:alice", 1) is True
    await one.stop()
    assert await two.open_session("user:alice", 1) is True


@pytest_twisted.ensureDeferred
async def test_outage_fails_fast_logs_once_and_recovers(
    redis: RedisServer, stores: Any, log_events: EventLoggingObserver
) -> None:
    store = await stores(redis.url())
    assert await store.open_session("user:alice", 5) is True
    await redis.kill()
    for _ in range(3):
        await unavailable(store.open_session("user:alice", 5))
        await unavailable(store.hit_rate("client:a", 5, 1))
        await unavailable(store.add_usage("user:alice", "day", 1))
        await unavailable(store.quota_used("user:alice", "day"))
        await unavailable(store.take_bandwidth("user:alice", 1.0, 10, 1))
    # Reconnection attempts go on meanwhile: let two fail (the back-off grows).
    await until(lambda: store._delay >= 1.0, "two failed reconnections")
    await redis.start()

    async def back() -> bool:
        try:
            return bool(await store.hit_rate("client:b", 5, 1))
        except LimitStoreUnavailable:
            return False

    await poll(back, "the store to reconnect by itself")
    names = [e.get("event") for e in log_events]
    assert names.count("socks5.limits_store_unreachable") == 1
    assert names.count("socks5.limits_store_reconnected") == 1
    assert names.count("socks5.limits_store_connected") == 1  # the first time only
    # The restarted (empty) Redis got this process's live session back.
    assert await store.open_session("user:alice", 1) is False


class _Mute(protocol.Protocol):
    """Answers the store's PING, then never another word: a hung server."""

    def dataReceived(self, data: bytes) -> None:
        if b"PING" in data:
            self.transport.write(b"+PONG\r\n")


@pytest_twisted.ensureDeferred
async def test_a_hung_server_fails_calls_within_the_timeout(stores: Any) -> None:
    port = reactor.listenTCP(
        0, protocol.Factory.forProtocol(_Mute), interface="127.0.0.1"
    )
    try:
        store = await stores(f"redis://127.0.0.1:{port.getHost().port}/0?timeout=0.2")
        assert store._protocol is not None  # connected
        error = await unavailable(store.open_session("user:alice", 1))
        assert "timed out" in str(error)
    finally:
        await port.stopListening()


class _Garbled(protocol.Protocol):
    """Answers PING, then sends what no Redis would."""

    reply = b"!not RESP\r\n"

    def dataReceived(self, data: bytes) -> None:
        if b"PING" in data:
            self.transport.write(b"+PONG\r\n")
        else:
            self.transport.write(self.reply)


class _Chatty(_Garbled):
    """Answers, and then answers again: a reply nobody asked for."""

    reply = b":1\r\n:1\r\n"


@pytest.mark.parametrize("server", [_Garbled, _Chatty])
@pytest_twisted.ensureDeferred
async def test_a_server_speaking_nonsense_is_dropped(
    stores: Any, server: type[protocol.Protocol]
) -> None:
    factory = protocol.Factory.forProtocol(server)
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    try:
        # A timeout longer than the test waits: only the drop can end it.
        url = f"redis://127.0.0.1:{port.getHost().port}/0?timeout=300"
        store = await stores(url)
        connection = store._protocol
        assert connection is not None
        if server is _Garbled:
            await unavailable(store.open_session("user:alice", 1))
        else:
            assert await store.hit_rate("client:a", 1, 1) is True
        await within(connection.closed, "the connection to be dropped")
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_store_that_never_reached_redis_fails_at_once(stores: Any) -> None:
    store = await stores("redis://127.0.0.1:1/0")
    error = await unavailable(store.open_session("user:alice", 1))
    assert "not connected" in str(error)


@pytest_twisted.ensureDeferred
async def test_a_flushed_script_cache_is_reloaded(
    redis: RedisServer, stores: Any
) -> None:
    store = await stores(redis.url())
    assert await store.hit_rate("client:a", 5, 60) is True
    assert await store._call(["SCRIPT", "FLUSH"]) == "OK"
    assert await store.hit_rate("client:a", 5, 60) is True


@pytest_twisted.ensureDeferred
async def test_database_number_is_used(redis: RedisServer, stores: Any) -> None:
    store = await stores(redis.url(db=3))
    await store.add_usage("user:bob", "day", 7)
    assert await store._call(["SELECT", "0"]) == "OK"
    assert await store.quota_used("user:bob", "day") == 0
    assert await store._call(["SELECT", "3"]) == "OK"
    assert await store.quota_used("user:bob", "day") == 7


@pytest_twisted.ensureDeferred
async def test_password_is_sent_and_never_logged(
    tmp_path: Any, stores: Any, log_events: EventLoggingObserver
) -> None:
    server = RedisServer(str(tmp_path), "--requirepass", "s3cret-pw")
    await server.start()
    try:
        good = await stores(f"redis://:s3cret-pw@127.0.0.1:{server.port}/0")
        assert await good.open_session("user:alice", 1) is True
        bad = await stores(f"redis://:wrong-pw@127.0.0.1:{server.port}/0")
        await unavailable(bad.open_session("user:alice", 1))
        none = await stores(f"redis://127.0.0.1:{server.port}/0")
        await unavailable(none.open_session("user:alice", 1))
    finally:
        await server.kill()
    from twisted.logger import formatEvent

    text = "".join(formatEvent(e) + repr(e) for e in log_events)
    assert "socks5.limits_store_unreachable" in text
    assert "wrong-pw" not in text and "s3cret" not in text
    assert "wrong-pw" not in repr(bad) and "wrong-pw" not in repr(bad.url)


def _certificates(directory: Any) -> tuple[str, str, str]:
    """A CA and a server certificate for 127.0.0.1 it signed: their paths."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def make(name: str, key: Any, issuer: Any, signer: Any, ca: bool) -> Any:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.BasicConstraints(ca=ca, path_length=None), critical=True
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = make("test CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = make("127.0.0.1", key, ca_name, ca_key, False)
    paths = []
    for name, data in (
        ("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        ("server.pem", cert.public_bytes(serialization.Encoding.PEM)),
        (
            "server.key",
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
    ):
        path = os.path.join(str(directory), name)
        with open(path, "wb") as f:
            f.write(data)
        paths.append(path)
    return paths[0], paths[1], paths[2]


@pytest.mark.skipif(
    not tls_supported(), reason="this redis-server was built without TLS"
)
@pytest_twisted.ensureDeferred
async def test_rediss_verifies_the_server(tmp_path: Any, stores: Any) -> None:
    ca, cert, key = _certificates(tmp_path)
    server = RedisServer(
        str(tmp_path),
        "--tls-cert-file",
        cert,
        "--tls-key-file",
        key,
        "--tls-ca-cert-file",
        ca,
        "--tls-auth-clients",
        "no",
        tls=True,
    )
    await server.start()
    try:
        trusted = await stores(server.url(query=f"ca={ca}"))
        assert await trusted.open_session("user:alice", 1) is True
        assert await trusted.open_session("user:alice", 1) is False
        # Without the CA, the self-signed chain is not trusted: no connection.
        untrusted = await stores(server.url())
        await unavailable(untrusted.open_session("user:alice", 1))
        # Plain redis:// to a TLS port gets no valid reply either.
        plain = await stores(f"redis://127.0.0.1:{server.port}/0?timeout=0.5")
        await unavailable(plain.open_session("user:alice", 1))
    finally:
        await server.kill()


DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"
#: The ACL docs/limits.rst gives for the store's own Redis user.
ACL = (
    "+ping +select +get +zrem +eval +evalsha +time +zremrangebyscore +zcard"
    " +zadd +pttl +pexpire +pexpireat +incr +incrby +hmget +hset"
)


@pytest_twisted.ensureDeferred
async def test_the_documented_acl_is_enough(
    tmp_path: Any, stores: Any, log_events: EventLoggingObserver
) -> None:
    documented = (DOCS / "limits.rst").read_text(encoding="utf-8")
    assert all(f" {permission}" in documented for permission in ACL.split())
    rules = ["on", ">pw", "~socks5:*", *ACL.split()]
    server = RedisServer(str(tmp_path), "--user", "socks5", *rules)
    await server.start()
    try:
        store = await stores(f"redis://socks5:pw@127.0.0.1:{server.port}/1")
        assert await store.open_session("user:alice", 1) is True
        await store.close_session("user:alice")
        assert await store.hit_rate("client:a", 1, 60) is True
        assert await store.add_usage("user:alice", "day", 5) == 5
        assert await store.quota_used("user:alice", "day") == 5
        assert await store.take_bandwidth("user:alice", 10.0, 10, 4) == 4
        assert await store.open_session("user:alice", 1) is True
        store.renew()
        assert await store.take_bandwidth("user:alice", 10.0, 10, 0) == 0  # after it
        assert not [
            e for e in log_events if e.get("event") == "socks5.limits_store_unreachable"
        ]
        # A command outside it is refused: the ACL is really applied.
        reply = await store._call(["SET", "socks5:x", "1"])
        assert "NOPERM" in str(reply)
    finally:
        await server.kill()
