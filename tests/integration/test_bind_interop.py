"""
BIND with a real BIND user: an active-mode FTP download through the proxy.

The client is tnftp wrapped by Dante's ``socksify`` (LD_PRELOAD): when tnftp
binds and listens for the FTP data connection (``-A``, active mode), Dante
turns that into a SOCKS5 BIND on our server and passes the proxy's address
on in ``EPRT``.  The FTP server (pyftpdlib, in a thread) then connects to the
proxy's BIND port, and the file reaches tnftp only through our relay.

Everything stays on 127.0.0.1: the FTP server and the proxy listen there, the
URL is numeric and Dante's ``resolveprotocol: fake`` keeps its resolver from
asking any DNS server.  Dante's client cannot use an IPv6 proxy (its config
parser refuses an IPv6 ``via:`` address), so there is no ``::1`` variant.

Needs ``socksify`` and ``tnftp`` (Debian: ``dante-client``, ``tnftp``) and
``pyftpdlib``; skipped without them.

Why tnftp and not curl: curl's active mode gives up (``CURLE_WEIRD_SERVER_REPLY``)
when the control connection's ``226`` arrives before its listening socket is
readable.  Through any SOCKS BIND that socket only becomes readable when the
proxy's second reply lands, which races the FTP server's ``226`` (pyftpdlib
finishes a 1 MiB ``sendfile`` into loopback buffers in about a millisecond),
so curl fails more often than not.  tnftp sends RETR, reads the 1xx reply and
then blocks in accept(), which Dante completes with the second reply.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Tuple

import pytest
import pytest_twisted
from twisted.internet import defer, reactor, utils
from twisted.logger import globalLogPublisher

with warnings.catch_warnings():
    # pyftpdlib still imports asyncore/asynchat on Python < 3.12.
    warnings.simplefilter("ignore", DeprecationWarning)
    pytest.importorskip("pyftpdlib")
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.ioloop import IOLoop
    from pyftpdlib.servers import FTPServer

SOCKSIFY = shutil.which("socksify")
TNFTP = shutil.which("tnftp")

pytestmark = [
    pytest.mark.skipif(SOCKSIFY is None, reason="socksify (dante-client) missing"),
    pytest.mark.skipif(TNFTP is None, reason="tnftp missing"),
]

#: Dante client configuration: every BIND and CONNECT goes to our proxy.
#: Dante adds direct routes of its own for the proxy itself and, unless
#: SOCKS_AUTOADD_LANROUTES=no, for CONNECTs to local networks (127.0.0.0/8
#: included); BIND is never in those, so it always comes to us.
SOCKS_CONF = """\
resolveprotocol: fake
route {{
    from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {port}
    command: bind connect
    protocol: tcp
    proxyprotocol: socks_v5
    method: none
}}
"""

SIZE = 1 << 20


class ThreadedFTPServer:
    """pyftpdlib on 127.0.0.1 (any free port), anonymous read-only on ``root``."""

    def __init__(self, root: Path) -> None:
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(root))
        handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
        self.server = FTPServer(("127.0.0.1", 0), handler, ioloop=IOLoop())
        self.port: int = self.server.socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.server.serve_forever(
                    timeout=0.05, blocking=False, handle_exit=False
                )
        finally:
            self.server.close_all()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.fixture
def ftp_server(tmp_path: Path) -> Iterator[Tuple[ThreadedFTPServer, str]]:
    root = tmp_path / "ftp"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "blob.bin").write_bytes(data)
    server = ThreadedFTPServer(root)
    yield server, hashlib.sha256(data).hexdigest()
    server.stop()


@pytest.fixture
def connection_log() -> Iterator[Callable[[Callable[[Dict[str, Any]], bool]], Any]]:
    """
    Collects the proxy's ``socks5.connection`` events; ``wait(match)`` fires
    with the list of them once one satisfies ``match``.
    """
    events: List[Dict[str, Any]] = []
    waiters: List[Tuple[Callable[[Dict[str, Any]], bool], defer.Deferred[Any]]] = []

    def observer(event: Dict[str, Any]) -> None:
        if event.get("event") != "socks5.connection":
            return
        events.append(event)
        for match, d in list(waiters):
            if match(event):
                waiters.remove((match, d))
                d.callback(events)

    def wait(match: Callable[[Dict[str, Any]], bool]) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        if any(match(e) for e in events):
            d.callback(events)
        else:
            waiters.append((match, d))
        return d.addTimeout(10, reactor)

    globalLogPublisher.addObserver(observer)
    yield wait
    globalLogPublisher.removeObserver(observer)


def _is_bind(event: Dict[str, Any]) -> bool:
    return event.get("command") == "bind"


@pytest.mark.parametrize(
    "control", ["direct", "via-proxy"], ids=["control-direct", "control-connect"]
)
@pytest_twisted.ensureDeferred
async def test_active_ftp_download_through_bind(
    make_proxy: Any,
    ftp_server: Tuple[ThreadedFTPServer, str],
    connection_log: Any,
    tmp_path: Path,
    control: str,
) -> None:
    server, expected_sha256 = ftp_server
    _, port = make_proxy("127.0.0.1", bind_timeout=20)
    conf = tmp_path / "socks.conf"
    conf.write_text(SOCKS_CONF.format(port=port))
    out = tmp_path / "downloaded.bin"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "SOCKS_CONF": str(conf),
        "SOCKS_LOGOUTPUT": "stderr",
    }
    if control == "via-proxy":
        # No automatic direct route for 127.0.0.0/8: the FTP control
        # connection is a CONNECT through the proxy too.
        env["SOCKS_AUTOADD_LANROUTES"] = "no"

    stdout, stderr, code = await utils.getProcessOutputAndValue(
        SOCKSIFY,
        [
            TNFTP,
            "-A",  # active mode: the data connection comes to us (BIND)
            "-V",
            "-q",
            "20",  # give up on a stalled transfer after 20 s
            "-o",
            str(out),
            f"ftp://anonymous:test@127.0.0.1:{server.port}/blob.bin",
        ],
        env=env,
        path=str(tmp_path),
    )
    details = (stdout + stderr).decode(errors="replace")
    assert code == 0, details
    data = out.read_bytes()
    assert len(data) == SIZE, details
    assert hashlib.sha256(data).hexdigest() == expected_sha256

    events = await connection_log(_is_bind)
    binds = [e for e in events if _is_bind(e)]
    assert len(binds) == 1, binds
    bind = binds[0]
    assert bind["reply"] == 0  # both replies: succeeded
    assert bind["outcome"] == "closed"
    assert bind["bytes_down"] == SIZE
    assert bind["bytes_up"] == 0
    assert bind["bound"].startswith("127.0.0.1:")
    assert bind["peer"].startswith("127.0.0.1:")  # pyftpdlib's data socket
    if control == "via-proxy":
        # Dante then names the FTP server as the expected peer.
        assert bind["target"] == "127.0.0.1:0"
        connects = await connection_log(lambda e: e.get("command") == "connect")
        [connect] = [e for e in connects if e.get("command") == "connect"]
        assert connect["target"] == f"127.0.0.1:{server.port}"
        assert connect["reply"] == 0
    else:
        # Dante sends the address it was asked to bind: "any".
        assert bind["target"] == "0.0.0.0:0"
