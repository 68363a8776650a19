"""
Connection limits at their edges: the descriptor budget's last connection,
a budget too small for one connection, and a descriptor limit that is only
ever raised.  (Found by mutation testing: docs/reliability.rst.)
"""

from __future__ import annotations

import resource
from typing import Iterator

import pytest

from twisted_socks5 import limits as limits_module
from twisted_socks5.limits import (
    ConnectionLimits,
    default_max_connections,
    raise_fd_limit,
)


@pytest.fixture
def nofile() -> Iterator[int]:
    """The soft descriptor limit, restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        yield soft
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _soft() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def test_the_descriptor_limit_is_raised_never_lowered(nofile: int) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile // 2, hard))
    assert raise_fd_limit(ceiling=nofile) == nofile == _soft()
    assert raise_fd_limit(ceiling=nofile // 4) == nofile == _soft()


def test_a_budget_below_one_connection_still_limits() -> None:
    # 0 would mean "no limit": a tiny budget must not turn into that.
    assert default_max_connections(fds_per_connection=1 << 40) == 1


def test_the_last_connection_the_descriptors_hold_is_admitted() -> None:
    limits = ConnectionLimits(lambda: 0.0, max_connections=1000, fds_per_connection=3)
    # Two connections' worth: one of 3 open, and room for a last one that may
    # become a UDP association (its worst case, 4 descriptors).
    limits.fd_budget = 3 + limits.worst_case_fds
    assert limits.refusal("192.0.2.1") is None
    limits.opened("192.0.2.1")
    assert limits.refusal("192.0.2.1") is None
    limits.opened("192.0.2.1")
    refusal = limits.refusal("192.0.2.1")
    assert refusal is not None and refusal[0] == "server_full"


def test_a_closed_connection_frees_exactly_one_slot() -> None:
    limits = ConnectionLimits(
        lambda: 0.0, max_connections=2, max_per_client=2, auth_failures=0
    )
    for ip in ("192.0.2.1", "192.0.2.1"):
        assert limits.refusal(ip) is None
        limits.opened(ip)
    assert limits.refusal("192.0.2.9") is not None  # full
    limits.closed("192.0.2.1")
    assert limits.refusal("192.0.2.1") is None
    limits.opened("192.0.2.1")
    assert limits.refusal("192.0.2.9") is not None  # full again
    limits.max_connections = 0  # no total limit: the per-client one holds
    refusal = limits.refusal("192.0.2.1")
    assert refusal is not None and refusal[0] == "client_limit"


def test_a_client_whose_connections_all_closed_may_come_back() -> None:
    limits = ConnectionLimits(lambda: 0.0, max_connections=0, max_per_client=1)
    for _ in range(3):
        assert limits.refusal("192.0.2.1") is None
        limits.opened("192.0.2.1")
        assert limits.refusal("192.0.2.1") is not None
        limits.closed("192.0.2.1")


def test_the_failure_table_forgets_the_least_recent_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits_module, "MAX_TRACKED_CLIENTS", 3)
    limits = ConnectionLimits(lambda: 0.0, max_connections=0, auth_failures=1)
    for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        limits.auth_failed(ip)
    limits.auth_failed("192.0.2.1")  # fails again: now the most recent
    limits.auth_failed("192.0.2.4")  # a fourth client: .2 is forgotten
    throttled = {
        ip
        for ip in ("192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4")
        if limits.refusal(ip) is not None
    }
    assert throttled == {"192.0.2.1", "192.0.2.3", "192.0.2.4"}


def test_the_throttle_counts_only_failures_inside_the_window() -> None:
    now = [0.0]
    limits = ConnectionLimits(
        lambda: now[0], max_connections=0, auth_failures=2, auth_window=60.0
    )
    assert limits.refusal("192.0.2.1") is None
    limits.auth_failed("192.0.2.1")  # at 0
    now[0] = 50.0
    limits.auth_failed("192.0.2.1")  # at 50: two in the window
    assert limits.refusal("192.0.2.1") is not None
    now[0] = 70.0  # the first has aged out
    assert limits.refusal("192.0.2.1") is None
    now[0] = 120.0  # both have
    assert limits.refusal("192.0.2.1") is None


def test_one_failure_throttles_when_one_is_the_limit() -> None:
    now = [0.0]
    limits = ConnectionLimits(
        lambda: now[0], max_connections=0, auth_failures=1, auth_window=60.0
    )
    assert limits.refusal("192.0.2.1") is None  # no failure yet
    limits.auth_failed("192.0.2.1")
    assert limits.refusal("192.0.2.1") is not None
    assert limits.refusal("192.0.2.2") is None
    now[0] = 61.0
    assert limits.refusal("192.0.2.1") is None  # aged out


def test_the_descriptor_budget_keeps_a_reserve(nofile: int) -> None:
    assert 1 <= limits_module.descriptor_budget() < nofile


def test_the_last_splice_the_descriptors_hold_is_allowed() -> None:
    limits = ConnectionLimits(lambda: 0.0, max_connections=0, fds_per_connection=3)
    limits.opened("192.0.2.1")
    limits.fd_budget = 3 + limits_module.PIPE_FDS  # one tunnel, one splice
    assert limits.may_splice()
    limits.splice_started()
    assert not limits.may_splice()
    limits.splice_ended()
    assert limits.may_splice()


def test_a_failure_counts_for_the_whole_window() -> None:
    now = [0.0]
    limits = ConnectionLimits(
        lambda: now[0], max_connections=0, auth_failures=1, auth_window=60.0
    )
    limits.auth_failed("192.0.2.1")
    now[0] = 60.0  # the window's last moment
    assert limits.refusal("192.0.2.1") is not None
