"""
``twistd socks5 --access-log`` as users run it: logrotate's move then
SIGUSR1, a SIGHUP that revokes a removed user's tunnel, and the records of
each, parsed.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, List

import bcrypt
import pytest
import pytest_twisted
from conftest import Echo, until
from test_clients import CURL, curl
from test_revocation import Client, tunnel
from test_twistd import TWISTD, Twistd, _env
from twisted.internet import reactor, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_socks5.codec import Address, Command, Request

pytestmark = pytest.mark.skipif(
    not os.path.exists(TWISTD), reason="twistd is not installed next to python"
)


def records(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest_twisted.ensureDeferred
async def test_logrotate_move_then_sigusr1_and_a_revoking_sighup(
    tcp_target: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.htpasswd"
    alice = b"alice:" + bcrypt.hashpw(b"pw-alice", bcrypt.gensalt(4))
    bob = b"bob:" + bcrypt.hashpw(b"pw-bob", bcrypt.gensalt(4))
    users.write_bytes(alice + b"\n" + bob + b"\n")
    log = tmp_path / "access.log"
    process = Twistd.start(
        tmp_path,
        "--auth",
        f"htpasswd:{users}",
        "--access-log",
        str(log),
        "--drain-timeout",
        "0.5",
    )
    target = tcp_target(Echo)
    try:
        port = await process.listening.addTimeout(30, reactor)
        wrong = Client(
            b"mallory", Request(Command.CONNECT, Address.from_host("127.0.0.1", target))
        )
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), wrong)
        await wrong.closed.addTimeout(30, reactor)
        await until(lambda: log.stat().st_size > 0, "the refusal written")
        log.rename(tmp_path / "access.log.1")  # logrotate's create mode
        process.transport.signalProcess(signal.SIGUSR1)
        await until(log.exists, "a new access log after SIGUSR1")
        alices = await tunnel(port, target, b"alice")
        bobs = await tunnel(port, target, b"bob")
        users.write_bytes(alice + b"\n")
        process.transport.signalProcess(signal.SIGHUP)
        await bobs.closed.addTimeout(30, reactor)
        assert await alices.echoes()  # and left open: the stop cuts it
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        code = await process.ended
    output = b"".join(process.output).decode()
    assert code == 0, output
    assert "reload: 1 of 2 open connection(s) revoked" in output
    (refused,) = records(tmp_path / "access.log.1")
    assert refused["outcome"] == "refused" and refused["user"] == "mallory"
    assert refused["reason"] == "authentication failed"
    by_user = {r["user"]: r for r in records(log)}
    assert set(by_user) == {"alice", "bob"}
    assert by_user["bob"]["outcome"] == "revoked"
    assert by_user["bob"]["reason"] == "revoked: user removed from the password file"
    # Written although the stop closes the access log as it ends.
    assert by_user["alice"]["reason"] == "aborted at shutdown"
    assert by_user["alice"]["bytes_up"] == by_user["alice"]["bytes_down"] == 4
    assert by_user["alice"]["listener"] == f"127.0.0.1:{port}"


@pytest_twisted.ensureDeferred
async def test_rotation_options_are_checked(tmp_path: Path) -> None:
    async def run(*args: str) -> Any:
        return await utils.getProcessOutputAndValue(
            TWISTD,
            ["-n", "--pidfile=", "socks5", *args],
            env=_env(),
            path=str(tmp_path),
        )

    out, err, code = await run("--access-log", "a.log", "--access-log-rotate", "weekly")
    assert code != 0 and b"--access-log-rotate" in err + out
    out, err, code = await run(
        "--access-log", "a.log", "--access-log-rotate", "daily", "--workers", "2"
    )
    assert code != 0 and b"cannot be combined with --workers" in err + out


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_workers_append_to_one_access_log_and_survive_sigusr1(
    http_target: Any, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    process = Twistd.start(tmp_path, "--workers", "2", "--access-log", str(log))
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    try:
        port = await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"worker 1 started").addTimeout(30, reactor)
        for _ in range(4):
            _, err, code = await curl("--socks5", f"127.0.0.1:{port}", url)
            assert code == 0, err
        log.rename(tmp_path / "access.log.1")
        process.transport.signalProcess(signal.SIGUSR1)  # passed on to each
        await until(log.exists, "the workers' new access log")
        for _ in range(4):
            _, err, code = await curl("--socks5", f"127.0.0.1:{port}", url)
            assert code == 0, err
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        code = await process.ended
    output = b"".join(process.output).decode()
    assert code == 0, output
    assert "restarting" not in output  # no worker died of the signal
    both = records(tmp_path / "access.log.1") + records(log)
    assert len(both) == 8
    assert {r["outcome"] for r in both} == {"success"}
