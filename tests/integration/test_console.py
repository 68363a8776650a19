"""
The live console's HTTP face, served on 127.0.0.1 and asked with treq, over
real tunnels through the real server: every API route, authentication
(Basic and the session cookie), CSRF and Origin checks, the security
headers, escaping, the login throttle, TLS.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import quote

import pytest
import pytest_twisted
import treq
from conftest import Echo, listen, until
from test_clients import userpass
from test_errors import RawClient, connect_request
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_socks5.admin import (
    COOKIE,
    MAX_BODY,
    Console,
    ConsoleResource,
    ConsoleSite,
    console_site,
)
from twisted_socks5.codec import UserPassRequest
from twisted_socks5.rules import RulesFile

#: Written out here, not read from the module under test.
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; frame-ancestors 'none'; "
    "form-action 'self'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}

#: A SOCKS user whose name is HTML, quotes and a slash.
HOSTILE = "<img src=x onerror=alert(1)>\"'/&amp;"
SOCKS_USERS = {"alice": "s3cret", HOSTILE: "pw"}


def admin_checker(**users: str) -> Any:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {k.encode(): v.encode() for k, v in users.items()}
    return checker


class Env:
    """A proxy with SOCKS users, an echo target and a console on loopback."""

    def __init__(self, make_proxy: Any, tcp_target: Any, **console: Any) -> None:
        self.factory, self.port = make_proxy(authenticators=[userpass(**SOCKS_USERS)])
        self.echo = tcp_target(Echo)
        self.console = Console(
            self.factory,
            [admin_checker(root="toor", **console.pop("admins", {}))],
            **console,
        )
        site = ConsoleSite(ConsoleResource(self.console))
        self.site_port = listen(site)
        self.base = f"http://127.0.0.1:{self.site_port.getHost().port}"
        self.clients: List[RawClient] = []

    async def tunnel(self, user: str) -> RawClient:
        """A tunnel of ``user`` to the echo server, relaying."""
        payload = (
            b"\x05\x01\x02"
            + UserPassRequest(user.encode(), SOCKS_USERS[user].encode()).to_bytes()
            + connect_request("127.0.0.1", self.echo)
            + b"ping"
        )
        client = RawClient(payload)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port)
        await connectProtocol(endpoint, client)
        await until(lambda: b"".join(client.received).endswith(b"ping"), "the echo")
        self.clients.append(client)
        return client

    def url(self, path: str) -> str:
        return self.base + path

    async def call(
        self,
        method: str,
        path: str,
        *,
        auth: Optional[Tuple[str, str]] = ("root", "toor"),
        headers: Optional[Dict[str, str]] = None,
        cookies: Any = None,
        data: Any = None,
    ) -> Tuple[Any, bytes]:
        response = await treq.request(
            method,
            self.url(path),
            auth=auth,
            headers=headers,
            cookies=cookies,
            data=data,
            allow_redirects=False,
            # No connection left open after the test (a descriptor count
            # in another test would see it close later).
            persistent=False,
        )
        return response, await treq.content(response)

    async def login(
        self,
        user: str = "root",
        password: str = "toor",  # noqa: S107 - a test's
    ) -> Tuple[Any, str]:
        """Log in with the form: the cookie jar and the page's CSRF token."""
        response, _ = await self.call(
            "POST", "/login", auth=None, data={"user": user, "password": password}
        )
        assert response.code == 303
        jar = response.cookies()
        _, page = await self.call("GET", "/", auth=None, cookies=jar)
        start = page.index(b'name="csrf-token" content="') + 27
        return jar, page[start : page.index(b'"', start)].decode()

    def close(self) -> None:
        self.site_port.stopListening()
        for client in self.clients:
            if client.transport is not None:
                client.transport.abortConnection()


@pytest.fixture
def env(make_proxy: Any, tcp_target: Any) -> Any:
    made: List[Env] = []

    def make(**console: Any) -> Env:
        made.append(Env(make_proxy, tcp_target, **console))
        return made[-1]

    yield make
    for e in made:
        e.close()


def header(response: Any, name: str) -> Optional[str]:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


def closed(client: RawClient) -> bool:
    return client.done.called


@pytest_twisted.ensureDeferred
async def test_api_lists_tunnels_and_users(env: Any) -> None:
    e = env()
    await e.tunnel("alice")
    await e.tunnel("alice")
    await e.tunnel(HOSTILE)
    # Nothing was kept for the console while nobody looked.
    assert len(e.console._ids) == 0
    response, body = await e.call("GET", "/api/tunnels")
    assert response.code == 200
    assert header(response, "content-type") == "application/json; charset=utf-8"
    tunnels = json.loads(body)
    assert [t["user"] for t in tunnels] == ["alice", "alice", HOSTILE]
    first = tunnels[0]
    assert first["protocol"] == "socks5"
    assert first["command"] == "connect"
    assert first["destination"] == f"127.0.0.1:{e.echo}"
    assert first["route"] == "default"
    assert first["state"] == "relaying"
    assert first["client"].startswith("127.0.0.1:")
    assert (first["bytes_up"], first["bytes_down"]) == (4, 4)
    assert first["age"] >= 0 and first["rate_up"] >= 0
    ids = [t["id"] for t in tunnels]
    assert len(set(ids)) == 3

    # Filters for scripts: a user exactly, a part of the destination.
    _, body = await e.call("GET", f"/api/tunnels?user={quote(HOSTILE, safe='')}")
    assert [t["id"] for t in json.loads(body)] == [ids[2]]
    _, body = await e.call("GET", "/api/tunnels?user=ALICE")
    assert json.loads(body) == []
    _, body = await e.call("GET", f"/api/tunnels?destination=:{e.echo}")
    assert len(json.loads(body)) == 3
    _, body = await e.call("GET", "/api/tunnels?destination=example.org")
    assert json.loads(body) == []

    response, body = await e.call("GET", "/api/users")
    users = json.loads(body)
    assert [(u["user"], u["tunnels"], u["bytes_up"]) for u in users] == [
        (HOSTILE, 1, 4),
        ("alice", 2, 8),
    ]
    assert "limits" not in users[0]  # no per-user limits without issue 14's data


@pytest_twisted.ensureDeferred
async def test_idle_console_has_no_timer_and_polls_are_not_logged(
    env: Any, events: Any
) -> None:
    calls = len(reactor.getDelayedCalls())
    e = env()
    for _ in range(3):
        response, _ = await e.call("GET", "/api/tunnels")
        assert response.code == 200
    assert not [x for x in events if "/api/tunnels" in repr(x)]
    # Nothing scheduled on the console's behalf (HTTP connections are gone).
    await until(lambda: len(reactor.getDelayedCalls()) <= calls, "the timers' end")


@pytest_twisted.ensureDeferred
async def test_ids_are_stable_and_never_reused(env: Any) -> None:
    e = env()
    one = await e.tunnel("alice")
    await e.tunnel("alice")
    _, body = await e.call("GET", "/api/tunnels")
    before = [t["id"] for t in json.loads(body)]
    _, body = await e.call("GET", "/api/tunnels")
    assert [t["id"] for t in json.loads(body)] == before
    one.transport.loseConnection()
    await until(lambda: len(e.factory.active) == 1, "the first tunnel's end")
    await e.tunnel("alice")
    _, body = await e.call("GET", "/api/tunnels")
    after = [t["id"] for t in json.loads(body)]
    assert after[0] == before[1]
    assert after[1] > max(before)


@pytest_twisted.ensureDeferred
async def test_close_one_tunnel(env: Any, events: Any) -> None:
    e = env()
    keep = await e.tunnel("alice")
    cut = await e.tunnel("alice")
    _, body = await e.call("GET", "/api/tunnels")
    target = json.loads(body)[1]["id"]
    response, body = await e.call("POST", f"/api/tunnels/{target}/close")
    assert (response.code, json.loads(body)) == (200, {"closed": 1})
    await until(lambda: closed(cut), "the tunnel's close")
    assert not closed(keep)
    lines = [x for x in events if x.get("event") == "socks5.connection"]
    assert lines[-1]["outcome"] == "revoked: closed from the console by root"
    # Closed already, unknown, not a number: 404, nothing else closed.
    for bad in (str(target), "999999", "abc", "-1", "1" * 40):
        response, _ = await e.call("POST", f"/api/tunnels/{bad}/close")
        assert response.code == 404, bad
    assert not closed(keep)


@pytest_twisted.ensureDeferred
async def test_close_all_of_a_user(env: Any) -> None:
    e = env()
    alices = [await e.tunnel("alice"), await e.tunnel("alice")]
    other = await e.tunnel(HOSTILE)
    response, body = await e.call("POST", "/api/users/alice/close")
    assert (response.code, json.loads(body)) == (200, {"closed": 2})
    await until(lambda: all(closed(c) for c in alices), "alice's tunnels' close")
    assert not closed(other)
    # A name with a slash and HTML, percent-encoded in the path.
    response, body = await e.call("POST", f"/api/users/{quote(HOSTILE, safe='')}/close")
    assert (response.code, json.loads(body)) == (200, {"closed": 1})
    await until(lambda: closed(other), "the hostile user's tunnel's close")
    response, body = await e.call("POST", "/api/users/nobody/close")
    assert json.loads(body) == {"closed": 0}


@pytest_twisted.ensureDeferred
async def test_reload_is_sighups(env: Any, tmp_path: Any, events: Any) -> None:
    e = env()
    rules = tmp_path / "rules"
    rules.write_text("allow\n")
    e.factory.policy = RulesFile(str(rules))
    alice = await e.tunnel("alice")
    other = await e.tunnel(HOSTILE)
    rules.write_text(f"deny user alice to 127.0.0.1 port {e.echo}\nallow\n")
    response, body = await e.call("GET", "/api/reload")
    assert response.code == 404  # never by GET
    assert len(e.factory.policy.rules.rules) == 1
    response, body = await e.call("POST", "/api/reload")
    assert (response.code, json.loads(body)) == (200, {"reloaded": True, "revoked": 1})
    assert len(e.factory.policy.rules.rules) == 2
    assert any(x.get("event") == "socks5.reloaded" for x in events)
    # As on SIGHUP, the new rules revoke what they deny, and only that.
    await until(lambda: closed(alice), "the revocation")
    assert not closed(other)


@pytest_twisted.ensureDeferred
async def test_authentication_is_required(env: Any) -> None:
    e = env(login_failures=0)  # no throttle: many failures below
    await e.tunnel("alice")
    for method, path in [
        ("GET", "/api/tunnels"),
        ("GET", "/api/users"),
        ("POST", "/api/tunnels/1/close"),
        ("POST", "/api/users/alice/close"),
        ("POST", "/api/reload"),
    ]:
        for auth in (None, ("root", "wrong"), ("alice", "s3cret")):  # a SOCKS user
            response, body = await e.call(method, path, auth=auth)
            assert response.code == 401, (method, path, auth)
            assert json.loads(body) == {"error": "log in first"}
    assert not any(closed(c) for c in e.clients)
    # A browser page's request gets no Basic challenge (no password prompt).
    response, _ = await e.call(
        "GET", "/api/tunnels", auth=None, headers={"X-Requested-With": "console"}
    )
    assert response.code == 401
    assert header(response, "www-authenticate") is None
    response, _ = await e.call("GET", "/api/tunnels", auth=None)
    assert (
        header(response, "www-authenticate") == 'Basic realm="twisted-socks5 console"'
    )
    # The page itself sends to the login form.
    response, _ = await e.call("GET", "/", auth=None)
    assert (response.code, header(response, "location")) == (303, "/login")


@pytest_twisted.ensureDeferred
async def test_session_cookie_and_csrf(env: Any) -> None:
    e = env()
    client = await e.tunnel("alice")
    response, body = await e.call(
        "POST", "/login", auth=None, data={"user": "root", "password": "toor"}
    )
    assert (response.code, header(response, "location")) == (303, "/")
    cookie = header(response, "set-cookie") or ""
    assert cookie.startswith(COOKIE.decode() + "=")
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain HTTP: a Secure cookie would not come back
    jar, csrf = await e.login()
    response, body = await e.call("GET", "/api/tunnels", auth=None, cookies=jar)
    assert response.code == 200 and len(json.loads(body)) == 1
    tunnel = json.loads(body)[0]["id"]
    path = f"/api/tunnels/{tunnel}/close"
    for headers in (
        {},  # no token
        # A wrong one (one character off: never the token itself).
        {"X-CSRF-Token": ("y" if csrf[0] == "x" else "x") + csrf[1:]},
        {"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
        {"X-CSRF-Token": csrf, "Origin": e.base.replace("127.0.0.1", "localhost")},
        {"X-CSRF-Token": csrf, "Sec-Fetch-Site": "cross-site"},
    ):
        response, body = await e.call(
            "POST", path, auth=None, cookies=jar, headers=headers
        )
        assert response.code == 403, headers
    assert not closed(client)
    # A script with Basic needs no token, but a foreign Origin is refused too.
    response, _ = await e.call("POST", path, headers={"Origin": "http://evil.example"})
    assert response.code == 403
    response, _ = await e.call(
        "POST",
        path,
        auth=None,
        cookies=jar,
        headers={
            "X-CSRF-Token": csrf,
            "Origin": e.base,
            "Sec-Fetch-Site": "same-origin",
        },
    )
    assert response.code == 200
    await until(lambda: closed(client), "the close")
    # Log out: the session is gone.
    response, _ = await e.call(
        "POST", "/logout", auth=None, cookies=jar, data={"csrf": csrf}
    )
    assert (response.code, header(response, "location")) == (303, "/login")
    response, _ = await e.call("GET", "/api/tunnels", auth=None, cookies=jar)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_cross_site_login_and_logout_are_refused(env: Any) -> None:
    e = env()
    response, body = await e.call(
        "POST",
        "/login",
        auth=None,
        data={"user": "root", "password": "toor"},
        headers={"Origin": "http://evil.example"},
    )
    assert response.code == 403 and header(response, "set-cookie") is None
    # A browser's form says "Origin: null" (the pages' Referrer-Policy is
    # no-referrer): then only its Sec-Fetch-Site: same-origin lets it in.
    login = {"user": "root", "password": "toor"}
    for headers in (
        {"Origin": "null"},
        {"Origin": "null", "Sec-Fetch-Site": "cross-site"},
        {"Origin": "null", "Sec-Fetch-Site": "same-site"},
    ):
        response, _ = await e.call(
            "POST", "/login", auth=None, data=login, headers=headers
        )
        assert response.code == 403, headers
    response, _ = await e.call(
        "POST",
        "/login",
        auth=None,
        data=login,
        headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    )
    assert response.code == 303
    jar, csrf = await e.login()
    await e.call("POST", "/logout", auth=None, cookies=jar, data={"csrf": "wrong"})
    response, _ = await e.call("GET", "/api/tunnels", auth=None, cookies=jar)
    assert response.code == 200  # still logged in


@pytest_twisted.ensureDeferred
async def test_security_headers_on_every_answer(env: Any) -> None:
    e = env()
    jar, _ = await e.login()
    for method, path, auth, cookies in [
        ("GET", "/login", None, None),
        ("GET", "/", None, jar),
        ("GET", "/", None, None),
        ("GET", "/static/console.js", None, None),
        ("GET", "/static/console.css", None, None),
        ("GET", "/api/tunnels", None, None),
        ("GET", "/api/tunnels", ("root", "toor"), None),
        ("GET", "/nowhere", None, None),
        ("POST", "/api/reload", None, jar),
    ]:
        response, _ = await e.call(method, path, auth=auth, cookies=cookies)
        for name, value in SECURITY_HEADERS.items():
            assert header(response, name) == value, (path, name)
    response, body = await e.call("GET", "/static/console.js", auth=None)
    assert header(response, "content-type") == "text/javascript; charset=utf-8"
    assert b"innerHTML" not in body  # all text goes in as textContent


@pytest_twisted.ensureDeferred
async def test_hostile_admin_name_is_escaped_in_the_page(env: Any) -> None:
    name = '<script>alert("x")</script>&'
    e = env(admins={name: "pw"})
    jar, csrf = await e.login(name, "pw")
    _, page = await e.call("GET", "/", auth=None, cookies=jar)
    assert b"<script>alert" not in page
    assert b"&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in page
    assert b"toor" not in page and b"s3cret" not in page  # no secrets in pages
    assert page.count(b"<script") == 1  # the console's own, from /static


@pytest_twisted.ensureDeferred
async def test_failed_logins_are_throttled(env: Any) -> None:
    clock = task.Clock()
    e = env(clock=clock, login_failures=3, login_window=60.0)
    for _ in range(3):
        response, _ = await e.call(
            "POST", "/login", auth=None, data={"user": "root", "password": "guess"}
        )
        assert response.code == 401
    # Throttled: the right password is refused too, by the form and by Basic.
    response, body = await e.call(
        "POST", "/login", auth=None, data={"user": "root", "password": "toor"}
    )
    assert response.code == 429 and b"Too many failed logins" in body
    response, _ = await e.call("GET", "/api/tunnels")
    assert response.code == 429
    clock.advance(61)
    response, _ = await e.call("GET", "/api/tunnels")
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_session_expires(env: Any) -> None:
    clock = task.Clock()
    e = env(clock=clock)
    jar, _ = await e.login()
    clock.advance(12 * 3600 - 1)
    response, _ = await e.call("GET", "/api/users", auth=None, cookies=jar)
    assert response.code == 200
    clock.advance(2)
    response, _ = await e.call("GET", "/api/users", auth=None, cookies=jar)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_over_tls_the_cookie_is_secure(make_proxy: Any, tmp_path: Any) -> None:
    pytest.importorskip("cryptography")
    from test_upstream import make_pki
    from treq.client import HTTPClient
    from twisted.internet import ssl
    from twisted.internet.endpoints import serverFromString
    from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

    ca, cert, key = make_pki(tmp_path, "localhost")
    factory, _ = make_proxy()
    site = console_site(factory, [admin_checker(root="toor")])
    endpoint = serverFromString(
        reactor, f"ssl:0:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    )
    port = await endpoint.listen(site)
    try:
        with open(ca, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        agent = Agent(reactor, BrowserLikePolicyForHTTPS(trustRoot=trust))
        http = HTTPClient(agent)
        base = f"https://localhost:{port.getHost().port}"
        response = await http.post(
            base + "/login",
            data={"user": "root", "password": "toor"},
            allow_redirects=False,
        )
        await treq.content(response)
        assert response.code == 303
        cookie = header(response, "set-cookie") or ""
        assert cookie.startswith("__Host-socks5_console=")
        assert "Secure" in cookie and "HttpOnly" in cookie
        response = await http.get(base + "/api/users", cookies=response.cookies())
        assert response.code == 200
        assert json.loads(await treq.content(response)) == []
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("chunked", [False, True])
async def test_large_bodies_are_refused_before_login(env: Any, chunked: bool) -> None:
    from test_errors import exchange

    e = env()
    body = b"user=root&password=" + b"x" * (MAX_BODY + 1)
    if chunked:
        head = b"Transfer-Encoding: chunked\r\n\r\n"
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
            for i in range(0, len(body), 4096)
        )
    else:  # refused on the declared length, before the body comes
        head = b"Content-Length: %d\r\n\r\n" % (100 * MAX_BODY)
        body = b"user=root"
    answer = await exchange(
        e.site_port.getHost().port,
        b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n" + head + body,
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert answer.count(b"HTTP/1.1") == 1  # and nothing after it
    # A form of a normal size still works.
    jar, _ = await e.login()
    assert jar


@pytest_twisted.ensureDeferred
async def test_a_udp_association_is_listed_and_closed(env: Any) -> None:
    from twisted_socks5.codec import Address, AddressType, Command, Request

    e = env()
    client = RawClient(
        b"\x05\x01\x02"
        + UserPassRequest(b"alice", b"s3cret").to_bytes()
        + Request(
            Command.UDP_ASSOCIATE, Address(AddressType.IPV4, "0.0.0.0", 0)
        ).to_bytes()
    )
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", e.port)
    await connectProtocol(endpoint, client)
    # Method choice (2), login status (2), the reply (10).
    await until(lambda: len(b"".join(client.received)) >= 14, "the UDP reply")
    _, body = await e.call("GET", "/api/tunnels")
    [association] = json.loads(body)
    assert (association["command"], association["state"]) == (
        "udp associate",
        "associated",
    )
    assert association["bytes_up"] == association["bytes_down"] == 0
    response, _ = await e.call("POST", f"/api/tunnels/{association['id']}/close")
    assert response.code == 200
    await until(lambda: closed(client), "the association's close")
    await until(lambda: not e.factory.active, "the factory's count")


@pytest_twisted.ensureDeferred
async def test_users_show_what_their_limits_hold(env: Any) -> None:
    from twisted_socks5.limitstore import MemoryLimitStore
    from twisted_socks5.rules import RuleSet

    e = env()
    e.factory.policy = RuleSet.parse(
        "limit user alice sessions 5\nlimit user alice quota 1GiB/month\nallow\n",
        "limits.rules",
    )
    limiter = e.factory.enable_limits(MemoryLimitStore(reactor))
    limiter.start()
    try:
        await e.tunnel("alice")
        await e.tunnel(HOSTILE)  # no limit line applies to this user
        _, body = await e.call("GET", "/api/users")
        users = {u["user"]: u for u in json.loads(body)}
        alice = users["alice"]["limits"]
        assert alice["sessions"] == 1
        (quota,) = alice["quotas"]
        assert quota["line"] == "limits.rules:2: limit user alice quota 1GiB/month"
        assert quota["limit"] == 1 << 30
        assert users[HOSTILE]["limits"] == {
            "sessions": 0,
            "quotas": [],
            "bandwidth": [],
        }
    finally:
        await limiter.stop()
