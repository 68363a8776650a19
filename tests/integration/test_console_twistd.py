"""
``twistd socks5 --admin``: the console the command line builds, on a UNIX
socket, answers a script's Basic login; a console without --admin-auth
never starts.
"""

from __future__ import annotations

import base64
import json
import signal
from typing import Any

import pytest_twisted
from test_errors import RawClient
from test_twistd import TWISTD, Twistd, _env
from twisted.internet import reactor, utils
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol


async def ask(path: str, request: bytes) -> bytes:
    client = RawClient(request)
    await connectProtocol(UNIXClientEndpoint(reactor, path), client)
    return await client.done.addTimeout(30, reactor)


@pytest_twisted.ensureDeferred
async def test_twistd_serves_the_console_on_a_unix_socket(tmp_path: Any) -> None:
    sock = str(tmp_path / "admin.sock")
    process = Twistd.start(
        tmp_path, "--admin", f"unix:{sock}", "--admin-auth", "memory:root:toor"
    )
    try:
        await process.listening.addTimeout(30, reactor)
        await process.wait_for(b"ConsoleSite starting on").addTimeout(30, reactor)
        token = base64.b64encode(b"root:toor")
        answer = await ask(
            sock,
            b"GET /api/users HTTP/1.0\r\nAuthorization: Basic " + token + b"\r\n\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200"), answer
        assert json.loads(body) == []
        answer = await ask(sock, b"GET /api/users HTTP/1.0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.0 401"), answer
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        assert await process.ended.addTimeout(30, reactor) == 0


@pytest_twisted.ensureDeferred
async def test_twistd_refuses_a_console_without_a_password() -> None:
    out, err, code = await utils.getProcessOutputAndValue(
        TWISTD,
        ["-n", "--pidfile=", "socks5", "--admin", "tcp:0:interface=127.0.0.1"],
        env=_env(),
    )
    assert code != 0
    assert b"refusing to start the console" in out + err
