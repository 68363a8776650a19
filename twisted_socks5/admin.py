"""
The live console (``--admin ENDPOINT``): a small web page and a JSON API on
``twisted.web`` that list the server's open connections and per-user totals,
close one tunnel or all of a user's, and reload the configuration.

Nothing runs while nobody looks: the console reads the factory's set of open
connections (``factory.active``, kept anyway) when a page or a script asks,
gives a connection its id the first time it is listed, and keeps no timer.
The page polls the API every two seconds while it is visible.

Access: a login form (a session cookie, ``HttpOnly``, ``SameSite=Strict``,
``Secure`` over TLS) or HTTP Basic for scripts, both checked by the
``--admin-auth`` checkers; failed logins are throttled per client; every POST
needs a same-origin ``Origin`` (or none, from a script) and, with a session,
its CSRF token.
"""

from __future__ import annotations

import hmac
import html
import itertools
import json
import secrets
import string
import weakref
from importlib import resources
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union
from urllib.parse import urlsplit

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server

from .limits import ConnectionLimits
from .logs import escape, escape_word
from .revocation import revoke

log = Logger()

#: The session cookie's name; ``__Host-`` (no Domain, Path=/, Secure) over TLS.
COOKIE = b"socks5_console"
SECURE_COOKIE = b"__Host-socks5_console"
#: A session lasts this long from login (seconds), then logs in again.
SESSION_LIFETIME = 12 * 3600.0
#: Sessions kept at once; a new login past it ends the oldest.
MAX_SESSIONS = 64
#: Seconds between two rate samples of a connection.
RATE_INTERVAL = 1.0

#: Sent with every answer, pages, API and errors alike.
SECURITY_HEADERS = {
    b"content-security-policy": b"default-src 'self'; frame-ancestors 'none'; "
    b"form-action 'self'; base-uri 'none'",
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}

_STATIC = {
    b"console.js": b"text/javascript; charset=utf-8",
    b"console.css": b"text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    """A file of the console's package data (``twisted_socks5/console/``)."""
    return (resources.files("twisted_socks5") / "console" / name).read_bytes()


def _text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


class Session:
    """One logged-in browser: who, its CSRF token, until when."""

    __slots__ = ("user", "csrf", "expires")

    def __init__(self, user: str, expires: float) -> None:
        self.user = user
        self.csrf = secrets.token_urlsafe(32)
        self.expires = expires


class Console:
    """
    What the console shows and does, over a server factory; the web
    resource (:class:`ConsoleResource`) is its HTTP face.

    Tunnel ids are whole numbers given in the order connections are first
    listed, never reused in the process's life.  They are not secret: only
    a logged-in operator sees or uses them, and a POST needs the session's
    CSRF token besides.

    :param checkers: ``twisted.cred`` checkers of ``IUsernamePassword``
        (``--admin-auth``); a login is good when one of them accepts it.
    :param clock: times sessions and the login throttle (default: the
        factory's reactor).
    """

    def __init__(
        self,
        factory: Any,
        checkers: Sequence[Any],
        *,
        login_failures: int = 5,
        login_window: float = 60.0,
        clock: Any = None,
    ) -> None:
        if not checkers:
            raise ValueError("the console needs a credential checker")
        self.factory = factory
        self.clock = clock or factory.reactor
        self.checkers = list(checkers)
        self._ids: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._by_id: weakref.WeakValueDictionary[int, Any] = (
            weakref.WeakValueDictionary()
        )
        self._next_id = itertools.count(1)
        #: conn -> (when, bytes up, bytes down, rate up, rate down)
        self._samples: weakref.WeakKeyDictionary[
            Any, Tuple[float, int, int, float, float]
        ] = weakref.WeakKeyDictionary()
        self.sessions: Dict[str, Session] = {}
        #: The SOCKS server's failed-login throttle, a separate one.
        self.throttle = ConnectionLimits(
            self.clock.seconds,
            max_connections=0,
            auth_failures=login_failures,
            auth_window=login_window,
        )

    # ------------------------------------------------------------------
    # Reading

    def tunnel_id(self, connection: Any) -> int:
        """The connection's id, given on its first listing."""
        found = self._ids.get(connection)
        if found is None:
            found = self._ids[connection] = next(self._next_id)
            self._by_id[found] = connection
        return found

    def _open(self) -> List[Any]:
        return [c for c in self.factory.active if not getattr(c, "refused", False)]

    def _rates(
        self, connection: Any, now: float, up: int, down: int
    ) -> Tuple[float, float]:
        """Bytes per second each way since the last sample (the average at first)."""
        sample = self._samples.get(connection)
        if sample is None:
            age = max(now - connection.started, 1e-3)
            rates = (up / age, down / age)
        elif now - sample[0] < RATE_INTERVAL:
            return sample[3], sample[4]
        else:
            span = now - sample[0]
            rates = ((up - sample[1]) / span, (down - sample[2]) / span)
        self._samples[connection] = (now, up, down, *rates)
        return rates

    def describe(self, connection: Any, now: float) -> Dict[str, Any]:
        """One connection as the API shows it."""
        request = connection.request
        udp = connection.udp
        counters = udp.counters if udp is not None else connection.counters
        up, down = counters.bytes_up, counters.bytes_down
        rate_up, rate_down = self._rates(connection, now, up, down)
        decision = connection.decision
        route = getattr(decision, "via", None) or "default"
        return {
            "id": self.tunnel_id(connection),
            "client": str(connection.client) if connection.client else None,
            "user": connection.user,
            "protocol": getattr(connection, "protocol", "socks5"),
            "command": request.command.phrase if request else None,
            "destination": str(request.address) if request else None,
            "route": route if request else None,
            "state": connection.state.value,
            "bytes_up": up,
            "bytes_down": down,
            "rate_up": round(rate_up, 1),
            "rate_down": round(rate_down, 1),
            "age": round(now - connection.started, 3),
        }

    def tunnels(self) -> List[Dict[str, Any]]:
        """Every open connection, oldest first."""
        now = self.factory.reactor.seconds()  # the clock of ``started``
        # Oldest first, so that ids given now follow the order of arrival.
        by_age = sorted(self._open(), key=lambda c: c.started)
        listed = [self.describe(c, now) for c in by_age]
        listed.sort(key=lambda t: t["id"])
        return listed

    def users(self) -> List[Dict[str, Any]]:
        """Totals by user (``None``: no login), and limits where known."""
        totals: Dict[Optional[str], Dict[str, Any]] = {}
        for tunnel in self.tunnels():
            user = tunnel["user"]
            entry = totals.get(user)
            if entry is None:
                entry = totals[user] = {
                    "user": user,
                    "tunnels": 0,
                    "bytes_up": 0,
                    "bytes_down": 0,
                }
            entry["tunnels"] += 1
            entry["bytes_up"] += tunnel["bytes_up"]
            entry["bytes_down"] += tunnel["bytes_down"]
        # Per-user limits (the rules' limit lines), when the server has them.
        limits_of = getattr(self.factory, "user_limits", None)
        if callable(limits_of):
            for entry in totals.values():
                if entry["user"] is not None:
                    limits = limits_of(entry["user"])
                    if limits is not None:
                        entry["limits"] = limits
        return sorted(
            totals.values(), key=lambda u: (u["user"] is None, u["user"] or "")
        )

    # ------------------------------------------------------------------
    # Acting

    def close_tunnel(self, tunnel_id: int, by: str) -> bool:
        """Close one connection; False when there is no such open one."""
        connection = self._by_id.get(tunnel_id)
        if connection is None or connection not in self.factory.active:
            return False
        return self._close(connection, by)

    def close_user(self, user: str, by: str) -> int:
        """Close every open connection of ``user``; how many."""
        mine = [c for c in self._open() if c.user == user]
        return sum(self._close(connection, by) for connection in mine)

    def _close(self, connection: Any, by: str) -> bool:
        """Revoke ``connection`` (as a reload would); False if closing already."""
        why = f"closed from the console by {escape_word(by)}"
        log.info(
            "console: {admin} closes connection {id} ({user} to {target})",
            admin=escape_word(by),
            id=self.tunnel_id(connection),
            user=escape_word(connection.user),
            target=escape_word(
                connection.request.address if connection.request else None
            ),
            event="socks5.console_close",
        )
        return revoke(connection, why)

    def reload(self, by: str) -> defer.Deferred[int]:
        """
        Re-read the configuration, what SIGHUP does (revocation included):
        fires with how many connections the new one closed.
        """
        log.info(
            "console: {admin} reloads the configuration",
            admin=escape_word(by),
            event="socks5.console_reload",
        )
        return defer.maybeDeferred(self.factory.reload).addCallback(
            lambda revoked: revoked or 0
        )

    # ------------------------------------------------------------------
    # Logging in

    def check(self, ip: str, user: bytes, password: bytes) -> defer.Deferred[str]:
        """
        The user's name if a checker accepts the password; fails with
        ``UnauthorizedLogin``, or :class:`Throttled` without asking a checker.
        """
        if self.throttle.throttled(ip):
            return defer.fail(Throttled())
        credentials = UsernamePassword(user, password)

        async def first_accepting() -> str:
            for checker in self.checkers:
                try:
                    await defer.maybeDeferred(checker.requestAvatarId, credentials)
                except UnauthorizedLogin:
                    continue
                return _text(user)
            raise UnauthorizedLogin()

        def failed(reason: Failure) -> Failure:
            self.throttle.auth_failed(ip)
            log.warn(
                "console: failed login for {user} from {ip}",
                user=escape_word(_text(user)),
                ip=escape(ip),
                event="socks5.console_login_failed",
            )
            return reason

        return defer.ensureDeferred(first_accepting()).addErrback(failed)

    def open_session(self, user: str) -> Tuple[str, Session]:
        now = self.clock.seconds()
        for key, session in list(self.sessions.items()):
            if session.expires <= now:
                del self.sessions[key]
        while len(self.sessions) >= MAX_SESSIONS:
            del self.sessions[next(iter(self.sessions))]
        key = secrets.token_urlsafe(32)
        session = self.sessions[key] = Session(user, now + SESSION_LIFETIME)
        return key, session

    def session(self, key: Optional[bytes]) -> Optional[Session]:
        if not key:
            return None
        session = self.sessions.get(_text(key))
        if session is None:
            return None
        if session.expires <= self.clock.seconds():
            del self.sessions[_text(key)]
            return None
        return session


class Throttled(Exception):
    """Too many failed logins from this client lately."""


# ----------------------------------------------------------------------
# HTTP


#: What an API route gives: the body now, or later.
_Answer = Union[bytes, "defer.Deferred[bytes]"]


def _same_origin(request: Any) -> bool:
    """
    Whether a POST may act: it says it comes from this console (``Origin``
    is the ``Host`` asked for, or absent, as from scripts, or ``null`` with
    ``Sec-Fetch-Site: same-origin``; and no browser's ``Sec-Fetch-Site``
    says cross-site).
    """
    site = request.getHeader(b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return False
    origin = request.getHeader(b"origin")
    if origin is None:
        return True
    if origin == b"null":
        # A form's POST under "Referrer-Policy: no-referrer" says "null":
        # only the browser's own word that it is same-origin will do.
        return bool(site == b"same-origin")
    host = request.getHeader(b"host")
    if host is None:
        return False
    scheme = "https" if request.isSecure() else "http"
    parsed = urlsplit(_text(origin))
    return parsed.scheme == scheme and parsed.netloc.lower() == _text(host).lower()


def _json(request: Any, status: int, body: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    return json.dumps(body).encode("utf-8")


def _page(name: str, **values: str) -> bytes:
    """A page of the console's package data, its ``$names`` filled, escaped."""
    template = string.Template(_asset(name).decode("utf-8"))
    escaped = {k: html.escape(v, quote=True) for k, v in values.items()}
    return template.substitute(escaped).encode("utf-8")


class ConsoleResource(resource.Resource):
    """Every path of the console (see the docs' "Live console" for the API)."""

    isLeaf = True

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    # -- the pieces of a request

    def _cookie_name(self, request: Any) -> bytes:
        return SECURE_COOKIE if request.isSecure() else COOKIE

    def _session(self, request: Any) -> Optional[Session]:
        return self.console.session(request.getCookie(self._cookie_name(request)))

    def _ip(self, request: Any) -> str:
        host = getattr(request.getClientAddress(), "host", None)
        return host if isinstance(host, str) else "127.0.0.1"

    def render(self, request: Any) -> Any:
        path = list(request.postpath or [b""])
        if path and path[-1] == b"" and len(path) > 1:
            path.pop()
        method = request.method
        if path[0] == b"static" and len(path) == 2 and path[1] in _STATIC:
            if method not in (b"GET", b"HEAD"):
                return self._not_allowed(request)
            request.setHeader(b"content-type", _STATIC[path[1]])
            return _asset(_text(path[1]))
        if path == [b"login"]:
            if method == b"POST":
                return self._login(request)
            return self._login_page(request, "")
        if path == [b""] and method in (b"GET", b"HEAD"):
            return self._console_page(request)
        if path == [b"logout"] and method == b"POST":
            return self._logout(request)
        if path[0] == b"api":
            return self._api(request, path[1:])
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found\n"

    def _not_allowed(self, request: Any) -> bytes:
        return _json(request, 405, {"error": "method not allowed"})

    # -- pages

    def _login_page(self, request: Any, message: str, status: int = 200) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _page("login.html", message=message)

    def _console_page(self, request: Any) -> bytes:
        session = self._session(request)
        if session is None:
            request.setResponseCode(303)
            request.setHeader(b"location", b"/login")
            return b""
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return _page("console.html", user=session.user, csrf=session.csrf)

    def _login(self, request: Any) -> Any:
        if not _same_origin(request):
            return self._login_page(request, "Refused: cross-site login.", 403)
        args = request.args or {}
        user = (args.get(b"user") or [b""])[0]
        password = (args.get(b"password") or [b""])[0]
        d = self.console.check(self._ip(request), user, password)

        def good(name: str) -> bytes:
            key, _ = self.console.open_session(name)
            request.addCookie(
                self._cookie_name(request),
                key.encode("ascii"),
                path=b"/",
                secure=True if request.isSecure() else None,
                httpOnly=True,
                sameSite="strict",
            )
            request.setResponseCode(303)
            request.setHeader(b"location", b"/")
            log.info(
                "console: {user} logged in from {ip}",
                user=escape_word(name),
                ip=escape(self._ip(request)),
                event="socks5.console_login",
            )
            return b""

        def bad(reason: Failure) -> bytes:
            if reason.check(Throttled):
                request.setHeader(b"retry-after", b"60")
                return self._login_page(
                    request, "Too many failed logins: try again later.", 429
                )
            reason.trap(UnauthorizedLogin)
            return self._login_page(request, "Wrong user name or password.", 401)

        return _finish(request, d.addCallbacks(good, bad))

    def _logout(self, request: Any) -> Any:
        session = self._session(request)
        args = request.args or {}
        token = (args.get(b"csrf") or [b""])[0]
        if (
            session is not None
            and _same_origin(request)
            and hmac.compare_digest(_text(token), session.csrf)
        ):
            self.console.sessions.pop(
                _text(request.getCookie(self._cookie_name(request)) or b""), None
            )
        request.setResponseCode(303)
        request.setHeader(b"location", b"/login")
        return b""

    # -- the API

    def _api(self, request: Any, path: List[bytes]) -> Any:
        session = self._session(request)
        if session is not None:
            answer = self._api_as(request, path, session.user, session)
            if isinstance(answer, defer.Deferred):
                return _finish(request, answer)
            return answer
        user, password = request.getUser(), request.getPassword()
        if not user:
            return self._unauthorized(request)
        d = self.console.check(self._ip(request), user, password)

        def bad(reason: Failure) -> bytes:
            if reason.check(Throttled):
                request.setHeader(b"retry-after", b"60")
                return _json(request, 429, {"error": "too many failed logins"})
            reason.trap(UnauthorizedLogin)
            return self._unauthorized(request)

        def good(name: str) -> _Answer:
            return self._api_as(request, path, name, None)

        return _finish(request, d.addCallbacks(good, bad))

    def _unauthorized(self, request: Any) -> bytes:
        # No Basic challenge for the page's own requests: the browser would
        # prompt (and then send the password with every request).
        if request.getHeader(b"x-requested-with") is None:
            request.setHeader(
                b"www-authenticate", b'Basic realm="twisted-socks5 console"'
            )
        return _json(request, 401, {"error": "log in first"})

    def _api_as(
        self, request: Any, path: List[bytes], user: str, session: Optional[Session]
    ) -> _Answer:
        method = request.method
        if method in (b"GET", b"HEAD"):
            if path == [b"tunnels"]:
                return _json(request, 200, _filtered(request, self.console.tunnels()))
            if path == [b"users"]:
                return _json(request, 200, self.console.users())
            if path == [b"session"]:
                return _json(request, 200, {"user": user})
            return _json(request, 404, {"error": "not found"})
        if method != b"POST":
            return self._not_allowed(request)
        if not _same_origin(request):
            return _json(request, 403, {"error": "cross-site request refused"})
        if session is not None:
            token = request.getHeader(b"x-csrf-token") or b""
            if not hmac.compare_digest(_text(token), session.csrf):
                return _json(request, 403, {"error": "missing or wrong CSRF token"})
        return self._act(request, path, user)

    def _act(self, request: Any, path: List[bytes], user: str) -> _Answer:
        console = self.console
        if path == [b"reload"]:
            return console.reload(user).addCallback(
                lambda revoked: _json(
                    request, 200, {"reloaded": True, "revoked": revoked}
                )
            )
        if len(path) == 3 and path[0] == b"tunnels" and path[2] == b"close":
            number = _tunnel_number(path[1])
            if number is None or not console.close_tunnel(number, user):
                return _json(request, 404, {"error": "no such open tunnel"})
            return _json(request, 200, {"closed": 1})
        if len(path) == 3 and path[0] == b"users" and path[2] == b"close":
            closed = console.close_user(_text(path[1]), user)
            return _json(request, 200, {"closed": closed})
        return _json(request, 404, {"error": "not found"})


def _filtered(request: Any, tunnels: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``?user=NAME`` (exact) and ``?destination=TEXT`` (a part of it)."""
    args = request.args or {}
    user = args.get(b"user")
    if user:
        name = _text(user[0])
        tunnels = [t for t in tunnels if t["user"] == name]
    part = args.get(b"destination")
    if part:
        text = _text(part[0]).lower()
        tunnels = [t for t in tunnels if text in (t["destination"] or "").lower()]
    return tunnels


def _tunnel_number(text: bytes) -> Optional[int]:
    if not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _finish(request: Any, d: defer.Deferred[bytes]) -> Any:
    """Write what ``d`` gives, unless the client went away meanwhile."""
    gone: List[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def write(body: bytes) -> None:
        if gone:
            return
        if body:
            request.write(body)
        request.finish()

    def broken(reason: Failure) -> None:
        log.failure("console request failed", reason)
        if not gone:
            request.setResponseCode(500)
            request.finish()

    d.addCallback(write).addErrback(broken)
    return server.NOT_DONE_YET


#: Request bodies (the login form, at most) are refused beyond this size:
#: the form is there for anyone who can connect, before any login.
MAX_BODY = 64 * 1024

_TOO_LARGE = (
    b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
)


class ConsoleRequest(server.Request):
    """A request whose body is bounded by :data:`MAX_BODY`."""

    _received = 0
    _refused = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """As ``twisted.web.server.Request``'s."""
        super().__init__(*args, **kwargs)

    def gotLength(self, length: Optional[int]) -> None:
        if length is not None and length > MAX_BODY:
            self._refuse()
        super().gotLength(None if self._refused else length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._received > MAX_BODY:
            self._refuse()
            return
        super().handleContentChunk(data)

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport
        if transport is not None:
            transport.write(_TOO_LARGE)
            transport.loseConnection()

    def process(self) -> None:
        if not self._refused:  # answered already
            super().process()


class ConsoleSite(server.Site):
    """A site whose every answer carries the security headers."""

    def __init__(self, root: resource.IResource) -> None:
        """Serve ``root`` (a :class:`ConsoleResource`)."""
        super().__init__(root, requestFactory=ConsoleRequest)

    def startFactory(self) -> None:
        """
        No request log, and so none of its once-a-second clock: a page
        polling would add two lines every two seconds to the server's log,
        which has the console's logins and actions already.
        """

    def log(self, request: Any) -> None:
        """Requests are not logged (see :meth:`startFactory`)."""

    def getResourceFor(self, request: Any) -> Any:
        for name, value in SECURITY_HEADERS.items():
            request.setHeader(name, value)
        return super().getResourceFor(request)


def console_site(factory: Any, checkers: Iterable[Any]) -> ConsoleSite:
    """The console of ``factory``, for an endpoint to listen with."""
    site = ConsoleSite(ConsoleResource(Console(factory, list(checkers))))
    site.noisy = False
    site.displayTracebacks = False
    return site
