"""
Who logs in, from the wire: the fail-closed method API, checkers that raise,
exact user names in every back end, empty credentials and the failed-login
throttle on connections already open.  In memory (a Harness per server).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, List, Optional

import bcrypt
import pytest
import pytest_twisted
from helpers import SERVER, HalfCloseTransport, Harness, until
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import EventLoggingObserver
from zope.interface import implementer

from twisted_socks5.auth import (
    CheckerBusy,
    NoAuthAuthenticator,
    UsernamePasswordAuthenticator,
)
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Request,
    UserPassRequest,
)
from twisted_socks5.interfaces import (
    AuthResult,
    AuthStep,
    IAuthenticator,
    IAuthNegotiation,
)
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.server import SOCKS5ServerProtocol, State
from twisted_socks5.tap import Options, build_authenticators

GREET_USERPASS = b"\x05\x01\x02"
TARGET = Address(AddressType.IPV4, "127.0.0.1", 80)
CONNECT = Request(Command.CONNECT, TARGET).to_bytes()
OK = b"\x01\x00"
REFUSED = b"\x01\x01"


def login(user: bytes, password: bytes) -> bytes:
    return GREET_USERPASS + UserPassRequest(user, password).to_bytes() + CONNECT


def answer_of(h: Harness) -> bytes:
    """What the server said after its method selection."""
    data = h.take()
    assert data[:2] == b"\x05\x02", data
    return data[2:]


def assert_refused(h: Harness, answer: bytes = REFUSED) -> None:
    assert answer_of(h) == answer
    assert h.closing
    assert h.protocol.state is State.CLOSING
    assert h.connector.calls == []  # the pipelined CONNECT is never honoured


def assert_granted(h: Harness) -> None:
    assert answer_of(h) == OK
    assert not h.closing
    assert len(h.connector.calls) == 1


def harness_for(*auth_args: str, **kw: Any) -> Harness:
    """A server built from ``twistd socks5`` options, as users start it."""
    options = Options()
    options.parseOptions(list(auth_args))
    return Harness(authenticators=build_authenticators(options), **kw)


# --------------------------------------------------------------------------
# The method API cannot grant by omission


def test_auth_result_has_no_default_outcome() -> None:
    with pytest.raises(TypeError):
        AuthResult()
    with pytest.raises(TypeError):
        AuthResult(reply=b"\x01\x01")  # meant as a refusal: must not grant
    with pytest.raises(TypeError):
        AuthResult(reply=b"x", user="alice", avatar=object())
    for truthy in (1, "yes", object()):
        with pytest.raises(TypeError):
            AuthResult(success=truthy)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        AuthResult(done=False, success=True)
    with pytest.raises(TypeError):
        AuthResult(done=0, success=True)  # type: ignore[arg-type]


def test_auth_result_named_constructors() -> None:
    granted = AuthResult.granted(reply=b"ok", user="alice", avatar=1)
    assert (granted.outcome, granted.done, granted.success) == ("granted", True, True)
    assert (granted.reply, granted.user, granted.avatar) == (b"ok", "alice", 1)
    refused = AuthResult.refused(reply=b"no")
    assert (refused.outcome, refused.done, refused.success) == ("refused", True, False)
    more = AuthResult.more(reply=b"chal")
    assert (more.outcome, more.done, more.success) == ("more", False, None)
    # Explicit keyword use of the older API keeps working.
    assert AuthResult(reply=b"x", success=False).outcome == "refused"
    assert AuthResult(reply=b"x", success=True).outcome == "granted"
    assert AuthResult(reply=b"x", done=False).outcome == "more"


class _Plugin:
    """A private METHOD 0x80 whose negotiation the test writes."""

    method = 0x80
    name = "test"

    def __init__(self, negotiation: Callable[[], Any]) -> None:
        self._negotiation = negotiation

    def negotiate(self, client: Any) -> Any:
        return self._negotiation()


def plugin_harness(
    start: Callable[[], Optional[AuthResult]] = lambda: None,
    received: Callable[[bytes], Optional[AuthStep]] = lambda data: None,
) -> Harness:
    @implementer(IAuthNegotiation)
    class Negotiation:
        max_message_size = 16

        def start(self) -> Optional[AuthResult]:
            return start()

        def data_received(self, data: bytes) -> Optional[AuthStep]:
            return received(data)

    plugin = implementer(IAuthenticator)(_Plugin)(Negotiation)
    return Harness(authenticators=[plugin])


def assert_plugin_refused(
    h: Harness, events: EventLoggingObserver, said: bytes = b"\x05\x80"
) -> None:
    assert h.take() == said  # nothing the plugin meant to say
    assert h.closing
    assert h.protocol.state is State.CLOSING
    assert h.protocol.user is None
    assert h.connector.calls == []
    assert h.protocol.outcome == "authenticator error"
    assert [e for e in events if e.get("log_failure") is not None]
    assert h.factory.limits._recent_failures("127.0.0.1") == 1


def test_plugin_that_forgets_the_outcome_is_refused(events: Any) -> None:
    h = plugin_harness(
        received=lambda data: AuthStep(1, AuthResult(reply=b"OK", user="x"))
    )
    h.send(b"\x05\x01\x80" + b"T" + CONNECT)
    assert_plugin_refused(h, events)


def test_plugin_whose_start_forgets_the_outcome_is_refused(events: Any) -> None:
    h = plugin_harness(start=lambda: AuthResult(user="anyone"))
    h.send(b"\x05\x01\x80" + CONNECT)
    assert_plugin_refused(h, events)


def _raise(*args: Any) -> Any:
    raise RuntimeError("plugin bug")


def test_plugin_that_raises_in_data_received_is_refused(events: Any) -> None:
    h = plugin_harness(received=_raise)
    h.send(b"\x05\x01\x80" + b"T" + CONNECT)
    assert_plugin_refused(h, events)


def test_plugin_that_raises_in_start_is_refused(events: Any) -> None:
    h = plugin_harness(start=_raise)
    h.send(b"\x05\x01\x80" + CONNECT)
    assert_plugin_refused(h, events)


@pytest.mark.parametrize(
    "outcome",
    [RuntimeError("backend down"), True, None, "granted"],
    ids=["failed", "true", "none", "text"],
)
def test_plugin_whose_deferred_fails_or_is_not_a_result_is_refused(
    events: Any, outcome: Any
) -> None:
    d: defer.Deferred[Any] = defer.Deferred()
    steps = [AuthStep(1, d)]  # one message, one answer
    h = plugin_harness(received=lambda data: steps.pop() if steps else None)
    h.send(b"\x05\x01\x80" + b"T" + CONNECT)
    assert h.take() == b"\x05\x80"
    if isinstance(outcome, Exception):
        d.errback(outcome)
    else:
        d.callback(outcome)
    assert_plugin_refused(h, events, said=b"")


class Unchecked(AuthResult):
    """A result whose author switched the checks off: only True grants."""

    def __post_init__(self) -> None:
        pass


@pytest.mark.parametrize("success", [1, "yes", None])
def test_only_a_success_of_true_grants(events: Any, success: Any) -> None:
    result = Unchecked(reply=b"OK", success=success)
    h = plugin_harness(received=lambda data: AuthStep(1, result))
    h.send(b"\x05\x01\x80" + b"T" + CONNECT)
    assert h.take() == b"\x05\x80OK"
    assert h.closing
    assert h.protocol.state is State.CLOSING
    assert h.connector.calls == []
    assert h.protocol.outcome == "authentication failed"


# --------------------------------------------------------------------------
# A checker that raises lets nobody in


@implementer(ICredentialsChecker)
class Broken:
    credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials: Any) -> Any:
        raise RuntimeError("database gone")


def test_checker_that_raises_is_refused(events: Any) -> None:
    auth = UsernamePasswordAuthenticator.from_checkers(Broken())
    h = Harness(authenticators=[auth])
    h.send(login(b"alice", b"s3cret"))
    assert_refused(h)
    assert [e for e in events if e.get("log_failure") is not None]


@pytest.mark.parametrize(
    "user",
    [b"\xff\xfe", b"root\x00", b"ro\x00ot"],
    ids=["not-utf8", "nul", "inner-nul"],
)
def test_unix_checker_errors_refuse_from_the_wire(events: Any, user: bytes) -> None:
    """``--auth unix`` raises UnicodeDecodeError / ValueError for these names."""
    h = harness_for("--auth", "unix")
    h.send(login(user, b"whatever"))
    assert_refused(h)
    (failure,) = [e["log_failure"] for e in events if e.get("log_failure")]
    assert failure.check(UnicodeDecodeError, ValueError)


# --------------------------------------------------------------------------
# User names are exact, in every back end

NOT_ALICE = [b"Alice", b"ALICE", b"alice ", b" alice", b"alice\x00", b"alic"]


def _file_backend(tmp_path: Path) -> List[str]:
    path = tmp_path / "users.txt"
    path.write_bytes(b"alice:s3cret\n")
    return ["--auth", f"file:{path}"]


def _htpasswd_backend(tmp_path: Path) -> List[str]:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(b"alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)) + b"\n")
    return ["--auth", f"htpasswd:{path}"]


BACKENDS = {
    "memory": lambda tmp_path: ["--auth", "memory:alice:s3cret"],
    "file": _file_backend,
    "htpasswd": _htpasswd_backend,
}


async def _answer(h: Harness) -> bytes:
    """The RFC 1929 status, once the (maybe threaded) check answered."""
    await until(lambda: h.closing or len(h.connector.calls) > 0, "an answer")
    return answer_of(h)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("user", NOT_ALICE, ids=repr)
@pytest_twisted.ensureDeferred
async def test_user_names_are_exact(tmp_path: Path, backend: str, user: bytes) -> None:
    h = harness_for(*BACKENDS[backend](tmp_path))
    h.send(login(user, b"s3cret"))
    assert await _answer(h) == REFUSED
    assert h.connector.calls == []


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest_twisted.ensureDeferred
async def test_the_exact_name_logs_in(tmp_path: Path, backend: str) -> None:
    h = harness_for(*BACKENDS[backend](tmp_path))
    h.send(login(b"alice", b"s3cret"))
    assert await _answer(h) == OK
    assert h.protocol.user == "alice"


# --------------------------------------------------------------------------
# The failed-login throttle on connections already open


def open_clients(h: Harness, count: int, ip: str = "127.0.0.7") -> List[Any]:
    clients = []
    for port in range(40000, 40000 + count):
        addr = IPv4Address("TCP", ip, port)
        protocol = h.factory.buildProtocol(addr)
        transport = HalfCloseTransport(SERVER, addr)
        protocol.makeConnection(transport)
        assert not protocol.refused
        clients.append(protocol)
    return clients


def _said(protocol: SOCKS5ServerProtocol) -> bytes:
    return protocol.transport.value()[2:]  # type: ignore[no-any-return]


def test_throttle_refuses_a_right_password_on_an_open_connection(
    events: Any,
) -> None:
    h = harness_for("--auth", "memory:alice:s3cret")
    h.factory.limits = ConnectionLimits(
        h.reactor.seconds, max_connections=0, auth_failures=3
    )
    clients = open_clients(h, 6)  # all open before any failure
    for protocol in clients[:3]:
        protocol.dataReceived(login(b"alice", b"wrong"))
        assert _said(protocol) == REFUSED
    late = clients[3]
    late.dataReceived(login(b"alice", b"s3cret"))
    assert _said(late) == REFUSED
    assert late.transport.disconnecting
    assert late.state is State.CLOSING and late.user is None
    assert h.connector.calls == []
    refused = [e for e in events if e.get("event") == "socks5.refused"]
    assert [e["kind"] for e in refused] == ["throttled"]
    # Another address is not affected.
    (other,) = open_clients(h, 1, ip="127.0.0.8")
    other.dataReceived(login(b"alice", b"s3cret"))
    assert _said(other) == OK


@implementer(ICredentialsChecker)
class Slow:
    """A checker whose answers the test gives, one Deferred per check."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self) -> None:
        self.pending: List[Any] = []
        self.checked: List[Any] = []

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:
        d: defer.Deferred[bytes] = defer.Deferred()
        self.pending.append((credentials, d))
        self.checked.append(credentials)
        return d

    def answer(self, index: int = 0) -> None:
        credentials, d = self.pending.pop(index)
        if credentials.password == b"s3cret":
            d.callback(credentials.username)
        else:
            d.errback(UnauthorizedLogin())


def slow_harness(per_client: int = 2, failures: int = 3) -> Any:
    checker = Slow()
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    h = Harness(authenticators=[auth, NoAuthAuthenticator()])
    h.factory.limits = ConnectionLimits(
        h.reactor.seconds,
        max_connections=0,
        auth_failures=failures,
        auth_checks_per_client=per_client,
    )
    return h, checker


def test_throttle_refuses_a_right_password_whose_check_was_running() -> None:
    h, checker = slow_harness(per_client=0)
    right, *wrong = open_clients(h, 4)
    right.dataReceived(login(b"alice", b"s3cret"))
    for protocol in wrong:
        protocol.dataReceived(login(b"alice", b"wrong"))
    assert len(checker.pending) == 4
    for _ in wrong:
        checker.answer(1)
    checker.answer(0)  # the right password, answered after three failures
    assert _said(right) == REFUSED
    assert right.state is State.CLOSING and right.user is None
    assert h.connector.calls == []


def test_parallel_wrong_passwords_are_not_all_evaluated() -> None:
    """200 connections opened first, then 200 wrong passwords."""
    h, checker = slow_harness(per_client=2, failures=5)
    clients = open_clients(h, 200)
    for protocol in clients:
        protocol.dataReceived(login(b"alice", b"wrong"))
    assert len(checker.pending) == 2  # the per-client cap
    evaluated = 0
    while checker.pending:
        checker.answer()
        evaluated += 1
    # Failures are counted as they happen: once five are in, the connections
    # still waiting are refused without a check.
    assert evaluated == 5 + 1  # the cap let one more start meanwhile
    assert all(_said(p) == REFUSED for p in clients)
    assert all(p.state is State.CLOSING for p in clients)
    assert h.factory.limits.checks == {}
    assert h.factory.admission.check_waiters == {}


def test_per_client_cap_lets_the_next_login_go_on_in_turn() -> None:
    h, checker = slow_harness(per_client=2, failures=0)
    clients = open_clients(h, 5)
    for protocol in clients:
        protocol.dataReceived(login(b"alice", b"s3cret"))
    assert len(checker.pending) == 2
    (other,) = open_clients(h, 1, ip="127.0.0.9")  # another address: no wait
    other.dataReceived(login(b"alice", b"s3cret"))
    assert len(checker.pending) == 3
    checker.answer(2)
    assert _said(other) == OK
    for _ in range(5):
        checker.answer()
    assert all(_said(p) == OK for p in clients)
    assert all(p.state is not State.CLOSING for p in clients)


def test_a_waiting_login_that_goes_away_frees_its_place() -> None:
    h, checker = slow_harness(per_client=1, failures=0)
    first, second, third = open_clients(h, 3)
    for protocol in (first, second, third):
        protocol.dataReceived(login(b"alice", b"s3cret"))
    second.transport.disconnected = True
    second.connectionLost(None)
    checker.answer()
    assert len(checker.pending) == 1  # third's, not second's
    checker.answer()
    assert _said(third) == OK
    assert h.factory.admission.check_waiters == {}


def test_a_running_check_is_cancelled_when_its_client_goes() -> None:
    cancelled = []
    d: defer.Deferred[Any] = defer.Deferred(cancelled.append)
    h = plugin_harness(received=lambda data: AuthStep(1, d))
    h.send(b"\x05\x01\x80" + b"T")
    h.lose()
    assert cancelled == [d]
    assert h.factory.limits.checks == {}
    assert h.factory.limits._recent_failures("127.0.0.1") == 0


# --------------------------------------------------------------------------
# Credentials that cannot work refuse to start


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("file:{missing}", "--auth file: no such file"),
        ("htpasswd:{missing}", "--auth htpasswd: no such file"),
        ("file:", "--auth file: needs a file name"),
        ("htpasswd", "--auth htpasswd: needs a file name"),
        ("memory", "--auth memory: no users"),
        ("memory:", "--auth memory: no users"),
    ],
)
def test_credentials_that_cannot_work_are_a_usage_error(
    tmp_path: Path, auth: str, message: str
) -> None:
    from twisted.python import usage

    missing = tmp_path / "nowhere.txt"
    with pytest.raises(usage.UsageError) as excinfo:
        Options().parseOptions(["--auth", auth.format(missing=missing)])
    assert str(excinfo.value).startswith(message)
    assert "\n" not in str(excinfo.value)


def test_existing_credentials_are_accepted(tmp_path: Path) -> None:
    for args in BACKENDS.values():
        options = Options()
        options.parseOptions(args(tmp_path))
        assert [a.name for a in build_authenticators(options)] == ["userpass"]


@settings(deadline=None, max_examples=200)
@given(
    failures=st.integers(1, 4),
    cap=st.integers(0, 3),
    steps=st.lists(
        st.tuples(st.booleans(), st.integers(0, 7), st.booleans()), max_size=40
    ),
)
def test_throttle_holds_whatever_the_order(
    failures: int, cap: int, steps: List[Any]
) -> None:
    """
    Eight connections from one address, logins and answers in any order:
    once ``failures`` failures are in, nothing more is granted; with a cap,
    at most ``failures + cap - 1`` wrong passwords are ever checked.
    """
    h, checker = slow_harness(per_client=cap, failures=failures)
    clients = open_clients(h, 8)
    sent: set[int] = set()

    def granted() -> set[int]:
        return {i for i, p in enumerate(clients) if _said(p) == OK}

    throttled_with: Optional[set[int]] = None
    for is_login, index, right in steps + [(False, 0, True)] * 16:
        if is_login and index not in sent:
            sent.add(index)
            password = b"s3cret" if right else b"wrong"
            clients[index].dataReceived(login(b"alice", password))
        elif not is_login and checker.pending:
            checker.answer(index % len(checker.pending))
        if throttled_with is not None:
            assert granted() == throttled_with
        elif h.factory.limits.throttled("127.0.0.7"):
            throttled_with = granted()
    if cap:
        wrong = [c for c in checker.checked if c.password != b"s3cret"]
        assert len(wrong) <= failures + cap - 1


def test_one_check_at_a_time_per_ipv6_network_and_the_next_goes_on() -> None:
    """The waiters are keyed as the limits count: by /64, not by address."""
    h, checker = slow_harness(per_client=1, failures=0)
    (first,) = open_clients(h, 1, ip="2001:db8::1")
    (second,) = open_clients(h, 1, ip="2001:db8::2")
    (elsewhere,) = open_clients(h, 1, ip="2001:db8:0:1::1")
    for protocol in (first, second, elsewhere):
        protocol.dataReceived(login(b"alice", b"s3cret"))
    assert [c.username for c, _ in checker.pending] == [b"alice", b"alice"]
    assert h.factory.limits.checks == {"2001:db8::/64": 1, "2001:db8:0:1::/64": 1}
    checker.answer(0)
    assert _said(first) == OK
    assert len(checker.pending) == 2  # second's check started in turn
    checker.answer()
    checker.answer()
    assert _said(second) == OK and _said(elsewhere) == OK
    assert h.factory.admission.check_waiters == {} and h.factory.limits.checks == {}


def test_a_busy_checker_refuses_without_counting_a_failure(events: Any) -> None:
    """A full queue is not the client's fault: 01 01, logged busy, not counted."""
    h, checker = slow_harness(per_client=0, failures=1)
    (victim,) = open_clients(h, 1)
    victim.dataReceived(login(b"alice", b"s3cret"))
    _, d = checker.pending.pop()
    d.errback(CheckerBusy())
    assert _said(victim) == REFUSED and victim.state is State.CLOSING
    assert victim.outcome.startswith("login refused: busy")
    assert h.factory.limits._recent_failures("127.0.0.7") == 0
    refused = [e for e in events if e.get("event") == "socks5.refused"]
    assert [e["kind"] for e in refused] == ["busy"]
    (again,) = open_clients(h, 1)  # one failure would have throttled it
    again.dataReceived(login(b"alice", b"s3cret"))
    checker.answer()
    assert _said(again) == OK


def test_only_a_refusal_can_be_busy() -> None:
    assert AuthResult.refused(busy=True).busy
    assert not AuthResult.refused().busy
    with pytest.raises(TypeError):
        AuthResult(success=True, busy=True)
    with pytest.raises(TypeError):
        AuthResult(done=False, busy=True)


def test_the_factory_keeps_its_gate_methods_for_one_release(events: Any) -> None:
    """The gates moved to ``factory.admission``; the old names still work."""
    h, _ = slow_harness(per_client=1, failures=1)
    factory = h.factory
    first, second = open_clients(h, 2)
    factory.wait_for_check(second)
    assert second.parked and factory.admission.check_waiters
    factory.stop_waiting_for_check(second)
    assert not second.parked and factory.admission.check_waiters == {}
    factory.limits.check_started("127.0.0.7")
    factory.check_ended("127.0.0.7")
    assert factory.limits.checks == {}
    assert factory.admit("127.0.0.7")
    factory.authentication_failed(first)
    assert not factory.admit("127.0.0.7")
    factory.login_throttled(first)
    factory.login_busy(first)
    kinds = [e["kind"] for e in events if e.get("event") == "socks5.refused"]
    assert kinds == ["throttled", "throttled", "busy"]
    assert all(
        e["log_namespace"] == "twisted_socks5.server.SOCKS5ServerFactory"
        for e in events
        if e.get("event") == "socks5.refused"
    )
