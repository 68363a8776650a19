"""
The sans-IO handshake machines of twisted_socks5.handshake: every transition
of both tables, every event a table refuses, and properties over arbitrary
input (any split of a stream gives the events of the whole; no input raises
anything but the declared errors).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import Portal
from twisted.internet import defer

from twisted_socks5 import handshake as hs
from twisted_socks5.auth import (
    NoAuthAuthenticator,
    ProxyRealm,
    UsernamePasswordAuthenticator,
)
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Greeting,
    Method,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
    UserPassRequest,
    UserPassStatus,
)
from twisted_socks5.handshake import (
    CLIENT_TRANSITIONS,
    MAX_EARLY_DATA,
    SERVER_TRANSITIONS,
    AuthAccepted,
    AuthContinue,
    Authenticated,
    AuthFailed,
    AuthPending,
    AuthRejected,
    AuthStarted,
    Bound,
    BufferOverflow,
    ClientHandshake,
    ClientState,
    HandshakeError,
    LocalProtocolError,
    MethodAccepted,
    MethodChosen,
    NoMethod,
    Rejected,
    Replied,
    RequestReceived,
    RequestRejected,
    ServerHandshake,
    ServerState,
)
from twisted_socks5.interfaces import AuthResult, AuthStep

TARGET = Address(AddressType.IPV4, "127.0.0.1", 80)
CONNECT = Request(Command.CONNECT, TARGET)
BIND = Request(Command.BIND, TARGET)
CLIENT = object()


class Scripted:
    """A method (IAuthenticator) whose negotiation answers from a script."""

    name = "scripted"

    def __init__(
        self, start: Any = None, steps: Sequence[Any] = (), method: int = 0x80
    ):
        self.method = method
        self._start = start
        self._steps = list(steps)
        self.seen: List[bytes] = []

    def negotiate(self, client: Any) -> Scripted:
        assert client is CLIENT
        return self

    max_message_size = 4

    def start(self) -> Any:
        if isinstance(self._start, Exception):
            raise self._start
        return self._start

    def data_received(self, data: bytes) -> Optional[AuthStep]:
        self.seen.append(data)
        step = self._steps.pop(0)
        if isinstance(step, Exception):
            raise step
        if step is None:
            return None
        return AuthStep(len(data), step)


def server(*authenticators: Any) -> ServerHandshake:
    by_method = {a.method: a for a in authenticators}

    def select(offered: Sequence[int]) -> Any:
        for method in offered:
            if method in by_method:
                return by_method[method]
        return None

    return ServerHandshake(select, AuthResult, CLIENT)


def events(machine: Any) -> List[Any]:
    out = []
    while True:
        event = machine.next_event()
        if event is None:
            return out
        out.append(event)


def greet(*methods: int) -> bytes:
    return Greeting(methods).to_bytes()


# --------------------------------------------------------------------------
# The module stays sans-IO


def test_handshake_imports_no_twisted() -> None:
    source = Path(hs.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert not [name for name in imported if name.startswith(("twisted", "zope"))]
    # And at run time, through the codec too: import it with Twisted blocked
    # (past the package's __init__, which exports Twisted-based classes).
    code = (
        "import sys, types\n"
        "sys.modules['twisted'] = sys.modules['zope'] = None\n"
        "package = types.ModuleType('twisted_socks5')\n"
        f"package.__path__ = [{str(Path(hs.__file__).parent)!r}]\n"
        "sys.modules['twisted_socks5'] = package\n"
        "import twisted_socks5.handshake\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------
# Server: every transition


def test_no_auth_greeting_then_request() -> None:
    machine = server(NoAuthAuthenticator())
    assert machine.state is ServerState.GREETING
    machine.receive_data(greet(0) + CONNECT.to_bytes() + b"early")
    first = machine.next_event()
    assert first == MethodChosen(0, b"\x05\x00")
    assert machine.state is ServerState.AUTHENTICATING
    assert not machine.auth_data_waiting  # start()'s answer comes first
    assert machine.next_event() == Authenticated(b"", None, None)
    assert machine.state is ServerState.REQUEST
    assert machine.next_event() == RequestReceived(CONNECT)
    assert machine.state is ServerState.DONE
    assert machine.next_event() is None
    assert bytes(machine.buffer) == b"early"
    assert machine.method == 0


def test_no_acceptable_method_is_rejected() -> None:
    machine = server(NoAuthAuthenticator())
    machine.receive_data(greet(2, 3))
    assert events(machine) == [Rejected("no acceptable methods", b"\x05\xff")]
    assert machine.state is ServerState.CLOSED
    assert machine.method == Method.NO_ACCEPTABLE_METHODS


def test_more_then_granted() -> None:
    method = Scripted(
        steps=[None, AuthResult.more(b"m"), AuthResult.granted(b"g", user="u")]
    )
    machine = server(method)
    machine.receive_data(greet(0x80) + b"a")
    assert events(machine) == [MethodChosen(0x80, b"\x05\x80")]
    assert machine.auth_data_waiting
    assert machine.state is ServerState.AUTHENTICATING
    machine.receive_data(b"b")
    assert events(machine) == [AuthContinue(b"m")]
    assert machine.state is ServerState.AUTHENTICATING
    machine.receive_data(b"c")
    assert events(machine) == [Authenticated(b"g", "u")]
    assert machine.state is ServerState.REQUEST
    assert method.seen == [b"a", b"ab", b"c"]


def test_refused_closes() -> None:
    machine = server(Scripted(steps=[AuthResult.refused(b"no", user="eve")]))
    machine.receive_data(greet(0x80) + b"x")
    assert events(machine)[1:] == [AuthFailed(b"no", "eve")]
    assert machine.state is ServerState.CLOSED


def test_a_busy_refusal_says_so() -> None:
    # The glue does not count a busy refusal as a failed login.
    busy = AuthResult.refused(b"no", user="eve", busy=True)
    machine = server(Scripted(steps=[busy]))
    machine.receive_data(greet(0x80) + b"x")
    assert events(machine)[1:] == [AuthFailed(b"no", "eve", busy=True)]
    assert machine.state is ServerState.CLOSED
    pending: defer.Deferred[AuthResult] = defer.Deferred()
    machine = server(Scripted(steps=[pending]))
    machine.receive_data(greet(0x80) + b"x")
    events(machine)
    assert machine.auth_result(busy) == AuthFailed(b"no", "eve", busy=True)


def test_pending_check_then_each_outcome() -> None:
    for result, expected, state in [
        (AuthResult.granted(user="u"), Authenticated(b"", "u"), ServerState.REQUEST),
        (AuthResult.refused(b"r"), AuthFailed(b"r"), ServerState.CLOSED),
        (AuthResult.more(b"m"), AuthContinue(b"m"), ServerState.AUTHENTICATING),
    ]:
        pending: defer.Deferred[AuthResult] = defer.Deferred()
        machine = server(Scripted(steps=[pending]))
        machine.receive_data(greet(0x80) + b"x")
        assert events(machine)[1:] == [AuthPending(pending)]
        assert machine.state is ServerState.CHECKING
        assert machine.next_event() is None  # nothing until the result
        assert machine.auth_result(result) == expected
        assert machine.state is state


def test_pending_check_that_fails_refuses() -> None:
    machine = server(Scripted(steps=["opaque"]))
    machine.receive_data(greet(0x80) + b"x")
    assert events(machine)[1:] == [AuthPending("opaque")]
    error = ValueError("checker broke")
    assert machine.auth_error(error) == AuthFailed(error=error)
    assert machine.state is ServerState.CLOSED


# --------------------------------------------------------------------------
# Server: fail closed


@pytest.mark.parametrize(
    "answer",
    [
        None,
        True,
        {"success": True},
        AuthStep(1, AuthResult.granted()),
    ],
)
def test_anything_but_an_auth_result_refuses(answer: Any) -> None:
    # In a step, a non-result is "pending" (the glue waits on it) and then
    # refused when it turns out to be no AuthResult; from start(), at once.
    if answer is not None:  # None from data_received: "not a whole message"
        machine = server(Scripted(steps=[answer]))
        machine.receive_data(greet(0x80) + b"x")
        assert type(events(machine)[1]) is AuthPending
        event = machine.auth_result(answer)
        assert type(event) is AuthFailed and isinstance(event.error, TypeError)
    machine = server(Scripted(start=answer))
    machine.receive_data(greet(0x80))
    got = events(machine)
    if answer is None:  # start() may leave it to data_received
        assert got == [MethodChosen(0x80, b"\x05\x80")]
        assert machine.state is ServerState.AUTHENTICATING
    else:
        assert type(got[1]) is AuthFailed and isinstance(got[1].error, TypeError)
        assert machine.state is ServerState.CLOSED


def test_a_forged_granted_result_is_refused() -> None:
    class Lookalike:
        done = True
        success = True
        reply = b""
        user = "mallory"
        avatar = None

    machine = server(Scripted(start=Lookalike()))
    machine.receive_data(greet(0x80))
    assert type(events(machine)[1]) is AuthFailed


def test_a_method_that_raises_refuses() -> None:
    error = RuntimeError("bug")
    machine = server(Scripted(start=error))
    machine.receive_data(greet(0x80))
    assert events(machine) == [MethodChosen(0x80, b"\x05\x80"), AuthFailed(error=error)]
    error2 = KeyError("bug")
    machine = server(Scripted(steps=[error2]))
    machine.receive_data(greet(0x80) + b"x")
    assert events(machine)[1:] == [AuthFailed(error=error2)]
    assert machine.state is ServerState.CLOSED


def test_a_method_protocol_error_propagates_and_closes() -> None:
    machine = server(Scripted(steps=[ProtocolError("bad")]))
    machine.receive_data(greet(0x80) + b"x")
    machine.next_event()
    with pytest.raises(ProtocolError, match="bad"):
        machine.next_event()
    assert machine.state is ServerState.CLOSED


def test_an_unfinished_auth_message_is_bounded() -> None:
    machine = server(Scripted(steps=[None, None]))
    machine.receive_data(greet(0x80) + b"xyz")
    assert events(machine) == [MethodChosen(0x80, b"\x05\x80")]
    machine.receive_data(b"w")  # max_message_size (4) and still nothing
    with pytest.raises(ProtocolError, match="too long"):
        machine.next_event()


def test_userpass_through_the_real_method() -> None:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
    method = UsernamePasswordAuthenticator(Portal(ProxyRealm(), [checker]))
    machine = server(method)
    machine.receive_data(greet(2) + UserPassRequest(b"alice", b"pw").to_bytes())
    chosen, pending = events(machine)
    assert chosen == MethodChosen(2, b"\x05\x02")
    result = pending.result
    if isinstance(result, defer.Deferred):
        result = result.result
    assert machine.auth_result(result) == Authenticated(
        UserPassStatus(0).to_bytes(), "alice", result.avatar
    )


# --------------------------------------------------------------------------
# Server: malformed input and bounds


def test_bad_greeting_and_bad_request_raise() -> None:
    machine = server(NoAuthAuthenticator())
    machine.receive_data(b"\x04\x01\x00")
    with pytest.raises(ProtocolError):
        machine.next_event()
    assert machine.state is ServerState.CLOSED
    machine = server(NoAuthAuthenticator())
    machine.receive_data(greet(0) + b"\x05\x09\x00\x01" + bytes(6))
    events_before = [machine.next_event(), machine.next_event()]
    assert type(events_before[1]) is Authenticated
    with pytest.raises(ProtocolError) as excinfo:
        machine.next_event()
    assert excinfo.value.reply is ReplyCode.COMMAND_NOT_SUPPORTED
    assert machine.state is ServerState.CLOSED


def test_buffer_is_bounded() -> None:
    machine = server(NoAuthAuthenticator())
    machine.receive_data(b"\x05" * MAX_EARLY_DATA)
    with pytest.raises(BufferOverflow):
        machine.receive_data(b"\x05")
    assert machine.state is ServerState.CLOSED


# --------------------------------------------------------------------------
# Server: illegal events


def test_every_event_outside_the_server_table_raises() -> None:
    every = [
        MethodChosen(0, b""),
        Rejected("", b""),
        AuthContinue(b""),
        AuthPending(None),
        Authenticated(b"", None),
        AuthFailed(),
        RequestReceived(CONNECT),
    ]
    check_table(server, ServerState, SERVER_TRANSITIONS, every)


def check_table(new: Any, states: Any, table: Any, every: List[Any]) -> None:
    """Each event in each state: the table's next state, or LocalProtocolError."""
    assert {kind for _, kind in table} == {type(event) for event in every}
    for state in states:
        for event in every:
            machine = new()
            machine.state = state
            if (state, type(event)) in table:
                assert machine._emit(event) is event
                assert machine.state is table[state, type(event)]
            else:
                with pytest.raises(LocalProtocolError):
                    machine._emit(event)
                assert machine.state is state


def test_results_only_while_checking() -> None:
    for state in ServerState:
        if state is ServerState.CHECKING:
            continue
        machine = server()
        machine.state = state
        with pytest.raises(LocalProtocolError):
            machine.auth_result(AuthResult.granted())
        with pytest.raises(LocalProtocolError):
            machine.auth_error(ValueError())


def test_close_from_any_state_and_nothing_after() -> None:
    for state in ServerState:
        machine = server(NoAuthAuthenticator())
        machine.state = state
        machine.receive_data(greet(0))
        machine.close()
        assert machine.state is ServerState.CLOSED
        assert machine.next_event() is None


# --------------------------------------------------------------------------
# Client: every transition


def client(credentials: Optional[UserPassRequest] = None, request: Request = CONNECT):
    methods: Tuple[int, ...] = (0,) if credentials is None else (0, 2)
    return ClientHandshake(methods, credentials, request)


def test_client_no_auth_connect() -> None:
    machine = client()
    assert machine.state is ClientState.METHOD
    reply = Reply(ReplyCode.SUCCEEDED, TARGET)
    machine.receive_data(b"\x05\x00" + reply.to_bytes() + b"tail")
    assert events(machine) == [
        MethodAccepted(0, CONNECT.to_bytes()),
        Replied(reply),
    ]
    assert machine.state is ClientState.CONNECTED
    assert bytes(machine.buffer) == b"tail"
    machine.receive_data(b"more")
    assert machine.next_event() is None  # the tunnel's bytes, not ours


def test_client_userpass() -> None:
    creds = UserPassRequest(b"u", b"p")
    machine = client(creds)
    machine.receive_data(b"\x05\x02")
    assert events(machine) == [AuthStarted(2, creds.to_bytes())]
    assert machine.state is ClientState.AUTH
    machine.receive_data(b"\x01\x00")
    assert events(machine) == [AuthAccepted(CONNECT.to_bytes())]
    assert machine.state is ClientState.REPLY


def test_client_bind_takes_two_replies() -> None:
    machine = client(request=BIND)
    first = Reply(ReplyCode.SUCCEEDED, TARGET)
    second = Reply(ReplyCode.SUCCEEDED, Address(AddressType.IPV4, "127.0.0.2", 9))
    machine.receive_data(b"\x05\x00" + first.to_bytes())
    assert events(machine)[1:] == [Bound(first)]
    assert machine.state is ClientState.BOUND
    machine.receive_data(second.to_bytes())
    assert events(machine) == [Replied(second)]
    assert machine.state is ClientState.CONNECTED
    # And a BIND whose peer is refused.
    machine = client(request=BIND)
    machine.receive_data(b"\x05\x00" + first.to_bytes())
    events(machine)
    machine.receive_data(Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes())
    assert events(machine) == [RequestRejected(ReplyCode.CONNECTION_NOT_ALLOWED)]
    assert machine.state is ClientState.FAILED


def test_client_failures() -> None:
    machine = client()
    machine.receive_data(b"\x05\xff")
    assert events(machine) == [NoMethod()]
    assert machine.state is ClientState.FAILED
    machine = client(UserPassRequest(b"u", b"p"))
    machine.receive_data(b"\x05\x02\x01\x01")
    assert events(machine)[1:] == [AuthRejected(1)]
    assert machine.state is ClientState.FAILED
    machine = client()
    machine.receive_data(b"\x05\x00" + Reply(ReplyCode.HOST_UNREACHABLE).to_bytes())
    assert events(machine)[1:] == [RequestRejected(ReplyCode.HOST_UNREACHABLE)]
    # A code the RFC does not define is still a refusal, with its code.
    machine = client()
    machine.receive_data(b"\x05\x00\x05\x42\x00\x01" + bytes(6))
    assert events(machine)[1:] == [RequestRejected(0x42)]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"\x04\x00", "malformed SOCKS5 server message"),
        (b"\x05\x02", "which was not offered"),
        (b"\x05\x00\x05\x00\x00\x09" + bytes(6), "malformed SOCKS5 server message"),
    ],
)
def test_client_malformed(data: bytes, message: str) -> None:
    machine = client()
    machine.receive_data(data)
    with pytest.raises(HandshakeError, match=message):
        events(machine)
    assert machine.state is ClientState.FAILED


def test_client_bad_auth_status_is_malformed() -> None:
    machine = client(UserPassRequest(b"u", b"p"))
    machine.receive_data(b"\x05\x02\x02\x00")
    with pytest.raises(HandshakeError):
        events(machine)


def test_every_event_outside_the_client_table_raises() -> None:
    reply = Reply(ReplyCode.SUCCEEDED)
    every = [
        MethodAccepted(0, b""),
        AuthStarted(2, b""),
        AuthAccepted(b""),
        Bound(reply),
        Replied(reply),
        NoMethod(),
        AuthRejected(1),
        RequestRejected(1),
    ]
    check_table(client, ClientState, CLIENT_TRANSITIONS, every)


def test_client_fail_from_any_state() -> None:
    for state in ClientState:
        machine = client()
        machine.state = state
        machine.receive_data(b"\x05\x00")
        machine.fail()
        assert machine.state is ClientState.FAILED
        assert machine.next_event() is None and not machine.buffer


def test_events_compare_and_show_their_fields() -> None:
    assert MethodChosen(0, b"x") != MethodChosen(1, b"x")
    assert MethodChosen(0, b"x") != MethodAccepted(0, b"x")
    assert hash(NoMethod()) == hash(NoMethod())
    assert repr(AuthRejected(1)) == "AuthRejected(status=1)"


# --------------------------------------------------------------------------
# Properties


def _split(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in points + [len(data)]:
        pieces.append(data[last:point])
        last = point
    return pieces


def _run_server(chunks: List[bytes]) -> Tuple[List[Any], Optional[str], bytes]:
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
    userpass = UsernamePasswordAuthenticator(Portal(ProxyRealm(), [checker]))
    machine = server(NoAuthAuthenticator(), userpass)
    out: List[Any] = []
    try:
        for chunk in chunks:
            machine.receive_data(chunk)
            while True:
                event = machine.next_event()
                if event is None:
                    break
                if type(event) is AuthPending:
                    result = event.result
                    if isinstance(result, defer.Deferred):
                        result = result.result  # the in-memory checker is synchronous
                    event = machine.auth_result(result)
                    out.append(("pending", event))
                    continue
                out.append(event)
    except ProtocolError as e:
        return out, f"{type(e).__name__}: {e}", b""
    return out, None, bytes(machine.buffer)


_WIRE = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda methods, creds, req, tail: greet(*methods) + creds + req + tail,
        st.lists(st.sampled_from([0, 2, 0x80]), min_size=1, max_size=3),
        st.sampled_from(
            [b"", UserPassRequest(b"alice", b"pw").to_bytes(), b"\x01\x01a\x01b"]
        ),
        st.sampled_from([CONNECT.to_bytes(), BIND.to_bytes(), b"\x05\x01\x00\x07"]),
        st.binary(max_size=16),
    ),
)


@settings(max_examples=300, deadline=None)
@given(_WIRE, st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_server_any_split_gives_the_same_events(data: bytes, cuts: List[int]) -> None:
    whole = _run_server([data])
    split = _run_server(_split(data, cuts))
    assert split == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6))
def test_client_any_split_gives_the_same_events(data: bytes, cuts: List[int]) -> None:
    def run(chunks: List[bytes]) -> Tuple[List[Any], Optional[str]]:
        machine = client(UserPassRequest(b"u", b"p"))
        out: List[Any] = []
        try:
            for chunk in chunks:
                machine.receive_data(chunk)
                out.extend(events(machine))
        except HandshakeError as e:
            return out, str(e)
        return out, None

    assert run(_split(data, cuts)) == run([data])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_declared_errors(data: bytes) -> None:
    _run_server([data])  # anything else than ProtocolError fails the test
    for request in (CONNECT, BIND):
        machine = client(UserPassRequest(b"u", b"p"), request)
        machine.receive_data(data)
        try:
            events(machine)
        except HandshakeError:
            assert machine.state is ClientState.FAILED
