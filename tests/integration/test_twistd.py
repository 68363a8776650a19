"""`twistd socks5` as users run it: a real process, a real client."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from typing import Any, List

import pytest
import pytest_twisted
from twisted.internet import defer, inotify, protocol, reactor, utils
from twisted.python.filepath import FilePath

CURL = shutil.which("curl")
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
pytestmark = pytest.mark.skipif(
    not os.path.exists(TWISTD), reason="twistd is not installed next to python"
)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


class Twistd(protocol.ProcessProtocol):
    """Runs twistd; ``listening`` fires with the port it reports."""

    def __init__(self) -> None:
        self.output: List[bytes] = []
        self.listening: defer.Deferred[int] = defer.Deferred()
        self.ended: defer.Deferred[Any] = defer.Deferred()
        self.waiting: List[tuple[bytes, int, defer.Deferred[None]]] = []

    def wait_for(self, text: bytes) -> defer.Deferred[None]:
        """Fires once ``text`` has appeared in the output."""
        return self.wait_for_count(text, 1)

    def wait_for_count(self, text: bytes, count: int) -> defer.Deferred[None]:
        """Fires once ``text`` has appeared ``count`` times in the output."""
        d: defer.Deferred[None] = defer.Deferred()
        self.waiting.append((text, count, d))
        self._check()
        return d

    def _check(self) -> None:
        output = b"".join(self.output)
        for entry in list(self.waiting):
            text, count, d = entry
            if output.count(text) >= count:
                self.waiting.remove(entry)
                d.callback(None)

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)
        match = re.search(rb"listening on 127\.0\.0\.1:(\d+)", b"".join(self.output))
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))
        self._check()

    errReceived = outReceived

    @classmethod
    def start(cls, cwd: Any, *socks5: str, twistd: Any = ("--pidfile=",)) -> Twistd:
        """Run ``twistd -n TWISTD... socks5 --listen tcp:0 SOCKS5...`` in ``cwd``."""
        process = cls()
        args = [
            TWISTD,
            "-n",
            *twistd,
            "socks5",
            "--listen",
            "tcp:0:interface=127.0.0.1",
        ]
        reactor.spawnProcess(
            process, TWISTD, [*args, *socks5], env=_env(), path=str(cwd)
        )
        return process

    def processEnded(self, reason: Any) -> None:
        if not self.listening.called:
            self.listening.errback(RuntimeError(b"".join(self.output).decode()))
        # twistd re-raises the signal that stopped it, so a clean SIGTERM
        # stop ends "by signal 15": report that as the exit status.
        code = reason.value.exitCode
        if code is None and getattr(reason.value, "signal", None) == signal.SIGTERM:
            code = 0
        self.ended.callback(code)


@pytest_twisted.ensureDeferred
async def test_help_lists_every_option() -> None:
    out, err, code = await utils.getProcessOutputAndValue(
        TWISTD, ["socks5", "--help"], env=_env()
    )
    assert code == 0, err
    for option in (
        b"--listen",
        b"--auth",
        b"--connect-timeout",
        b"--handshake-timeout",
        b"--idle-timeout",
        b"--method",
        b"--bind-timeout",
        b"--commands",
        b"--udp-allow-unknown-sources",
    ):
        assert option in out


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_twistd_socks5_serves_curl_with_a_password(
    http_target: Any, tmp_path: Any
) -> None:
    process = Twistd.start(tmp_path, "--auth", "memory:alice:s3cret")
    try:
        port = await process.listening.addTimeout(30, reactor)
        out, err, code = await utils.getProcessOutputAndValue(
            CURL,
            [
                "-sS",
                "--max-time",
                "20",
                "--socks5",
                f"127.0.0.1:{port}",
                "-U",
                "alice:s3cret",
                f"http://127.0.0.1:{http_target['127.0.0.1']}/",
            ],
            env=_env(),
        )
        assert code == 0, err
        assert out == b"hello through socks\n"
        await process.wait_for(b"alice connect 127.0.0.1:").addTimeout(30, reactor)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
    log = b"".join(process.output)
    assert b"methods offered: 0x02 (userpass)" in log
    assert b"alice connect 127.0.0.1:" in log
    assert b"s3cret" not in log


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
@pytest_twisted.ensureDeferred
async def test_sighup_reloads_credentials_and_keeps_running(
    http_target: Any, tmp_path: Any
) -> None:
    import bcrypt

    users = tmp_path / "users.htpasswd"
    users.write_bytes(b"old:" + bcrypt.hashpw(b"pw1", bcrypt.gensalt(4)) + b"\n")
    process = Twistd.start(tmp_path, "--auth", f"htpasswd:{users}")
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"

    async def fetch(credentials: str) -> int:
        _, _, code = await utils.getProcessOutputAndValue(
            CURL,
            [
                "-sS",
                "--max-time",
                "20",
                "--socks5",
                f"127.0.0.1:{port}",
                "-U",
                credentials,
                url,
            ],
            env=_env(),
        )
        return int(code)

    try:
        port = await process.listening.addTimeout(30, reactor)
        assert await fetch("old:pw1") == 0
        users.write_bytes(b"new:" + bcrypt.hashpw(b"pw2", bcrypt.gensalt(4)) + b"\n")
        process.transport.signalProcess(signal.SIGHUP)
        await process.wait_for(b"reloaded").addTimeout(30, reactor)
        assert await fetch("new:pw2") == 0
        assert await fetch("old:pw1") == 97
        users.unlink()  # a broken configuration keeps the old one
        process.transport.signalProcess(signal.SIGHUP)
        await process.wait_for(b"keeping it as it was").addTimeout(30, reactor)
        assert await fetch("new:pw2") == 0
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        code = await process.ended
        assert code == 0, b"".join(process.output).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest_twisted.ensureDeferred
async def test_twistd_pidfile_logfile_and_privilege_drop() -> None:
    """Ports are bound as root, then twistd's --uid/--gid drop privileges."""
    import pathlib
    import shutil
    import tempfile

    # pytest's tmp_path is private to root; nobody must be able to enter here.
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="socks5-uid-"))
    workdir.chmod(0o755)
    pidfile = workdir / "socks5.pid"
    logfile = workdir / "socks5.log"
    # The log goes to the file: watch it (inotify), no polling.
    written: defer.Deferred[None] = defer.Deferred()
    notifier = inotify.INotify()
    notifier.startReading()

    def changed(_: Any, path: Any, mask: int) -> None:
        if (
            not written.called
            and logfile.exists()
            and b"listening on" in logfile.read_bytes()
        ):
            written.callback(None)

    notifier.watch(
        FilePath(str(workdir)),
        mask=inotify.IN_MODIFY | inotify.IN_CREATE,
        callbacks=[changed],
    )
    process = Twistd.start(
        workdir,
        twistd=(
            f"--pidfile={pidfile}",
            f"--logfile={logfile}",
            "--uid=65534",
            "--gid=65534",
        ),
    )
    process.listening.addErrback(lambda _: None)  # it logs to the file instead
    try:
        await written.addTimeout(30, reactor)
        assert b"listening on 127.0.0.1:" in logfile.read_bytes()
        pid = int(pidfile.read_text())
        assert pid == process.transport.pid
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == ["65534"] * 4
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        assert await process.ended == 0
        notifier.stopReading()
        notifier.loseConnection()
    # (The pidfile stays: the unprivileged process may not delete a file that
    # root created in root's directory; give it a directory of its own.)
    shutil.rmtree(workdir)
