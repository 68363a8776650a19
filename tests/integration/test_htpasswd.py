"""The htpasswd (bcrypt) checker: correct answers, off the reactor thread."""

from __future__ import annotations

import os
import threading
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from helpers import until
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol, reactor, threads

from twisted_socks5 import htpasswd
from twisted_socks5.auth import UsernamePassword
from twisted_socks5.codec import UserPassRequest
from twisted_socks5.htpasswd import (
    HashPool,
    HashPoolFull,
    HtpasswdChecker,
    HtpasswdCheckerFactory,
    bcrypt_cost,
    check_bcrypt,
    parse_htpasswd,
)
from twisted_socks5.limits import checking_client


def _hash(password: bytes, prefix: bytes = b"$2b$") -> bytes:
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4))
    return prefix + hashed[4:]


def test_parse_keeps_bcrypt_lines_only() -> None:
    data = (
        b"# comment\n\nalice:"
        + _hash(b"a")
        + b"\nbob:{SHA}xyz\nbroken\ncarol:$apr1$x\n"
    )
    users, skipped = parse_htpasswd(data)
    assert list(users) == [b"alice"]
    assert skipped == 3


def test_factory_needs_a_file_name() -> None:
    with pytest.raises(ValueError):
        HtpasswdCheckerFactory().generateChecker("")


@pytest.fixture
def htfile(tmp_path: Any) -> Any:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(
        b"alice:"
        + _hash(b"wonderland", b"$2y$")
        + b"\nbob:"
        + _hash(b"builder")
        + b"\n"
    )
    return path


@pytest_twisted.ensureDeferred
async def test_checks_run_in_a_thread(htfile: Any, monkeypatch: Any) -> None:
    threads_seen = []
    real = htpasswd.check_bcrypt

    def spy(password: bytes, hashed: bytes) -> bool:
        threads_seen.append(threading.current_thread())
        return real(password, hashed)

    monkeypatch.setattr(htpasswd, "check_bcrypt", spy)
    checker = HtpasswdChecker(str(htfile))
    assert (
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
        == b"alice"
    )
    assert threads_seen and threads_seen[0] is not threading.main_thread()


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"alice", b"wrong"), (b"mallory", b"wonderland"), (b"bob", b"wonderland")],
)
@pytest_twisted.ensureDeferred
async def test_wrong_credentials_fail(
    htfile: Any, user: bytes, password: bytes
) -> None:
    checker = HtpasswdChecker(str(htfile))
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(user, password))


@pytest_twisted.ensureDeferred
async def test_file_changes_are_picked_up(htfile: Any) -> None:
    checker = HtpasswdChecker(str(htfile))
    htfile.write_bytes(b"dave:" + _hash(b"new") + b"\n")
    stat = os.stat(htfile)
    os.utime(htfile, (stat.st_atime, stat.st_mtime + 5))
    assert await checker.requestAvatarId(UsernamePassword(b"dave", b"new")) == b"dave"
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))


@pytest_twisted.ensureDeferred
async def test_unreadable_file_keeps_the_old_users(htfile: Any) -> None:
    checker = HtpasswdChecker(str(htfile))
    os.remove(htfile)
    assert await checker.requestAvatarId(UsernamePassword(b"bob", b"builder")) == b"bob"


@pytest_twisted.ensureDeferred
async def test_through_the_server_with_curl_style_client(
    htfile: Any, make_proxy: Any, http_target: Any
) -> None:
    from test_clients import _pysocks_get
    from twisted.internet import threads

    from twisted_socks5.auth import UsernamePasswordAuthenticator

    auth = UsernamePasswordAuthenticator.from_checkers(HtpasswdChecker(str(htfile)))
    _, port = make_proxy(authenticators=[auth])
    body = await threads.deferToThread(
        _pysocks_get,
        port,
        "127.0.0.1",
        http_target["127.0.0.1"],
        username="alice",
        password="wonderland",
    )
    assert body.endswith(b"hello through socks\n")


# --------------------------------------------------------------------------
# Unknown users, costs, long passwords


def _write(path: Any, *entries: tuple[bytes, bytes, int]) -> None:
    path.write_bytes(
        b"".join(
            user + b":" + bcrypt.hashpw(password, bcrypt.gensalt(cost)) + b"\n"
            for user, password, cost in entries
        )
    )


@pytest_twisted.ensureDeferred
async def test_unknown_user_pays_a_bcrypt_of_the_file_cost(
    tmp_path: Any, monkeypatch: Any
) -> None:
    path = tmp_path / "users"
    _write(path, (b"alice", b"a", 5), (b"bob", b"b", 5))
    checked: list[bytes] = []
    real = htpasswd.check_bcrypt

    def spy(password: bytes, hashed: bytes) -> bool:
        checked.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(htpasswd, "check_bcrypt", spy)
    pool = HashPool()
    checker = HtpasswdChecker(str(path), pool=pool)
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"mallory", b"a"))
    assert pool.started == 1
    assert checked == [checker.dummy_hash]
    assert bcrypt_cost(checked[0]) == 5


def test_dummy_hash_cost_follows_the_file_on_load_and_reload(tmp_path: Any) -> None:
    path = tmp_path / "users"
    _write(path, (b"a", b"x", 5), (b"b", b"x", 5), (b"c", b"x", 4))
    checker = HtpasswdChecker(str(path), pool=HashPool())
    assert bcrypt_cost(checker.dummy_hash) == 5  # the most common cost
    _write(path, (b"a", b"x", 6), (b"b", b"x", 4))
    checker.reload()
    assert bcrypt_cost(checker.dummy_hash) == 6  # a tie: the higher
    _write(path, (b"a", b"x", 7))
    stat = os.stat(path)
    os.utime(path, (stat.st_atime, stat.st_mtime + 5))
    checker._load()  # as a login does when the file changed
    assert bcrypt_cost(checker.dummy_hash) == 7
    path.write_bytes(b"")
    checker.reload()
    assert bcrypt_cost(checker.dummy_hash) == htpasswd.DEFAULT_COST


def test_dummy_hash_is_checkable_and_matches_nothing() -> None:
    hashed = htpasswd.dummy_hash({b"a": bcrypt.hashpw(b"x", bcrypt.gensalt(4))})
    assert bcrypt_cost(hashed) == 4
    assert check_bcrypt(b"", hashed) is False
    assert check_bcrypt(b"x", hashed) is False


@pytest_twisted.ensureDeferred
async def test_passwords_over_72_bytes_compare_as_htpasswd_does(
    tmp_path: Any,
) -> None:
    long = bytes(range(33, 33 + 72)) + b"and the rest is ignored by bcrypt"
    path = tmp_path / "users"
    path.write_bytes(b"alice:" + bcrypt.hashpw(long[:72], bcrypt.gensalt(4)) + b"\n")
    checker = HtpasswdChecker(str(path), pool=HashPool())
    for password in (long, long[:72], long[:72] + b"x" * 183):
        credentials = UsernamePassword(b"alice", password)
        assert await checker.requestAvatarId(credentials) == b"alice"
    for password in (long[:71], b"#" + long[1:]):
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", password))


# --------------------------------------------------------------------------
# The hash pool: bounded, its own, and it drops checks nobody waits for


@pytest.fixture
def gate() -> Any:
    """A check that blocks its hashing thread until the test opens the gate."""
    opened = threading.Event()
    ran: list[str] = []

    def check(name: str) -> str:
        ran.append(name)
        assert opened.wait(30)
        return name

    yield opened, ran, check
    opened.set()


@pytest_twisted.ensureDeferred
async def test_hash_pool_queue_is_bounded(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1, max_queued=2)
    running = pool.run(check, "running")
    queued = [pool.run(check, f"queued{i}") for i in range(2)]
    assert (pool.running, len(pool.queued)) == (1, 2)
    with pytest.raises(HashPoolFull):
        await pool.run(check, "one too many")
    opened.set()
    assert await running == "running"
    assert [await d for d in queued] == ["queued0", "queued1"]
    assert ran == ["running", "queued0", "queued1"]
    assert (pool.running, len(pool.queued), pool.started) == (0, 0, 3)


@pytest_twisted.ensureDeferred
async def test_cancelled_check_that_has_not_started_never_runs(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1)
    running = pool.run(check, "running")
    gone = pool.run(check, "gone")
    kept = pool.run(check, "kept")
    gone.cancel()
    with pytest.raises(defer.CancelledError):
        await gone
    assert len(pool.queued) == 1
    opened.set()
    assert await running == "running"
    assert await kept == "kept"
    assert ran == ["running", "kept"]


@pytest_twisted.ensureDeferred
async def test_a_busy_hash_pool_leaves_name_resolution_alone(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1)
    checks = [pool.run(check, str(i)) for i in range(20)]
    await until(lambda: ran == ["0"], "the hashing thread to be busy")
    # getaddrinfo runs in the reactor's pool: nothing of the hash pool's there.
    assert await threads.deferToThread(lambda: 42) == 42
    assert await reactor.resolve("localhost") in ("127.0.0.1", "::1")
    assert len(pool.queued) == 19
    opened.set()
    await defer.gatherResults(checks)


async def _login(
    port: int, user: bytes, password: bytes, source: str = "127.0.0.1"
) -> Any:
    """A raw RFC 1929 client on loopback: returns (protocol, first answer)."""
    received = defer.Deferred()

    class Client(protocol.Protocol):
        data = b""

        def dataReceived(self, data: bytes) -> None:
            self.data += data
            if len(self.data) >= 4 and not received.called:
                received.callback(self.data)

        def connectionLost(self, reason: Any = None) -> None:
            if not received.called:  # closed unanswered: say so, do not hang
                received.callback(self.data)

    client = await protocol.ClientCreator(reactor, Client).connectTCP(
        "127.0.0.1", port, bindAddress=(source, 0)
    )
    client.transport.write(b"\x05\x01\x02" + UserPassRequest(user, password).to_bytes())
    return client, received


@pytest_twisted.ensureDeferred
async def test_a_queued_check_is_dropped_when_its_client_goes(
    htfile: Any, make_proxy: Any, gate: Any, monkeypatch: Any
) -> None:
    from twisted_socks5.auth import UsernamePasswordAuthenticator

    opened, ran, check = gate
    real = htpasswd.check_bcrypt

    def blocking(password: bytes, hashed: bytes) -> bool:
        check(password.decode())
        return real(password, hashed)

    monkeypatch.setattr(htpasswd, "check_bcrypt", blocking)
    pool = HashPool(threads=1)
    auth = UsernamePasswordAuthenticator.from_checkers(
        HtpasswdChecker(str(htfile), pool=pool)
    )
    factory, port = make_proxy(authenticators=[auth])
    first, first_answer = await _login(port, b"alice", b"wonderland")
    await until(lambda: ran == ["wonderland"], "the first check to run")
    # From another address: one address has one check at a time anyway.
    second, _ = await _login(port, b"bob", b"builder", source="127.0.0.2")
    await until(lambda: len(pool.queued) == 1, "the second check to queue")
    second.transport.abortConnection()
    await until(lambda: not pool.queued, "the queued check to be dropped")
    opened.set()
    assert await first_answer == b"\x05\x02\x01\x00"
    assert ran == ["wonderland"]  # bob's check never ran
    assert factory.limits.checks == {}
    first.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_hash_pool_gives_each_client_a_share_of_its_queue(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1, max_queued=10, max_queued_per_client=2)

    def run_for(client: str, name: str) -> Any:
        token = checking_client.set(client)
        try:
            return pool.run(check, name)
        finally:
            checking_client.reset(token)

    running = run_for("192.0.2.1", "running")
    mine = [run_for("192.0.2.1", f"mine{i}") for i in range(2)]
    with pytest.raises(HashPoolFull):
        await run_for("192.0.2.1", "one too many of mine")
    other = run_for("2001:db8::/64", "other")
    anonymous = pool.run(check, "no client")  # the queue's own bound only
    assert pool.queued_by_client == {"192.0.2.1": 2, "2001:db8::/64": 1}
    mine[0].cancel()  # a dropped check frees its client's place
    with pytest.raises(defer.CancelledError):
        await mine[0]
    assert pool.queued_by_client == {"192.0.2.1": 1, "2001:db8::/64": 1}
    opened.set()
    assert await defer.gatherResults([running, mine[1], other, anonymous]) == [
        "running",
        "mine1",
        "other",
        "no client",
    ]
    assert pool.queued_by_client == {} and not pool.queued


def _gated_proxy(
    htfile: Any, make_proxy: Any, gate: Any, monkeypatch: Any, pool: HashPool, **kw: Any
) -> Any:
    """A proxy whose bcrypt checks wait for the gate; returns (limits, port)."""
    from twisted_socks5.auth import UsernamePasswordAuthenticator
    from twisted_socks5.limits import ConnectionLimits

    real = htpasswd.check_bcrypt

    def blocking(password: bytes, hashed: bytes) -> bool:
        gate[2](password.decode())
        return real(password, hashed)

    monkeypatch.setattr(htpasswd, "check_bcrypt", blocking)
    auth = UsernamePasswordAuthenticator.from_checkers(
        HtpasswdChecker(str(htfile), pool=pool)
    )
    limits = ConnectionLimits(reactor.seconds, max_connections=0, **kw)
    _, port = make_proxy(authenticators=[auth], limits=limits)
    return limits, port


@pytest_twisted.ensureDeferred
async def test_a_full_hash_pool_refuses_others_as_busy_not_as_failures(
    htfile: Any, make_proxy: Any, gate: Any, monkeypatch: Any
) -> None:
    """Other addresses fill the pool: the victim is refused, never throttled."""
    pool = HashPool(threads=1, max_queued=1)
    limits, port = _gated_proxy(
        htfile, make_proxy, gate, monkeypatch, pool, auth_failures=1
    )
    attackers = []
    for source in ("127.0.0.2", "127.0.0.3"):
        attackers.append(await _login(port, b"bob", b"wrong", source=source))
    await until(lambda: len(pool.queued) == 1, "the pool to fill")
    for _ in range(2):  # more than the throttle's one failure
        victim, answer = await _login(port, b"alice", b"wonderland")
        assert await answer == b"\x05\x02\x01\x01"
        victim.transport.loseConnection()
    assert limits._recent_failures("127.0.0.1") == 0
    gate[0].set()
    for client, answer in attackers:
        assert await answer == b"\x05\x02\x01\x01"
        client.transport.loseConnection()
    victim, answer = await _login(port, b"alice", b"wonderland")
    assert await answer == b"\x05\x02\x01\x00"
    victim.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_one_client_cannot_fill_the_hash_pool_queue(
    htfile: Any, make_proxy: Any, gate: Any, monkeypatch: Any
) -> None:
    """The server tells the pool whose check it is: its share, not the queue."""
    pool = HashPool(threads=1, max_queued=3, max_queued_per_client=2)
    _, port = _gated_proxy(
        htfile, make_proxy, gate, monkeypatch, pool, auth_checks_per_client=0
    )
    flood = [await _login(port, b"bob", b"wrong", source="127.0.0.2") for _ in range(3)]
    await until(lambda: pool.started == 1 and len(pool.queued) == 2, "a full share")
    flood.append(await _login(port, b"bob", b"wrong", source="127.0.0.2"))
    assert await flood[-1][1] == b"\x05\x02\x01\x01"  # over its share: busy
    victim, answer = await _login(port, b"alice", b"wonderland")
    await until(lambda: len(pool.queued) == 3, "the victim's check to queue")
    assert pool.queued_by_client == {"127.0.0.2": 2, "127.0.0.1": 1}
    gate[0].set()
    assert await answer == b"\x05\x02\x01\x00"
    for client, _ in flood:
        client.transport.loseConnection()
    victim.transport.loseConnection()


def test_a_file_of_mixed_costs_is_one_warning_naming_the_odd_users(
    tmp_path: Any, log_events: Any
) -> None:
    """Users off the usual cost could be found by timing: the operator is told."""
    path = tmp_path / "users"
    _write(path, (b"a", b"x", 5), (b"b", b"x", 5), (b"odd", b"x", 4))
    HtpasswdChecker(str(path), pool=HashPool())
    (event,) = [
        e for e in log_events if e.get("event") == "socks5.htpasswd_mixed_costs"
    ]
    assert event["users"] == "odd" and event["cost"] == 5 and event["count"] == 1
    _write(path, (b"a", b"x", 5), (b"b", b"x", 5))
    HtpasswdChecker(str(path), pool=HashPool())
    assert len([e for e in log_events if e.get("event") == event["event"]]) == 1


# --------------------------------------------------------------------------
# The edges the mutation run found unheld


@pytest.mark.parametrize(
    "hashed, cost",
    [
        (b"$2b$04$" + b"x" * 53, 4),
        (b"$2y$31$" + b"x" * 53, 31),
        (b"$2a$30$" + b"x" * 53, 30),
        (b"$2b$03$" + b"x" * 53, None),  # below bcrypt's least
        (b"$2b$32$" + b"x" * 53, None),  # above its most
        (b"$2b$12", None),  # no "$" after the cost
        (b"$2b$1", None),
        (b"$2b$1x$" + b"x" * 53, None),
        (b"$2b$12x" + b"x" * 53, None),
    ],
)
def test_bcrypt_cost_reads_only_a_well_formed_cost(hashed: bytes, cost: Any) -> None:
    assert bcrypt_cost(hashed) == cost


@pytest.mark.parametrize(
    "bounds",
    [
        {"threads": 0},
        {"max_queued": -1},
        {"max_queued_per_client": -1},
        {"threads": 0, "max_queued": 0, "max_queued_per_client": 0},
    ],
)
def test_a_hash_pool_refuses_bounds_it_cannot_keep(bounds: Any) -> None:
    with pytest.raises(ValueError):
        HashPool(**bounds)


def test_a_hash_pool_takes_the_tightest_bounds_it_can_keep() -> None:
    pool = HashPool(threads=1, max_queued=0, max_queued_per_client=0)
    assert (pool.threads, pool.max_queued, pool.max_queued_per_client) == (1, 0, 0)


def _refused_at_once(d: Any) -> bool:
    """Whether ``d`` has already failed as busy (a queued check would hang)."""
    failures: list[Any] = []
    d.addErrback(failures.append)
    return bool(failures) and failures[0].check(HashPoolFull) is not None


def _run_for(pool: HashPool, client: str, f: Any, name: str) -> Any:
    token = checking_client.set(client)
    try:
        return pool.run(f, name)
    finally:
        checking_client.reset(token)


@pytest_twisted.ensureDeferred
async def test_a_share_of_one_still_lets_each_client_queue_one(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1, max_queued=10, max_queued_per_client=1)
    running = _run_for(pool, "192.0.2.1", check, "running")
    first = _run_for(pool, "192.0.2.2", check, "first")  # its first: queued
    assert not first.called
    assert _refused_at_once(_run_for(pool, "192.0.2.2", check, "second"))
    opened.set()
    assert await defer.gatherResults([running, first]) == ["running", "first"]


@pytest_twisted.ensureDeferred
async def test_a_share_of_none_refuses_every_client_while_busy(gate: Any) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1, max_queued=10, max_queued_per_client=0)
    running = _run_for(pool, "192.0.2.1", check, "running")  # a free thread
    assert _refused_at_once(_run_for(pool, "192.0.2.2", check, "waits"))
    opened.set()
    assert await running == "running"


@pytest_twisted.ensureDeferred
async def test_a_full_hash_pool_warns_once_each_time_it_fills(
    gate: Any, log_events: Any
) -> None:
    opened, ran, check = gate
    pool = HashPool(threads=1, max_queued=1)

    def warnings() -> int:
        return len([e for e in log_events if "refusing more logins" in e["log_format"]])

    taken = [pool.run(check, "running"), pool.run(check, "queued")]
    for _ in range(2):
        with pytest.raises(HashPoolFull):
            await pool.run(check, "refused")
    assert warnings() == 1  # once while it stays full
    opened.set()
    await defer.gatherResults(taken)
    opened.clear()
    taken = [pool.run(check, "running again"), pool.run(check, "queued again")]
    with pytest.raises(HashPoolFull):
        await pool.run(check, "refused again")
    assert warnings() == 2  # full again after it drained: said again
    opened.set()
    await defer.gatherResults(taken)


def test_a_checker_uses_the_pool_it_is_given_or_the_shared_one(htfile: Any) -> None:
    pool = HashPool()
    assert HtpasswdChecker(str(htfile), pool=pool).pool is pool
    shared = HtpasswdChecker(str(htfile)).pool
    assert isinstance(shared, HashPool)
    assert HtpasswdChecker(str(htfile)).pool is shared


@pytest_twisted.ensureDeferred
async def test_a_reload_rereads_a_file_whose_time_did_not_change(
    htfile: Any,
) -> None:
    """An edit in the same clock tick as the last read: SIGHUP still sees it."""
    checker = HtpasswdChecker(str(htfile), pool=HashPool())
    stat = os.stat(htfile)
    htfile.write_bytes(b"bob:" + _hash(b"builder") + b"\n")  # alice revoked
    os.utime(htfile, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # Unforced, an unchanged time means an unchanged file (no re-read) ...
    assert await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
    checker.reload()  # ... but SIGHUP re-reads it whatever its time.
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))


def test_a_missing_file_is_an_error_at_start_and_on_reload(
    htfile: Any, tmp_path: Any, log_events: Any
) -> None:
    with pytest.raises(OSError):
        HtpasswdChecker(str(tmp_path / "missing"), pool=HashPool())
    checker = HtpasswdChecker(str(htfile), pool=HashPool())
    htfile.unlink()
    checker._load()  # between reloads: the old users stay, with a warning
    assert [e for e in log_events if "cannot re-read" in e.get("log_format", "")]
    with pytest.raises(OSError):
        checker.reload()  # SIGHUP: the operator is told it failed


@pytest_twisted.ensureDeferred
async def test_a_stopped_hash_pool_starts_again_when_asked() -> None:
    pool = HashPool(threads=1)
    assert await pool.run(lambda: "before") == "before"
    assert pool._executor is not None
    pool.stop()
    assert pool._executor is None
    pool.stop()  # twice: nothing to stop
    assert await pool.run(lambda: "after") == "after"  # threads again
    pool.stop()


def test_a_pool_without_a_queue_warns_at_its_first_refusal(log_events: Any) -> None:
    pool = HashPool(threads=1, max_queued=0)
    d = pool.run(lambda: "never")
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(HashPoolFull)
    assert [e for e in log_events if "refusing more logins" in e["log_format"]]


def test_lines_without_a_bcrypt_hash_are_one_warning(
    tmp_path: Any, log_events: Any
) -> None:
    def warned() -> int:
        return len([e for e in log_events if "without a bcrypt" in e["log_format"]])

    path = tmp_path / "users"
    path.write_bytes(b"alice:" + _hash(b"x") + b"\n")
    HtpasswdChecker(str(path), pool=HashPool())
    assert warned() == 0
    path.write_bytes(b"alice:" + _hash(b"x") + b"\nbob:{SHA}xyz\ncarol:$apr1$x\n")
    HtpasswdChecker(str(path), pool=HashPool())
    assert warned() == 1
