"""
The limits' options: the store URL, the state file, the failure mode, and
the start-up guard against splitting limits between --workers.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any, List

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from test_plugin import parse
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage

from twisted_socks5.limiting import parse_store_url
from twisted_socks5.limitstore import MemoryLimitStore
from twisted_socks5.tap import build_factory

LISTEN = ("--listen", "tcp:0:interface=127.0.0.1")


@pytest.fixture
def limits(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "rules"
    path.write_text("limit user * sessions 2\nallow user *\n")
    return str(path)


@pytest.fixture
def plain(tmp_path: pathlib.Path) -> str:
    path = tmp_path / "plain"
    path.write_text("allow user *\n")
    return str(path)


AUTH = ("--auth", "memory:alice:pw")


@pytest.mark.parametrize(
    "url",
    [
        "memory",
        "redis://127.0.0.1:6379/0",
        "rediss://localhost:6380/2",
        "redis://[::1]",
    ],
)
def test_store_urls(url: str) -> None:
    assert parse_store_url(url) == url


@pytest.mark.parametrize(
    "url, message",
    [
        ("Memory", "memory, redis://"),
        ("http://127.0.0.1/", "memory, redis://"),
        ("redis:127.0.0.1", "memory, redis://"),
        ("redis://:6379/0", "no host"),
        ("redis://127.0.0.1:99999/0", "bad URL"),
        ("redis://127.0.0.1:6379/zero", "database"),
    ],
)
def test_bad_store_urls_name_the_option(url: str, message: str) -> None:
    with pytest.raises(usage.UsageError, match="^--limits-store") as caught:
        parse(*LISTEN, "--limits-store", url)
    assert message in str(caught.value)


def test_the_failure_mode_is_open_or_closed() -> None:
    assert parse(*LISTEN)["limits-on-store-failure"] == "closed"
    assert (
        parse(*LISTEN, "--limits-on-store-failure", "open")["limits-on-store-failure"]
        == "open"
    )
    with pytest.raises(usage.UsageError, match="^--limits-on-store-failure"):
        parse(*LISTEN, "--limits-on-store-failure", "maybe")


def test_workers_with_limits_and_the_memory_store_refuse(limits: str) -> None:
    with pytest.raises(usage.UsageError, match="--limits-store redis://HOST:PORT/DB"):
        parse(*LISTEN, *AUTH, "--workers", "2", "--rules", limits)


def test_workers_without_limit_lines_or_with_one_process_start(
    limits: str, plain: str
) -> None:
    parse(*LISTEN, *AUTH, "--workers", "2", "--rules", plain)
    parse(*LISTEN, *AUTH, "--workers", "1", "--rules", limits)


def test_a_redis_store_needs_its_module(monkeypatch: Any, limits: str) -> None:
    monkeypatch.setitem(sys.modules, "twisted_socks5.redisstore", None)
    with pytest.raises(usage.UsageError, match="Redis store .* cannot be loaded"):
        parse(
            *LISTEN, *AUTH, "--rules", limits, "--limits-store", "redis://127.0.0.1/0"
        )


def test_the_state_file_is_for_the_memory_store(limits: str) -> None:
    with pytest.raises(usage.UsageError, match="--state-file is for"):
        parse(
            *LISTEN,
            "--limits-store",
            "redis://127.0.0.1/0",
            "--state-file",
            "usage.json",
        )


def test_the_factory_gets_its_limits_only_with_rules(
    limits: str, tmp_path: pathlib.Path
) -> None:
    reactor = MemoryReactorClock()
    state = str(tmp_path / "state")
    options = parse(*LISTEN, *AUTH, "--rules", limits, "--state-file", state)
    factory = build_factory(options, reactor)
    store = factory.limiter.store
    assert isinstance(store, MemoryLimitStore)
    assert (store.state_file, store.clock) == (state, reactor)
    assert not factory.limiter.fail_open and not factory.limiter.per_user_metrics
    assert factory.limiter in factory.reloadables()
    assert build_factory(parse(*LISTEN), reactor).limiter is None


def test_the_factory_passes_the_failure_mode_and_metrics(limits: str) -> None:
    args: List[str] = [*LISTEN, *AUTH, "--rules", limits]
    args += ["--limits-on-store-failure", "open", "--metrics-per-user"]
    factory = build_factory(parse(*args), MemoryReactorClock())
    assert factory.limiter.fail_open and factory.limiter.per_user_metrics


@given(st.text(max_size=40))
@example("redis://")
@example("rediss://h:1/")
def test_any_store_text_is_a_store_or_a_value_error(text: str) -> None:
    try:
        url = parse_store_url(text)
    except ValueError:
        return
    assert url == text
    assert text == "memory" or text.startswith(("redis://", "rediss://"))


def test_a_worker_refuses_limit_lines_on_reload(tmp_path: pathlib.Path) -> None:
    from twisted_socks5.exposure import refuse_split_limits_on_reload
    from twisted_socks5.rules import RulesError, RulesFile

    path = tmp_path / "rules"
    path.write_text("allow user *\n")
    policy = RulesFile(str(path))
    refuse_split_limits_on_reload(policy, "redis://127.0.0.1/0")
    assert policy.guard is None
    refuse_split_limits_on_reload(policy, "memory")
    path.write_text("allow user *\nlimit user * sessions 2\n")
    with pytest.raises(RulesError, match=":2: limit lines with --workers"):
        policy.reload()
    assert policy.limits == ()
    path.write_text("allow user *\ndeny from 10.0.0.1\n")
    policy.reload()
    assert len(policy.rules.rules) == 2
