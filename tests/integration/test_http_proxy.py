"""
The HTTP proxy (``--protocols socks5,http``) with real clients on loopback:
curl (plain and CONNECT, with and without -U), OpenBSD nc -X connect, git
over a dumb-HTTP repository, pip from a local index, and a headless Chromium through
``--proxy-server=http://`` and ``socks5://``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
import pytest_twisted
from conftest import BLOB, HAS_IPV6, LOOPBACKS, listen
from test_twistd import TWISTD, Twistd
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, reactor, threads, utils
from twisted.web import resource, server, static

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.splice import splice_available

CURL = shutil.which("curl")
# OpenBSD netcat (its -X/-x proxy options): nc.openbsd where ncat owns "nc".
NC = shutil.which("nc.openbsd") or shutil.which("nc")
GIT = shutil.which("git")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")
HTTP = ("socks5", "http")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _clean_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def curl(*args: str) -> Any:
    return utils.getProcessOutputAndValue(
        CURL, ["-sS", "--max-time", "20", *args], env=_clean_env()
    )


def run(args: List[str], data: bytes = b"", cwd: Any = None) -> Any:
    """A blocking client in a thread, while the reactor serves it."""
    return threads.deferToThread(
        subprocess.run,
        args,
        input=data,
        capture_output=True,
        timeout=60,
        env=_clean_env(),
        cwd=cwd,
    )


def userpass(**users: str) -> UsernamePasswordAuthenticator:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {k.encode(): v.encode() for k, v in users.items()}
    return UsernamePasswordAuthenticator.from_checkers(checker)


class _Seen(resource.Resource):
    """Answers what it was sent: the Via field and the sha256 of the body."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: List[Any] = []

    def render(self, request: Any) -> bytes:
        self.requests.append(request)
        body = request.content.read()
        request.setHeader(b"content-type", b"text/plain")
        via = request.getHeader(b"via") or b"-"
        leaked = request.getHeader(b"proxy-authorization") or b"-"
        return b"via=%s auth=%s sha=%s\n" % (
            via,
            leaked,
            hashlib.sha256(body).hexdigest().encode(),
        )


@pytest.fixture
def origin() -> Iterator[Any]:
    """An HTTP server on every loopback: /blob, /seen, /page."""
    root = resource.Resource()
    seen = _Seen()
    root.putChild(b"blob", static.Data(BLOB, "application/octet-stream"))
    root.putChild(b"seen", seen)
    root.putChild(
        b"page",
        static.Data(
            b"<html><body><p id=x>hello through the proxy</p></body></html>",
            "text/html",
        ),
    )
    site = server.Site(root)
    site.noisy = False
    ports = {}
    for host in ("127.0.0.1", "::1") if HAS_IPV6 else ("127.0.0.1",):
        ports[host] = listen(site, host)

    class Origin:
        port = {h: p.getHost().port for h, p in ports.items()}
        requests = seen.requests

    yield Origin
    for p in ports.values():
        pytest_twisted.blockon(defer.maybeDeferred(p.stopListening))


# ----------------------------------------------------------------------
# curl


@needs_curl
@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest.mark.parametrize("target_host", LOOPBACKS)
@pytest.mark.parametrize("tunnel", [False, True], ids=["forward", "connect"])
@pytest_twisted.ensureDeferred
async def test_curl_http_proxy(
    make_proxy: Any, origin: Any, proxy_host: str, target_host: str, tunnel: bool
) -> None:
    _, port = make_proxy(proxy_host, protocols=HTTP)
    url = f"http://{_url_host(target_host)}:{origin.port[target_host]}/blob"
    proxy = f"http://{_url_host(proxy_host)}:{port}"
    extra = ["-p"] if tunnel else []
    out, err, code = await curl(*extra, "-x", proxy, url)
    assert code == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(BLOB).digest()


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_names_keep_alive_and_bodies(make_proxy: Any, origin: Any) -> None:
    factory, port = make_proxy(protocols=HTTP)
    base = f"http://localhost:{origin.port['127.0.0.1']}/seen"
    proxy = f"http://127.0.0.1:{port}"
    # Two requests, two hosts, one client connection.
    out, err, code = await curl(
        "-v", "-x", proxy, base, f"http://web.test:{origin.port['127.0.0.1']}/seen"
    )
    assert code == 0, err
    assert out.count(b"via=1.1 twisted-socks5") == 2
    assert b"Re-using existing connection" in err
    # A body with Content-Length, and a chunked one.
    body = os.urandom(300_000)
    digest = hashlib.sha256(body).hexdigest().encode()
    for extra in ([], ["-H", "Transfer-Encoding: chunked"]):
        out, err, code = await _curl_with_stdin(proxy, base, body, extra)
        assert code == 0, err
        assert b"sha=" + digest in out


async def _curl_with_stdin(proxy: str, url: str, body: bytes, extra: List[str]) -> Any:
    result = await run(
        [
            CURL or "curl",
            "-sS",
            "--max-time",
            "20",
            "-x",
            proxy,
            "--data-binary",
            "@-",
            *extra,
            url,
        ],
        body,
    )
    return result.stdout, result.stderr, result.returncode


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_proxy_authentication(make_proxy: Any, origin: Any) -> None:
    factory, port = make_proxy(
        protocols=HTTP, authenticators=[userpass(alice="s3cret")]
    )
    url = f"http://127.0.0.1:{origin.port['127.0.0.1']}/seen"
    proxy = f"http://127.0.0.1:{port}"
    status = ["-o", "/dev/null", "-w", "%{http_code}"]
    out, err, code = await curl(*status, "-x", proxy, url)
    assert (code, out) == (0, b"407")
    out, err, code = await curl(*status, "-x", proxy, "-U", "alice:nope", url)
    assert (code, out) == (0, b"407")
    out, err, code = await curl("-x", proxy, "-U", "alice:s3cret", url)
    assert code == 0, err
    assert out.startswith(b"via=1.1 twisted-socks5 auth=- ")  # never passed on
    # CONNECT: refused without credentials (curl: 56), tunnelled with them.
    out, err, code = await curl("-p", "-x", proxy, url)
    assert code == 56 and b"407" in err
    out, err, code = await curl("-p", "-x", proxy, "-U", "alice:s3cret", url)
    assert code == 0, err
    assert out.startswith(b"via=- auth=- ")  # a tunnel: the proxy adds nothing
    # --proxy-anyauth: asked first without credentials, 407, then again with
    # them (on the same connection for a request, on a new one after CONNECT).
    for extra in ([], ["-p"]):
        out, err, code = await curl(
            *extra, "-v", "--proxy-anyauth", "-x", proxy, "-U", "alice:s3cret", url
        )
        assert code == 0, err
        assert b"407" in err
        assert out.startswith(b"via=")


@needs_curl
@pytest_twisted.ensureDeferred
async def test_curl_refusals(make_proxy: Any) -> None:
    from conftest import closed_port

    from twisted_socks5.rules import RuleSet

    _, port = make_proxy(
        protocols=HTTP, policy=RuleSet.parse("deny to 127.0.0.2\nallow")
    )
    proxy = f"http://127.0.0.1:{port}"
    status = ["-o", "/dev/null", "-w", "%{http_code}"]
    out, _, _ = await curl(*status, "-x", proxy, f"http://127.0.0.1:{closed_port()}/")
    assert out == b"502"
    out, _, _ = await curl(*status, "-x", proxy, "http://127.0.0.2/")
    assert out == b"403"
    out, _, _ = await curl(*status, "-x", proxy, "http://nowhere.invalid/")
    assert out == b"502"
    _, err, code = await curl("-p", "-x", proxy, "http://127.0.0.2/")
    assert code == 56 and b"403" in err


# ----------------------------------------------------------------------
# nc, git


@pytest.mark.skipif(
    NC is None, reason="OpenBSD netcat (nc.openbsd or nc) is not installed"
)
@pytest_twisted.ensureDeferred
async def test_nc_connect(make_proxy: Any, origin: Any) -> None:
    _, port = make_proxy(protocols=HTTP)
    result = await run(
        [
            NC or "nc",
            "-N",
            "-X",
            "connect",
            "-x",
            f"127.0.0.1:{port}",
            "127.0.0.1",
            str(origin.port["127.0.0.1"]),
        ],
        b"GET /seen HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"HTTP/1.0 200 ")
    assert b"via=- " in result.stdout


@pytest.mark.skipif(GIT is None, reason="git is not installed")
@pytest_twisted.ensureDeferred
async def test_git_clone_over_the_http_proxy(make_proxy: Any, tmp_path: Path) -> None:
    git = GIT or "git"
    repo = tmp_path / "repo"
    repo.mkdir()
    ident = ["-c", "user.name=t", "-c", "user.email=t@t.test"]
    for args in (
        ["init", "-q"],
        ["checkout", "-q", "-b", "main"],
    ):
        assert (await run([git, *args], cwd=repo)).returncode == 0
    (repo / "README").write_text("cloned through the HTTP proxy\n")
    for args in (["add", "README"], [*ident, "commit", "-q", "-m", "one"]):
        done = await run([git, *args], cwd=repo)
        assert done.returncode == 0, done.stderr
    bare = tmp_path / "served" / "repo.git"
    done = await run([git, "clone", "-q", "--bare", str(repo), str(bare)])
    assert done.returncode == 0, done.stderr
    assert (await run([git, "update-server-info"], cwd=bare)).returncode == 0
    site = server.Site(static.File(str(tmp_path / "served")))
    site.noisy = False
    web = listen(site)
    try:
        _, port = make_proxy(protocols=HTTP)
        url = f"http://web.test:{web.getHost().port}/repo.git"
        done = await run(
            [
                git,
                "-c",
                f"http.proxy=http://127.0.0.1:{port}",
                "clone",
                "-q",
                url,
                str(tmp_path / "clone"),
            ]
        )
        assert done.returncode == 0, done.stderr
        text = (tmp_path / "clone" / "README").read_text()
        assert text == "cloned through the HTTP proxy\n"
    finally:
        await defer.maybeDeferred(web.stopListening)


# ----------------------------------------------------------------------
# Chromium


@pytest.mark.skipif(
    CHROMIUM is None, reason="no chromium binary (apt-get install chromium)"
)
@pytest.mark.parametrize("scheme", ["http", "socks5"])
@pytest_twisted.ensureDeferred
async def test_chromium_loads_a_page(
    make_proxy: Any, origin: Any, tmp_path: Path, scheme: str
) -> None:
    factory, port = make_proxy(protocols=HTTP)
    seen: List[Any] = []
    opened = factory.connection_opened

    def count(protocol: Any) -> None:
        seen.append(protocol)
        opened(protocol)

    factory.connection_opened = count  # type: ignore[method-assign]
    # A name, so that Chromium's SOCKS5 asks the proxy to resolve it (and
    # the tests' loopback resolver does); <-loopback> sends it to the proxy.
    page = f"http://localhost:{origin.port['127.0.0.1']}/page"
    done = await run(
        [
            CHROMIUM or "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--proxy-server={scheme}://127.0.0.1:{port}",
            "--proxy-bypass-list=<-loopback>",
            "--dump-dom",
            page,
        ]
    )
    assert b"hello through the proxy" in done.stdout, done.stderr[-2000:]
    assert seen, "the page did not come through the proxy"
    # (Chromium may also open a spare connection it never speaks on.)
    assert scheme in {p.protocol for p in seen}
    assert {p.protocol for p in seen} <= {scheme, "socks5"}
    target = origin.port["127.0.0.1"]
    assert any(
        p.protocol == scheme
        and p.request is not None
        and p.request.address.port == target
        for p in seen
    )


@needs_curl
@pytest.mark.skipif(not splice_available(), reason="os.splice needs Linux")
@pytest_twisted.ensureDeferred
async def test_connect_tunnel_takes_the_splice_path(
    make_proxy: Any, origin: Any
) -> None:
    """An HTTP CONNECT tunnel is a Tunnel like a SOCKS5 one: spliced when long."""
    factory, port = make_proxy(protocols=HTTP, splice=True)
    seen: List[Any] = []
    opened = factory.connection_opened

    def count(protocol: Any) -> None:
        seen.append(protocol)
        opened(protocol)

    factory.connection_opened = count  # type: ignore[method-assign]
    url = f"http://127.0.0.1:{origin.port['127.0.0.1']}/blob"
    out, err, code = await curl("-p", "-x", f"http://127.0.0.1:{port}", url)
    assert code == 0, err
    assert hashlib.sha256(out).digest() == hashlib.sha256(BLOB).digest()
    (connection,) = seen
    assert connection.protocol == "http"
    assert connection.tunnel is not None and connection.tunnel.splice is not None
    assert connection.counters.bytes_down > len(BLOB)


def _wheel(directory: Path) -> Path:
    """A one-module wheel, written by hand (no build backend needed)."""
    name, version = "hello_proxy", "1.0"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": b"GREETING = 'installed through the HTTP proxy'\n",
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: hello-proxy\nVersion: 1.0\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(data)}")
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


@pytest_twisted.ensureDeferred
async def test_pip_installs_from_a_local_index(make_proxy: Any, tmp_path: Path) -> None:
    served = tmp_path / "served"
    (served / "simple" / "hello-proxy").mkdir(parents=True)
    (served / "files").mkdir()
    wheel = _wheel(served / "files")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (served / "simple" / "hello-proxy" / "index.html").write_text(
        f'<html><body><a href="../../files/{wheel.name}#sha256={digest}">'
        f"{wheel.name}</a></body></html>\n"
    )
    site = server.Site(static.File(str(served)))
    site.noisy = False
    web = listen(site)
    try:
        factory, port = make_proxy(protocols=HTTP)
        seen: List[Any] = []
        opened = factory.connection_opened

        def count(protocol: Any) -> None:
            seen.append(protocol)
            opened(protocol)

        factory.connection_opened = count  # type: ignore[method-assign]
        index = f"http://localhost:{web.getHost().port}/simple"
        done = await run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-cache-dir",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(tmp_path / "target"),
                "--index-url",
                index,
                "--proxy",
                f"http://127.0.0.1:{port}",
                "hello-proxy",
            ]
        )
        assert done.returncode == 0, done.stderr
        module = tmp_path / "target" / "hello_proxy" / "__init__.py"
        assert "installed through the HTTP proxy" in module.read_text()
        assert any(p.protocol == "http" for p in seen)
    finally:
        await defer.maybeDeferred(web.stopListening)


# ----------------------------------------------------------------------
# twistd socks5 --protocols socks5,http


@needs_curl
@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd next to python")
@pytest_twisted.ensureDeferred
async def test_twistd_serves_http_when_told(origin: Any, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{origin.port['127.0.0.1']}/seen"
    process = Twistd.start(
        tmp_path, "--protocols", "socks5,http", "--auth", "memory:alice:s3cret"
    )
    try:
        port = await process.listening.addTimeout(30, reactor)
        proxy = f"http://127.0.0.1:{port}"
        out, err, code = await curl("-x", proxy, "-U", "alice:s3cret", url)
        assert code == 0, err
        assert out.startswith(b"via=1.1 twisted-socks5 auth=- ")
        out, err, code = await curl("-p", "-x", proxy, url)
        assert code == 56 and b"407" in err
        await process.wait_for(b"alice GET http://127.0.0.1").addTimeout(30, reactor)
        await process.wait_for(b"over http").addTimeout(30, reactor)
    finally:
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
