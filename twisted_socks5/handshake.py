"""
The SOCKS5 handshake as two sans-IO state machines (no Twisted here): the
protocols in :mod:`twisted_socks5.server` and :mod:`twisted_socks5.client`
feed them bytes and act on the events they return.

As in h11's ``_state.py``, each machine has one explicit transition table,
``{(state, event type): next state}``: every event it returns moves it
through the table, and an event the table does not list for the current
state raises :class:`LocalProtocolError` (a bug in the glue, never the
peer's doing).  Bad input from the peer raises
:class:`~twisted_socks5.codec.ProtocolError` (or :class:`HandshakeError` on
the client, :class:`BufferOverflow` past the buffer bound) and moves the
machine to ``CLOSED``/``FAILED``.

Server::

    GREETING --MethodChosen--> AUTHENTICATING --Authenticated--> REQUEST
    GREETING --Rejected--> CLOSED
    AUTHENTICATING --AuthContinue--> AUTHENTICATING
    AUTHENTICATING --AuthPending--> CHECKING --auth_result()--> (as above)
    AUTHENTICATING/CHECKING --AuthFailed--> CLOSED
    REQUEST --RequestReceived--> DONE   (what follows is early data)

Client::

    METHOD --MethodAccepted--> REPLY --Replied--> CONNECTED
    METHOD --AuthStarted--> AUTH --AuthAccepted--> REPLY
    REPLY --Bound--> BOUND --Replied--> CONNECTED   (BIND's two replies)
    METHOD/AUTH/REPLY/BOUND --NoMethod/AuthRejected/RequestRejected--> FAILED
"""

from __future__ import annotations

import enum
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type

from .codec import (
    MAX_GREETING_SIZE,
    MAX_REQUEST_SIZE,
    SOCKS_VERSION,
    Command,
    Method,
    MethodSelection,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
    UserPassRequest,
    parse_greeting,
    parse_method_selection,
    parse_reply,
    parse_request,
    parse_userpass_status,
)

#: Most bytes buffered before the relay starts: pipelined payload that came
#: with the request.  More means a client that is not speaking SOCKS.
MAX_EARLY_DATA = 256 * 1024

_NO_METHODS = MethodSelection(Method.NO_ACCEPTABLE_METHODS).to_bytes()
_KNOWN_REPLY_CODES = frozenset(int(code) for code in ReplyCode)


class LocalProtocolError(Exception):
    """The glue drove a machine out of turn: an event its table does not allow."""


class BufferOverflow(ProtocolError):
    """The peer sent more than :data:`MAX_EARLY_DATA` ahead of the relay."""


class HandshakeError(ProtocolError):
    """The SOCKS server (client side) sent something the RFCs do not allow."""


class Event:
    """An output of a machine; compared by type and fields."""

    __slots__: Tuple[str, ...] = ()

    def _fields(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._fields() == self._fields()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"


# --------------------------------------------------------------------------
# Server


class ServerState(enum.Enum):
    # Identity hash: the table lookup per event stays in C (Enum's own
    # __hash__ is a Python function).
    __hash__ = object.__hash__

    GREETING = "greeting"
    AUTHENTICATING = "authenticating"
    #: A method's asynchronous check is under way: fed back by auth_result().
    CHECKING = "checking"
    REQUEST = "request"
    #: The request is in; anything after it is early data for the relay.
    DONE = "done"
    CLOSED = "closed"


class MethodChosen(Event):
    """Send ``data`` (the METHOD selection); the sub-negotiation begins."""

    __slots__ = ("method", "data")

    def __init__(self, method: int, data: bytes) -> None:
        self.method = method
        self.data = data


class Rejected(Event):
    """Send ``data``, then close: no method the server offers was offered."""

    __slots__ = ("reason", "data")

    def __init__(self, reason: str, data: bytes) -> None:
        self.reason = reason
        self.data = data


class AuthContinue(Event):
    """Send ``data``; the method wants another client message."""

    __slots__ = ("data", "user")

    def __init__(self, data: bytes, user: Optional[str] = None) -> None:
        self.data = data
        self.user = user


class AuthPending(Event):
    """The method answered with something to wait for (a Deferred): the glue
    waits, then feeds the outcome to :meth:`ServerHandshake.auth_result`."""

    __slots__ = ("result",)

    def __init__(self, result: Any) -> None:
        self.result = result


class Authenticated(Event):
    """Send ``data``; the client is in (as ``user``)."""

    __slots__ = ("data", "user", "avatar")

    def __init__(self, data: bytes, user: Optional[str], avatar: Any = None) -> None:
        self.data = data
        self.user = user
        self.avatar = avatar


class AuthFailed(Event):
    """Send ``data``, then close.  ``error`` is set when the method itself
    failed (raised, or answered with no AuthResult): nobody gets in.
    ``busy``: the method could not check now (the AuthResult's ``busy``),
    not the client's fault."""

    __slots__ = ("data", "user", "error", "busy")

    def __init__(
        self,
        data: bytes = b"",
        user: Optional[str] = None,
        error: Optional[BaseException] = None,
        busy: bool = False,
    ) -> None:
        self.data = data
        self.user = user
        self.error = error
        self.busy = busy


class RequestReceived(Event):
    """A whole, well-formed request: the glue dispatches it."""

    __slots__ = ("request",)

    def __init__(self, request: Request) -> None:
        self.request = request


_S = ServerState
SERVER_TRANSITIONS: Dict[Tuple[ServerState, type], ServerState] = {
    (_S.GREETING, MethodChosen): _S.AUTHENTICATING,
    (_S.GREETING, Rejected): _S.CLOSED,
    (_S.AUTHENTICATING, AuthContinue): _S.AUTHENTICATING,
    (_S.AUTHENTICATING, AuthPending): _S.CHECKING,
    (_S.AUTHENTICATING, Authenticated): _S.REQUEST,
    (_S.AUTHENTICATING, AuthFailed): _S.CLOSED,
    (_S.CHECKING, AuthContinue): _S.AUTHENTICATING,
    (_S.CHECKING, Authenticated): _S.REQUEST,
    (_S.CHECKING, AuthFailed): _S.CLOSED,
    (_S.REQUEST, RequestReceived): _S.DONE,
}


class ServerHandshake:
    """
    The server side of one connection's handshake.

    ``select(methods)`` picks an authenticator (an ``IAuthenticator``) for
    the METHODs a greeting offers, or ``None``; its ``negotiate(client)``
    sub-negotiation is run here (``client``: the peer's address, set by the
    glue once it knows it).  Only an instance of ``result_type`` (the
    ``AuthResult`` class) whose ``done`` and ``success`` are ``True`` lets a
    client in: anything else, or a method that raises, refuses it.
    """

    __slots__ = (
        "state",
        "buffer",
        "method",
        "client",
        "_select",
        "_result_type",
        "_negotiation",
        "_queued",
    )

    def __init__(
        self,
        select: Callable[[Sequence[int]], Any],
        result_type: Type[Any],
        client: Any = None,
    ) -> None:
        self.state = ServerState.GREETING
        #: Bytes received and not yet parsed (after DONE: early data).
        self.buffer = bytearray()
        #: The METHOD chosen (0xFF when none was acceptable), once known.
        self.method: Optional[int] = None
        self.client = client
        self._select = select
        self._result_type = result_type
        self._negotiation: Any = None
        #: An event decided ahead of its turn (a method's start() result).
        self._queued: Optional[Event] = None

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; :class:`BufferOverflow` past :data:`MAX_EARLY_DATA`."""
        buffer = self.buffer
        buffer += data
        if len(buffer) > MAX_EARLY_DATA:
            self.state = ServerState.CLOSED
            raise BufferOverflow("too much data before the relay started")

    @property
    def auth_data_waiting(self) -> bool:
        """The next event will hand client bytes to the method (the glue's
        cue for its per-address login limits)."""
        return (
            self.state is ServerState.AUTHENTICATING
            and self._queued is None
            and bool(self.buffer)
        )

    def next_event(self) -> Optional[Event]:
        """The next event, or ``None`` until more data (or a result) comes."""
        queued = self._queued
        if queued is not None:
            self._queued = None
            return self._emit(queued)
        state = self.state
        try:
            if state is ServerState.GREETING:
                return self._greeting()
            if state is ServerState.AUTHENTICATING:
                return self._auth_data()
            if state is ServerState.REQUEST:
                return self._request()
        except ProtocolError:
            self.state = ServerState.CLOSED
            raise
        return None

    def auth_result(self, result: Any) -> Event:
        """The outcome of an :class:`AuthPending` check."""
        if self.state is not ServerState.CHECKING:
            raise LocalProtocolError(f"auth_result in state {self.state.value}")
        return self._emit(self._outcome(result))

    def auth_error(self, error: BaseException) -> Event:
        """An :class:`AuthPending` check failed: nobody gets in."""
        if self.state is not ServerState.CHECKING:
            raise LocalProtocolError(f"auth_error in state {self.state.value}")
        return self._emit(AuthFailed(error=error))

    def close(self) -> None:
        """The glue closes the connection (from any state, as h11's ERROR)."""
        self.state = ServerState.CLOSED
        self._queued = None
        self._negotiation = None

    def _emit(self, event: Event) -> Event:
        try:
            self.state = SERVER_TRANSITIONS[self.state, type(event)]
        except KeyError:
            raise LocalProtocolError(
                f"{type(event).__name__} is not allowed in state {self.state.value}"
            ) from None
        return event

    def _greeting(self) -> Optional[Event]:
        buffer = self.buffer
        parsed = parse_greeting(buffer[:MAX_GREETING_SIZE])
        if parsed is None:
            return None
        greeting, used = parsed
        del buffer[:used]
        authenticator = self._select(greeting.methods)
        if authenticator is None:
            self.method = Method.NO_ACCEPTABLE_METHODS
            return self._emit(Rejected("no acceptable methods", _NO_METHODS))
        method = self.method = authenticator.method
        # MethodSelection(method).to_bytes(), without the dataclass.
        event = MethodChosen(method, bytes((SOCKS_VERSION, method)))
        # The table's entry, looked up in line: next_event only comes here
        # in GREETING (the same below for REQUEST).
        self.state = SERVER_TRANSITIONS[ServerState.GREETING, MethodChosen]
        try:
            self._negotiation = authenticator.negotiate(self.client)
            result = self._negotiation.start()
        except Exception as e:  # noqa: BLE001 - a method's bug lets nobody in
            self._queued = AuthFailed(error=e)
            return event
        if result is not None:
            self._queued = self._outcome(result)
        return event

    def _auth_data(self) -> Optional[Event]:
        buffer = self.buffer
        if not buffer:
            return None
        negotiation = self._negotiation
        limit = negotiation.max_message_size
        try:
            step = negotiation.data_received(bytes(buffer[:limit]))
        except ProtocolError:
            raise
        except Exception as e:  # noqa: BLE001 - a method's bug lets nobody in
            return self._emit(AuthFailed(error=e))
        if step is None:
            if len(buffer) >= limit:
                raise ProtocolError("authentication message too long")
            return None
        del buffer[: step.consumed]
        result = step.result
        if isinstance(result, self._result_type):
            return self._emit(self._outcome(result))
        return self._emit(AuthPending(result))

    def _outcome(self, result: Any) -> Event:
        if not isinstance(result, self._result_type):
            return AuthFailed(error=TypeError(f"not an AuthResult: {result!r}"))
        if result.done is False:
            return AuthContinue(result.reply, result.user)
        self._negotiation = None
        if result.done is True and result.success is True:
            return Authenticated(result.reply, result.user, result.avatar)
        return AuthFailed(
            result.reply, result.user, busy=getattr(result, "busy", False)
        )

    def _request(self) -> Optional[Event]:
        buffer = self.buffer
        if not buffer:  # the usual case right after authentication
            return None
        parsed = parse_request(buffer[:MAX_REQUEST_SIZE])
        if parsed is None:
            return None
        request, used = parsed
        del buffer[:used]
        self.state = SERVER_TRANSITIONS[ServerState.REQUEST, RequestReceived]
        return RequestReceived(request)


# --------------------------------------------------------------------------
# Client


class ClientState(enum.Enum):
    __hash__ = object.__hash__

    METHOD = "waiting for the method selection"
    AUTH = "waiting for the authentication status"
    REPLY = "waiting for the reply"
    #: BIND's first reply is in; the second names the peer.
    BOUND = "waiting for the second reply"
    CONNECTED = "connected"
    FAILED = "failed"


class MethodAccepted(Event):
    """The server chose a method needing nothing more: send ``data`` (the request)."""

    __slots__ = ("method", "data")

    def __init__(self, method: int, data: bytes) -> None:
        self.method = method
        self.data = data


class AuthStarted(Event):
    """The server chose username/password: send ``data`` (the credentials)."""

    __slots__ = ("method", "data")

    def __init__(self, method: int, data: bytes) -> None:
        self.method = method
        self.data = data


class AuthAccepted(Event):
    """The credentials were accepted: send ``data`` (the request)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class Bound(Event):
    """BIND's first reply: the server listens at ``reply.address``."""

    __slots__ = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class Replied(Event):
    """The last successful reply: what follows in the buffer is the tunnel's."""

    __slots__ = ("reply",)

    def __init__(self, reply: Reply) -> None:
        self.reply = reply


class NoMethod(Event):
    """The server accepts none of the offered methods."""

    __slots__ = ()


class AuthRejected(Event):
    """The server refused the credentials (RFC 1929 STATUS)."""

    __slots__ = ("status",)

    def __init__(self, status: int) -> None:
        self.status = status


class RequestRejected(Event):
    """The server answered the request with failure code ``code`` (any byte)."""

    __slots__ = ("code",)

    def __init__(self, code: int) -> None:
        self.code = code


_C = ClientState
CLIENT_TRANSITIONS: Dict[Tuple[ClientState, type], ClientState] = {
    (_C.METHOD, MethodAccepted): _C.REPLY,
    (_C.METHOD, AuthStarted): _C.AUTH,
    (_C.METHOD, NoMethod): _C.FAILED,
    (_C.AUTH, AuthAccepted): _C.REPLY,
    (_C.AUTH, AuthRejected): _C.FAILED,
    (_C.REPLY, Replied): _C.CONNECTED,
    (_C.REPLY, Bound): _C.BOUND,
    (_C.REPLY, RequestRejected): _C.FAILED,
    (_C.BOUND, Replied): _C.CONNECTED,
    (_C.BOUND, RequestRejected): _C.FAILED,
}


def _malformed(e: ProtocolError) -> HandshakeError:
    return HandshakeError(f"malformed SOCKS5 server message: {e}")


class ClientHandshake:
    """
    The client side of one handshake, once the greeting offering
    ``methods`` is sent.  ``credentials`` are sent if the server picks
    username/password; ``request`` once a method is through.
    """

    __slots__ = ("state", "buffer", "methods", "credentials", "request")

    def __init__(
        self,
        methods: Sequence[int],
        credentials: Optional[UserPassRequest],
        request: Request,
    ) -> None:
        self.state = ClientState.METHOD
        #: Bytes received and not yet parsed (after CONNECTED: the tunnel's).
        self.buffer = bytearray()
        self.methods = tuple(methods)
        self.credentials = credentials
        self.request = request

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data`` (each message the server may send is bounded)."""
        self.buffer += data

    def next_event(self) -> Optional[Event]:
        """The next event, or ``None`` until more data comes."""
        state = self.state
        try:
            if state is ClientState.METHOD:
                return self._method()
            if state is ClientState.AUTH:
                return self._auth()
            if state is ClientState.REPLY or state is ClientState.BOUND:
                return self._reply()
        except ProtocolError:
            self.state = ClientState.FAILED
            raise
        return None

    def fail(self) -> None:
        """The glue gave up (cancel, timeout, connection lost)."""
        self.state = ClientState.FAILED
        self.buffer.clear()

    def _emit(self, event: Event) -> Event:
        try:
            self.state = CLIENT_TRANSITIONS[self.state, type(event)]
        except KeyError:
            raise LocalProtocolError(
                f"{type(event).__name__} is not allowed in state {self.state.value}"
            ) from None
        return event

    def _method(self) -> Optional[Event]:
        buffer = self.buffer
        try:
            parsed = parse_method_selection(buffer)
        except ProtocolError as e:
            raise _malformed(e) from None
        if parsed is None:
            return None
        selection, used = parsed
        del buffer[:used]
        method = selection.method
        if method == Method.NO_ACCEPTABLE_METHODS:
            return self._emit(NoMethod())
        if method not in self.methods:
            raise HandshakeError(
                f"SOCKS5 server chose method 0x{method:02x}, which was not offered"
            )
        credentials = self.credentials
        if method == Method.USERNAME_PASSWORD and credentials is not None:
            return self._emit(AuthStarted(method, credentials.to_bytes()))
        return self._emit(MethodAccepted(method, self.request.to_bytes()))

    def _auth(self) -> Optional[Event]:
        buffer = self.buffer
        try:
            parsed = parse_userpass_status(buffer)
        except ProtocolError as e:
            raise _malformed(e) from None
        if parsed is None:
            return None
        status, used = parsed
        del buffer[:used]
        if not status.ok:
            return self._emit(AuthRejected(status.status))
        return self._emit(AuthAccepted(self.request.to_bytes()))

    def _reply(self) -> Optional[Event]:
        buffer = self.buffer
        try:
            parsed = parse_reply(buffer)
        except ProtocolError as e:
            if (
                len(buffer) > 1
                and buffer[0] == SOCKS_VERSION
                and buffer[1] not in _KNOWN_REPLY_CODES
            ):
                # A reply code the RFC does not define: still the server
                # saying no, and saying which way.
                return self._emit(RequestRejected(buffer[1]))
            raise _malformed(e) from None
        if parsed is None:
            return None
        reply, used = parsed
        del buffer[:used]
        if reply.reply != ReplyCode.SUCCEEDED:
            return self._emit(RequestRejected(reply.reply))
        if self.state is ClientState.REPLY and self.request.command is Command.BIND:
            return self._emit(Bound(reply))
        return self._emit(Replied(reply))
