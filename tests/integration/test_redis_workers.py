"""
`twistd socks5 --limits-store redis://...` with a real redis-server: two
workers enforce one `sessions` limit between them, and a quota's usage
survives a restart of the server.
"""

from __future__ import annotations

import re
import signal
from typing import Any, Callable, Optional, Set

import pytest
import pytest_twisted
import socks
from conftest import Echo
from redis_server import RedisServer, needs_redis
from redis_server import redis as redis  # the fixture
from test_twistd import Twistd
from twisted.internet import reactor, threads

pytestmark = needs_redis

USERS = ("--auth", "memory:alice:pw:bob:pw")


def _open(proxy_port: int, target: int, user: str = "alice") -> socks.socksocket:
    """A tunnel to the echo target (PySocks), checked with one round trip."""
    s = socks.socksocket()
    s.settimeout(30)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, username=user, password="pw")
    try:
        s.connect(("127.0.0.1", target))
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    except BaseException:
        s.close()
        raise
    return s


def _refused(proxy_port: int, target: int) -> str:
    """The proxy's refusal of alice's request, as PySocks words it."""
    with pytest.raises(socks.GeneralProxyError) as caught:
        _open(proxy_port, target).close()
    return str(caught.value)


def _used_up(proxy_port: int, target: int) -> int:
    """Echo 4 KiB through a tunnel the quota cuts: the bytes that came back."""
    s = _open(proxy_port, target)
    try:
        s.sendall(b"x" * 4096)
        received = 0
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += len(chunk)
        return received
    finally:
        s.close()


def _in_thread(f: Callable[..., Any], *args: Any) -> Any:
    return threads.deferToThread(f, *args).addTimeout(60, reactor)


async def _stop(process: Twistd) -> Optional[int]:
    process.transport.signalProcess(signal.SIGTERM)
    code: Optional[int] = await process.ended.addTimeout(60, reactor)
    return code


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
        assert await _in_thread(_used_up, port, target) == 4096
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
