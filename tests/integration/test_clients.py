"""Real clients through the real server on 127.0.0.1 and ::1."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from typing import Any, List

import pytest
import pytest_twisted
import python_socks.sync
import socks
from conftest import LOOPBACKS, HashSink, Source
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import threads, utils

from twisted_socks5.auth import NoAuthAuthenticator, UsernamePasswordAuthenticator
from twisted_socks5.testing import pattern_sha256

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def userpass(**users: str) -> UsernamePasswordAuthenticator:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {k.encode(): v.encode() for k, v in users.items()}
    return UsernamePasswordAuthenticator.from_checkers(checker)


def curl(*args: str) -> Any:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return utils.getProcessOutputAndValue(
        CURL, ["-sS", "--max-time", "20", *args], env=env
    )


# --------------------------------------------------------------------------
# curl


@needs_curl
@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest.mark.parametrize("target_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_curl_socks5_ip_targets(
    make_proxy: Any, http_target: Any, blob: bytes, proxy_host: str, target_host: str
) -> None:
    _, port = make_proxy(proxy_host)
    url = f"http://{_url_host(target_host)}:{http_target[target_host]}/blob"
    out, err, code = await curl("--socks5", f"{_url_host(proxy_host)}:{port}", url)
    assert code == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(blob).digest()


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_socks5_hostname_resolves_at_the_proxy(
    make_proxy: Any, http_target: Any, resolver: Any
) -> None:
    _, port = make_proxy()
    url = f"http://web.test:{http_target['127.0.0.1']}/"
    out, err, code = await curl("--socks5-hostname", f"127.0.0.1:{port}", url)
    assert code == 0, err
    assert out == b"hello through socks\n"
    assert resolver.asked == ["web.test"]


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_with_username_password(make_proxy: Any, http_target: Any) -> None:
    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    url = f"http://localhost:{http_target['127.0.0.1']}/"
    proxy = f"127.0.0.1:{port}"
    out, err, code = await curl("--socks5-hostname", proxy, "-U", "alice:s3cret", url)
    assert code == 0, err
    assert out == b"hello through socks\n"
    out, err, code = await curl("--socks5-hostname", proxy, "-U", "alice:nope", url)
    assert code == 97  # CURLE_PROXY: the proxy handshake failed
    out, err, code = await curl("--socks5-hostname", proxy, url)
    assert code == 97  # no password offered: 05 FF


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_refused_and_unresolvable(make_proxy: Any) -> None:
    from conftest import closed_port

    _, port = make_proxy()
    proxy = f"127.0.0.1:{port}"
    _, err, code = await curl("--socks5", proxy, f"http://127.0.0.1:{closed_port()}/")
    assert code == 97
    assert b"(5)" in err  # REP 0x05 connection refused
    _, err, code = await curl("--socks5-hostname", proxy, "http://nowhere.invalid/")
    assert code == 97
    assert b"(4)" in err  # REP 0x04 host unreachable


# --------------------------------------------------------------------------
# PySocks and python-socks (blocking clients, run in threads)


def _pysocks_get(proxy_port: int, host: str, port: int, **auth: Any) -> bytes:
    s = socks.socksocket()
    s.settimeout(20)
    s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy_port, rdns=True, **auth)
    try:
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return _read_all(s)
    finally:
        s.close()


def _read_all(s: socket.socket) -> bytes:
    chunks: List[bytes] = []
    while True:
        chunk = s.recv(65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.ensureDeferred
async def test_pysocks(make_proxy: Any, http_target: Any, host: str) -> None:
    _, port = make_proxy(authenticators=[userpass(bob="pw"), NoAuthAuthenticator()])
    body = await threads.deferToThread(
        _pysocks_get,
        port,
        host,
        http_target["127.0.0.1"],
        username="bob",
        password="pw",
    )
    assert body.endswith(b"\r\n\r\nhello through socks\n")
    body = await threads.deferToThread(
        _pysocks_get, port, host, http_target["127.0.0.1"]
    )
    assert body.endswith(b"hello through socks\n")


def _python_socks_get(url: str, host: str, port: int) -> bytes:
    proxy = python_socks.sync.Proxy.from_url(url, rdns=True)
    s = proxy.connect(dest_host=host, dest_port=port, timeout=20)
    try:
        s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        return _read_all(s)
    finally:
        s.close()


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_python_socks(make_proxy: Any, http_target: Any, proxy_host: str) -> None:
    _, port = make_proxy(proxy_host, authenticators=[userpass(carol="pa:ss")])
    url = f"socks5://carol:pa%3Ass@{_url_host(proxy_host)}:{port}"
    body = await threads.deferToThread(
        _python_socks_get, url, "localhost", http_target["127.0.0.1"]
    )
    assert body.endswith(b"hello through socks\n")
    bad = f"socks5://carol:wrong@{_url_host(proxy_host)}:{port}"
    with pytest.raises(python_socks.ProxyError):
        await threads.deferToThread(
            _python_socks_get, bad, "localhost", http_target["127.0.0.1"]
        )


# --------------------------------------------------------------------------
# Data integrity, 16 MiB each way


SIXTEEN_MIB = 16 << 20


def _upload(url: str, port: int, size: int) -> bytes:
    """Send ``size`` pattern bytes, half-close, return the sink's digest."""
    from conftest import pattern_chunk

    proxy = python_socks.sync.Proxy.from_url(url)
    s = proxy.connect(dest_host="127.0.0.1", dest_port=port, timeout=60)
    try:
        i = 0
        left = size
        while left > 0:
            chunk = pattern_chunk(i)[:left]
            s.sendall(chunk)
            left -= len(chunk)
            i += 1
        s.shutdown(socket.SHUT_WR)
        return _read_all(s)
    finally:
        s.close()


def _download(url: str, port: int, size: int) -> str:
    proxy = python_socks.sync.Proxy.from_url(url)
    s = proxy.connect(dest_host="127.0.0.1", dest_port=port, timeout=60)
    try:
        s.sendall(b"%d\n" % size)
        h = hashlib.sha256()
        total = 0
        while True:
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
            h.update(chunk)
        assert total == size
        return h.hexdigest()
    finally:
        s.close()


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_sixteen_mib_each_way_sha256(
    make_proxy: Any, tcp_target: Any, proxy_host: str
) -> None:
    factory, port = make_proxy(proxy_host)
    url = f"socks5://{_url_host(proxy_host)}:{port}"
    sink = tcp_target(HashSink)
    source = tcp_target(Source)
    expected = pattern_sha256(SIXTEEN_MIB)
    # The upload also proves half-close: the sink answers only after our EOF.
    digest = await threads.deferToThread(_upload, url, sink, SIXTEEN_MIB)
    assert digest.decode() == expected
    assert await threads.deferToThread(_download, url, source, SIXTEEN_MIB) == expected
