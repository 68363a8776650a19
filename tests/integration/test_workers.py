"""`twistd socks5 --workers 2`: shared ports, restarts, graceful stop."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest
import pytest_twisted
from test_clients import CURL, curl
from test_twistd import TWISTD, Twistd
from twisted.internet import reactor

pytestmark = [
    pytest.mark.skipif(not os.path.exists(TWISTD), reason="twistd is not installed"),
    pytest.mark.skipif(CURL is None, reason="curl is not installed"),
]


def _pids(output: bytes) -> dict[int, int]:
    """worker index -> pid, the latest start of each."""
    found: dict[int, int] = {}
    for index, pid in re.findall(rb"worker (\d+) started \(pid (\d+)\)", output):
        found[int(index)] = int(pid)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest_twisted.ensureDeferred
async def test_workers_share_the_port_restart_and_stop(
    http_target: Any, tmp_path: Any
) -> None:
    process = Twistd.start(tmp_path, "--workers", "2")
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"worker 1 started").addTimeout(30, reactor)
        first = _pids(b"".join(process.output))
        assert sorted(first) == [0, 1]
        for _ in range(6):
            out, err, code = await curl("--socks5", f"127.0.0.1:{port}", url)
            assert code == 0, err
            assert out == b"hello through socks\n"

        os.kill(first[0], signal.SIGKILL)
        await process.wait_for(b"worker 0 ended").addTimeout(30, reactor)
        await process.wait_for(b"restarting").addTimeout(30, reactor)
        await process.wait_for_count(b"worker 0 started", 2).addTimeout(30, reactor)
        assert _pids(b"".join(process.output))[0] != first[0]
        for _ in range(6):
            out, err, code = await curl("--socks5", f"127.0.0.1:{port}", url)
            assert code == 0, err
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        exit_code = await process.ended
    assert exit_code == 0, b"".join(process.output).decode()
    for pid in _pids(b"".join(process.output)).values():
        assert not _alive(pid)
