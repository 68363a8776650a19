"""
The rules' limit lines in `twistd socks5`, with a real client (PySocks, in
a thread): a user's third session is refused and admitted once one closes,
a rate refuses the request over it,
a used-up quota cuts the live tunnel and still refuses after a restart (the
memory store's state file), and --workers with the memory store refuses to
start.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

import pytest
import pytest_twisted
import socks
from conftest import Echo
from test_twistd import TWISTD, Twistd, _env
from twisted.internet import reactor, threads, utils

pytestmark = pytest.mark.skipif(
    not os.path.exists(TWISTD), reason="twistd is not installed next to python"
)

USERS = ("--auth", "memory:alice:pw:bob:pw")


def _client(proxy_port: int, user: str = "alice") -> socks.socksocket:
    s = socks.socksocket()
    s.settimeout(30)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, username=user, password="pw")
    return s


def _open(proxy_port: int, target: int, user: str = "alice") -> socks.socksocket:
    """A tunnel to the echo target, checked with one round trip."""
    s = _client(proxy_port, user)
    s.connect(("127.0.0.1", target))
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def _refused(proxy_port: int, target: int, user: str = "alice") -> str:
    """The proxy's refusal of a request (PySocks raises it)."""
    s = _client(proxy_port, user)
    try:
        with pytest.raises(socks.GeneralProxyError) as caught:
            s.connect(("127.0.0.1", target))
    finally:
        s.close()
    return str(caught.value)


def _in_thread(f: Callable[..., Any], *args: Any) -> Any:
    return threads.deferToThread(f, *args).addTimeout(60, reactor)


async def _stop(process: Twistd) -> Optional[int]:
    process.transport.signalProcess(signal.SIGTERM)
    code: Optional[int] = await process.ended.addTimeout(60, reactor)
    return code


@pytest_twisted.ensureDeferred
async def test_the_third_session_is_refused_until_one_closes(
    tmp_path: Any, tcp_target: Any
) -> None:
    target = tcp_target(Echo)
    rules = tmp_path / "rules"
    rules.write_text(
        "limit user alice sessions 2\nlimit user bob rate 2/1h\nallow user *\n"
    )
    process = Twistd.start(tmp_path, *USERS, "--rules", str(rules))
    try:
        port = await process.listening.addTimeout(30, reactor)
        first = await _in_thread(_open, port, target)
        second = await _in_thread(_open, port, target)
        refusal = await _in_thread(_refused, port, target)
        assert "0x02: Connection not allowed by ruleset" in refusal
        refused = b"rules:1: limit user alice sessions 2 (2 open)"
        await process.wait_for(refused).addTimeout(30, reactor)
        bob = await _in_thread(_open, port, target, "bob")
        (await _in_thread(_open, port, target, "bob")).close()
        refusal = await _in_thread(_refused, port, target, "bob")
        assert "0x02: Connection not allowed by ruleset" in refusal
        first.close()
        # The refusal's log line, then the first tunnel's at its close.
        await process.wait_for_count(b"alice connect 127.0.0.1", 2).addTimeout(
            30, reactor
        )
        third = await _in_thread(_open, port, target)
        for s in (second, third, bob):
            s.close()
    finally:
        assert await _stop(process) == 0


def _cut(proxy_port: int, target: int) -> bytes:
    """Echo 4 KiB, then wait for the proxy to cut the tunnel."""
    s = _open(proxy_port, target)
    try:
        s.sendall(b"x" * 4096)
        received = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        return received
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_a_used_up_quota_cuts_the_tunnel_and_survives_a_restart(
    tmp_path: Any, tcp_target: Any
) -> None:
    target = tcp_target(Echo)
    rules = tmp_path / "rules"
    rules.write_text("limit user alice quota 1KiB/day\nallow user *\n")
    state = tmp_path / "limits.state"
    options = (*USERS, "--rules", str(rules), "--state-file", str(state))
    process = Twistd.start(tmp_path, *options)
    try:
        port = await process.listening.addTimeout(30, reactor)
        echoed = await _in_thread(_cut, port, target)
        assert len(echoed) == 4096  # all echoed, then cut when next counted
        await process.wait_for(b"quota used up").addTimeout(30, reactor)
        assert "not allowed" in await _in_thread(_refused, port, target)
        assert (await _in_thread(_open, port, target, "bob")).close() is None
    finally:
        assert await _stop(process) == 0
    assert state.exists()

    again = Twistd.start(tmp_path, *options)
    try:
        port = await again.listening.addTimeout(30, reactor)
        assert "not allowed" in await _in_thread(_refused, port, target)
    finally:
        assert await _stop(again) == 0


@pytest_twisted.ensureDeferred
async def test_workers_with_limits_and_the_memory_store_refuse_to_start(
    tmp_path: Any,
) -> None:
    rules = tmp_path / "rules"
    rules.write_text("limit user * sessions 2\nallow user *\n")
    out, err, code = await utils.getProcessOutputAndValue(
        TWISTD,
        ["-n", "--pidfile=", "socks5", *USERS, "--workers", "2", "--rules", str(rules)],
        env=_env(),
        path=str(tmp_path),
    )
    output = (out + err).decode()
    assert code != 0
    assert "Traceback" not in output
    assert "--limits-store redis://HOST:PORT/DB" in output
