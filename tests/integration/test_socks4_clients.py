"""
SOCKS4 and SOCKS4a beside SOCKS5 on one port, with real clients on
loopback: curl, OpenBSD netcat, PySocks, and hand-written ones for BIND and
bad input.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
from typing import Any, List, Tuple

import pytest
import pytest_twisted
import socks
from conftest import all_closed
from test_clients import _read_all, curl, needs_curl, userpass
from test_twistd import TWISTD, Twistd
from twisted.internet import reactor, threads

from twisted_socks5.auth import NoAuthAuthenticator
from twisted_socks5.rules import RuleSet

BOTH = ("socks5", "socks4")
GET = b"GET / HTTP/1.0\r\nHost: x\r\n\r\n"
HELLO = b"hello through socks\n"
# OpenBSD netcat (its -X/-x proxy options): nc.openbsd where ncat owns "nc".
NC = shutil.which("nc.openbsd") or shutil.which("nc")


def _openbsd_netcat() -> bool:
    if NC is None:
        return False
    usage = subprocess.run([NC, "-h"], capture_output=True, timeout=10)
    text = usage.stdout + usage.stderr
    return b"OpenBSD" in text and b"-X proxy_protocol" in text


needs_nc = pytest.mark.skipif(
    not _openbsd_netcat(), reason="OpenBSD netcat (nc -X 4 -x) is not installed"
)


def socks4_request(command: int, ip: str, port: int, userid: bytes = b"") -> bytes:
    return struct.pack("!BBH", 4, command, port) + socket.inet_aton(ip) + userid + b"\0"


def _exchange(proxy_port: int, data: bytes) -> bytes:
    """Send ``data`` at once, read until the proxy closes."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as s:
        s.sendall(data)
        return _read_all(s)


# --------------------------------------------------------------------------
# curl


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_socks4_and_socks4a(make_proxy: Any, http_target: Any) -> None:
    factory, port = make_proxy(protocols=BOTH)
    target = http_target["127.0.0.1"]
    out, err, code = await curl(
        "-x", f"socks4://127.0.0.1:{port}", f"http://127.0.0.1:{target}/"
    )
    assert (code, out) == (0, HELLO), err
    # 4a: the name goes to the proxy, which resolves it (on loopback).
    out, err, code = await curl(
        "-x", f"socks4a://127.0.0.1:{port}", f"http://web.test:{target}/"
    )
    assert (code, out) == (0, HELLO), err
    # SOCKS5 still on the same port.
    out, err, code = await curl(
        "-x", f"socks5h://127.0.0.1:{port}", f"http://web.test:{target}/"
    )
    assert (code, out) == (0, HELLO), err
    await all_closed(factory)


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_socks4_refused_when_a_password_is_required(
    make_proxy: Any, http_target: Any
) -> None:
    _, port = make_proxy(protocols=BOTH, authenticators=[userpass(alice="pw")])
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    out, err, code = await curl("-x", f"socks4://127.0.0.1:{port}", url)
    assert code == 97 and out == b"", err  # CURLE_PROXY
    # The explicit rule lets SOCKS4 clients of 127.0.0.0/8 in.
    rules = RuleSet.parse("allow from 127.0.0.0/8 protocol socks4\n")
    _, port = make_proxy(
        protocols=BOTH, authenticators=[userpass(alice="pw")], policy=rules
    )
    out, err, code = await curl("-x", f"socks4://127.0.0.1:{port}", url)
    assert (code, out) == (0, HELLO), err


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_socks4_refused_when_not_enabled(
    make_proxy: Any, http_target: Any
) -> None:
    _, port = make_proxy()
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    out, err, code = await curl("-x", f"socks4://127.0.0.1:{port}", url)
    assert code == 97 and out == b"", err


# --------------------------------------------------------------------------
# OpenBSD netcat


@needs_nc
@pytest.mark.parametrize("version", ["4", "5"])
@pytest_twisted.ensureDeferred
async def test_netcat_socks4_and_socks5_on_one_port(
    make_proxy: Any, http_target: Any, version: str
) -> None:
    # netcat-openbsd checks the reply's address type strictly (sing-box#356).
    _, port = make_proxy(protocols=BOTH)
    argv = [
        str(NC),
        "-N",
        "-w",
        "20",
        "-X",
        version,
        "-x",
        f"127.0.0.1:{port}",
        "127.0.0.1",
        str(http_target["127.0.0.1"]),
    ]
    done = await threads.deferToThread(
        subprocess.run, argv, input=GET, capture_output=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\r\n\r\n" + HELLO)


# --------------------------------------------------------------------------
# PySocks: SOCKS4 with a USERID, and 4a


def _pysocks_get(proxy_port: int, host: str, port: int, rdns: bool) -> bytes:
    s = socks.socksocket()
    s.settimeout(20)
    s.set_proxy(socks.SOCKS4, "127.0.0.1", proxy_port, rdns=rdns, username="me")
    try:
        s.connect((host, port))
        s.sendall(GET)
        return _read_all(s)
    finally:
        s.close()


@pytest.mark.parametrize("host, rdns", [("127.0.0.1", False), ("web.test", True)])
@pytest_twisted.ensureDeferred
async def test_pysocks_socks4(
    make_proxy: Any, http_target: Any, host: str, rdns: bool, events: Any
) -> None:
    factory, port = make_proxy(protocols=BOTH)
    body = await threads.deferToThread(
        _pysocks_get, port, host, http_target["127.0.0.1"], rdns
    )
    assert body.endswith(HELLO)
    await all_closed(factory)
    (event,) = [e for e in events if e.get("event") == "socks5.connection"]
    assert (event["protocol"], event["userid"], event["user"]) == ("socks4", "me", None)


# --------------------------------------------------------------------------
# BIND, by hand


def _bind(proxy_port: int) -> Tuple[bytes, bytes, bytes, bytes]:
    """BIND, a peer connects, a byte each way; the two replies and the bytes."""
    with socket.create_connection(("127.0.0.1", proxy_port), timeout=20) as control:
        control.sendall(socks4_request(2, "127.0.0.1", 0, b"binder"))
        first = _recv(control, 8)
        (port,) = struct.unpack("!H", first[2:4])
        with socket.create_connection((socket.inet_ntoa(first[4:]), port)) as peer:
            second = _recv(control, 8)
            peer.sendall(b"from the peer")
            control.sendall(b"from the client")
            down = _recv(control, len(b"from the peer"))
            up = _recv(peer, len(b"from the client"))
    return first, second, down, up


def _recv(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_bind_by_hand(make_proxy: Any) -> None:
    factory, port = make_proxy(protocols=BOTH)
    first, second, down, up = await threads.deferToThread(_bind, port)
    assert first[:2] == b"\x00\x5a" and first[4:] == socket.inet_aton("127.0.0.1")
    assert second[:2] == b"\x00\x5a" and second[4:] == socket.inet_aton("127.0.0.1")
    assert (down, up) == (b"from the peer", b"from the client")
    await all_closed(factory)


# --------------------------------------------------------------------------
# Bad input and pipelining, on a real socket


@pytest.mark.parametrize(
    "first", [b"\x16\x03\x01\x00\x05hello", b"\x00", b"\xff" * 10, b"GET / HTTP/1.0"]
)
@pytest_twisted.ensureDeferred
async def test_a_garbage_first_byte_is_closed_unanswered(
    make_proxy: Any, first: bytes
) -> None:
    factory, port = make_proxy(protocols=BOTH)
    assert await threads.deferToThread(_exchange, port, first) == b""
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_a_request_without_its_nul_is_refused_at_the_bound(
    make_proxy: Any,
) -> None:
    factory, port = make_proxy(protocols=BOTH)
    head = socks4_request(1, "127.0.0.1", 80)[:-1]
    answer = await threads.deferToThread(_exchange, port, head + b"u" * 300)
    assert answer == b"\x00\x5b" + bytes(6)
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_pipelined_request_and_payload(make_proxy: Any, http_target: Any) -> None:
    factory, port = make_proxy(protocols=BOTH)
    request = socks4_request(1, "127.0.0.1", http_target["127.0.0.1"], b"me")
    answer: bytes = await threads.deferToThread(_exchange, port, request + GET)
    assert answer[:2] == b"\x00\x5a"
    assert answer[8:].startswith(b"HTTP/1.0 200") and answer.endswith(HELLO)
    await all_closed(factory)


@pytest_twisted.ensureDeferred
async def test_socks5_and_socks4_on_one_port_at_once(
    make_proxy: Any, http_target: Any
) -> None:
    factory, port = make_proxy(protocols=BOTH, authenticators=[NoAuthAuthenticator()])
    target = http_target["127.0.0.1"]
    five = b"\x05\x01\x00\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
    five += struct.pack("!H", target)
    four = socks4_request(1, "127.0.0.1", target)
    answers: List[bytes] = await threads.deferToThread(
        lambda: [_exchange(port, five + GET), _exchange(port, four + GET)]
    )
    assert answers[0][:2] == b"\x05\x00" and answers[0].endswith(HELLO)
    assert answers[1][:2] == b"\x00\x5a" and answers[1].endswith(HELLO)
    await all_closed(factory)


# --------------------------------------------------------------------------
# twistd socks5 --protocols


@needs_curl
@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd next to python")
@pytest_twisted.ensureDeferred
async def test_twistd_serves_socks4_when_told(http_target: Any, tmp_path: Any) -> None:
    url = f"http://127.0.0.1:{http_target['127.0.0.1']}/"
    process = Twistd.start(tmp_path, "--protocols", "socks5,socks4")
    try:
        port = await process.listening.addTimeout(30, reactor)
        out, err, code = await curl("-x", f"socks4://127.0.0.1:{port}", url)
        assert (code, out) == (0, HELLO), err
        await process.wait_for(b"over socks4").addTimeout(30, reactor)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
