"""--limits-store redis:// and rediss:// URLs: forms, errors, no password shown."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.testing import MemoryReactorClock

from twisted_socks5.limitstore import ILimitStore, LimitStoreUnavailable
from twisted_socks5.redisstore import (
    DEFAULT_LEASE,
    DEFAULT_TIMEOUT,
    RedisLimitStore,
    RedisURL,
    parse_redis_url,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://127.0.0.1", RedisURL(False, "127.0.0.1", 6379, 0)),
        ("redis://127.0.0.1:6380/2", RedisURL(False, "127.0.0.1", 6380, 2)),
        ("rediss://localhost:6390/", RedisURL(True, "localhost", 6390, 0)),
        ("redis://[::1]:7000/1", RedisURL(False, "::1", 7000, 1)),
        (
            "redis://:p%40ss@127.0.0.1/0",
            RedisURL(False, "127.0.0.1", 6379, 0, password="p@ss"),
        ),
        (
            "redis://proxy:pw@127.0.0.1/0",
            RedisURL(False, "127.0.0.1", 6379, 0, username="proxy", password="pw"),
        ),
        (
            "rediss://127.0.0.1/0?ca=/etc/ca.pem&timeout=0.5&lease=10",
            RedisURL(
                True, "127.0.0.1", 6379, 0, ca="/etc/ca.pem", timeout=0.5, lease=10
            ),
        ),
    ],
)
def test_url_forms(url: str, expected: RedisURL) -> None:
    assert parse_redis_url(url) == expected


def test_defaults() -> None:
    url = parse_redis_url("redis://127.0.0.1")
    assert (url.timeout, url.lease) == (DEFAULT_TIMEOUT, DEFAULT_LEASE)


@pytest.mark.parametrize(
    "url",
    [
        "memory",
        "http://127.0.0.1/0",
        "redis://",
        "redis://:secret@/0",
        "redis://:secret@127.0.0.1:99999/0",
        "redis://:secret@127.0.0.1:port/0",
        "redis://:secret@127.0.0.1/db",
        "redis://:secret@127.0.0.1/-1",
        "redis://:secret@127.0.0.1/0?password=secret",
        "redis://:secret@127.0.0.1/0?timeout=0",
        "redis://:secret@127.0.0.1/0?timeout=nan",
        "redis://:secret@127.0.0.1/0?lease=-1",
        "redis://:secret@127.0.0.1/0?lease=1&lease=2",
        "redis://:secret@127.0.0.1/0?ca=/etc/ca.pem",
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_redis_url(url)
    assert "secret" not in str(caught.value)


def test_describe_and_repr_hide_the_password() -> None:
    url = parse_redis_url("rediss://user:secret@[::1]:7000/3")
    assert url.describe() == "rediss://[::1]:7000/3"
    assert "secret" not in repr(url)
    store = RedisLimitStore("redis://:secret@127.0.0.1/0", MemoryReactorClock())
    assert "secret" not in repr(store)


def test_a_missing_ca_file_is_an_error_at_once(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="CA file"):
        RedisLimitStore(
            f"rediss://127.0.0.1/0?ca={tmp_path}/none.pem", MemoryReactorClock()
        )


def test_the_store_provides_the_interface() -> None:
    store = RedisLimitStore("redis://127.0.0.1/0", MemoryReactorClock())
    assert ILimitStore.providedBy(store)


def test_calls_before_a_connection_fail_at_once() -> None:
    """Nothing waits for a connection: the caller decides (open or closed)."""
    store = RedisLimitStore("redis://127.0.0.1/0", MemoryReactorClock())
    failures = []
    for d in (
        store.open_session("user:a", 1),
        store.hit_rate("user:a", 1, 1.0),
        store.add_usage("user:a", "day", 1),
        store.quota_used("user:a", "day"),
        store.take_bandwidth("user:a", 1.0, 1, 1),
    ):
        d.addErrback(lambda f: failures.append(f.trap(LimitStoreUnavailable)))
    assert len(failures) == 5


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://:hunter2@127.0.0.1/0?bogus=1", "unknown Redis URL parameter"),
        (
            "rediss://:hunter2@127.0.0.1/0?ca=/nonexistent.pem",
            "cannot read the Redis CA",
        ),
        ("redis://:hunter2@127.0.0.1/0?timeout=0", "timeout= takes seconds"),
    ],
)
def test_a_bad_store_url_stops_the_start_cleanly(
    tmp_path: Any, url: str, message: str
) -> None:
    """A usage error naming the option, not a traceback, and no password."""
    from twisted.python import usage

    from twisted_socks5.tap import Options

    rules = tmp_path / "rules"
    rules.write_text("limit user alice sessions 2\nallow user *\n")
    args = ["--auth", "memory:alice:pw", "--rules", str(rules), "--limits-store", url]
    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(args)
    assert str(caught.value).startswith(f"--limits-store: {message}")
    assert "hunter2" not in str(caught.value)


def test_start_twice_runs_one_heartbeat() -> None:
    store = RedisLimitStore("redis://127.0.0.1/0", MemoryReactorClock())
    store.start()
    heartbeat = store._heartbeat
    store.start()
    assert store._heartbeat is heartbeat
    store.stop()
    assert heartbeat is not None and not heartbeat.running


@pytest.mark.parametrize(
    "url",
    [
        "redsi://:hunter2@127.0.0.1/0",
        "redis://:hunter2@127.0.0.1:99999/0",
        "redis://u:hunter2@127.0.0.1/zero",
        "redis://:hunter2@/0",
        "hunter2@127.0.0.1",
    ],
)
def test_the_option_never_echoes_a_password(url: str) -> None:
    from twisted.python import usage

    from twisted_socks5.tap import Options

    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions(["--limits-store", url])
    assert str(caught.value).startswith("--limits-store")
    assert "hunter2" not in str(caught.value)
