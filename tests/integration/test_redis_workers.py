"""
`twistd socks5 --limits-store redis://...` with a real redis-server: two
workers enforce one `sessions` limit between them, and a quota's usage
survives a restart of the server, and requests are refused while Redis is
down and admitted again once the store reconnected by itself.
"""

from __future__ import annotations

import re
from typing import Any, Set

import pytest_twisted
from conftest import Echo
from redis_server import RedisServer, needs_redis
from redis_server import redis as redis  # the fixture
from test_limits_twistd import USERS, _cut, _in_thread, _open, _refused, _stop
from test_twistd import Twistd
from twisted.internet import reactor

pytestmark = needs_redis

#: Enough refused attempts that both workers have had some (each attempt
#: lands on either: missing one 40 times in a row is a 2**-39 chance).
ATTEMPTS = 40


def _refusing_workers(output: bytes) -> Set[int]:
    return {
        int(index)
        for index in re.findall(
            rb"\[worker (\d+)\][^\n]*limit user alice sessions 2 \(2 open\)", output
        )
    }


@pytest_twisted.ensureDeferred
async def test_two_workers_share_one_sessions_limit(
    tmp_path: Any, tcp_target: Any, redis: RedisServer
) -> None:
    target = tcp_target(Echo)
    rules = tmp_path / "rules"
    rules.write_text("limit user alice sessions 2\nallow user *\n")
    process = Twistd.start(
        tmp_path,
        *USERS,
        "--workers",
        "2",
        "--limits-store",
        redis.url(),
        "--rules",
        str(rules),
    )
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for_count(b"is connected", 2).addTimeout(30, reactor)
        first = await _in_thread(_open, port, target)
        second = await _in_thread(_open, port, target)
        # Every third session is refused, whichever worker takes it.
        for _ in range(ATTEMPTS):
            refusal = await _in_thread(_refused, port, target)
            assert "0x02" in refusal or "not allowed" in refusal
            if _refusing_workers(b"".join(process.output)) == {0, 1}:
                break
        assert _refusing_workers(b"".join(process.output)) == {0, 1}
        first.close()
        # Admitted again once the close reached Redis (it is asynchronous).
        third = None
        for _ in range(ATTEMPTS):
            try:
                third = await _in_thread(_open, port, target)
                break
            except Exception:  # noqa: BLE001, S112 - refused until the close lands
                continue
        assert third is not None, "never admitted after a close"
        for s in (second, third):
            s.close()
    finally:
        assert await _stop(process) == 0


@pytest_twisted.ensureDeferred
async def test_a_quota_in_redis_survives_a_restart(
    tmp_path: Any, tcp_target: Any, redis: RedisServer
) -> None:
    target = tcp_target(Echo)
    rules = tmp_path / "rules"
    rules.write_text("limit user alice quota 1KiB/day\nallow user *\n")
    options = (*USERS, "--rules", str(rules), "--limits-store", redis.url())
    process = Twistd.start(tmp_path, *options)
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"is connected").addTimeout(30, reactor)
        assert len(await _in_thread(_cut, port, target)) == 4096
        await process.wait_for(b"quota used up").addTimeout(30, reactor)
        assert "not allowed" in await _in_thread(_refused, port, target)
    finally:
        assert await _stop(process) == 0

    again = Twistd.start(tmp_path, *options)
    try:
        port = await again.listening.addTimeout(30, reactor)
        await again.wait_for(b"is connected").addTimeout(30, reactor)
        assert "not allowed" in await _in_thread(_refused, port, target)
        (await _in_thread(_open, port, target, "bob")).close()
    finally:
        assert await _stop(again) == 0


@pytest_twisted.ensureDeferred
async def test_redis_down_refuses_then_recovers_by_itself(
    tmp_path: Any, tcp_target: Any, redis: RedisServer
) -> None:
    """--limits-on-store-failure closed (the default), end to end."""
    target = tcp_target(Echo)
    rules = tmp_path / "rules"
    rules.write_text("limit user alice sessions 5\nallow user *\n")
    options = (*USERS, "--rules", str(rules), "--limits-store", redis.url())
    process = Twistd.start(tmp_path, *options)
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"is connected").addTimeout(30, reactor)
        (await _in_thread(_open, port, target)).close()
        await redis.kill()
        for _ in range(3):
            assert "not allowed" in await _in_thread(_refused, port, target)
        # bob has no limit line: the store is never asked for him.
        (await _in_thread(_open, port, target, "bob")).close()
        await redis.start()
        third = None
        for _ in range(ATTEMPTS * 10):
            try:
                third = await _in_thread(_open, port, target)
                break
            except Exception:  # noqa: BLE001, S112 - refused until reconnected
                await process.wait_for(b"is back").addTimeout(30, reactor)
        assert third is not None, "never admitted after Redis came back"
        third.close()
        output = b"".join(process.output)
        # The store's own lines, once each (the limits log theirs too).
        assert output.count(b"RedisLimitStore#warn") == 1
        assert output.count(b"is unavailable (connection lost") == 1
        assert output.count(b"0 is back") == 1
    finally:
        assert await _stop(process) == 0
