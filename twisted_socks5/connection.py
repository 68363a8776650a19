"""
One client connection: the SOCKS5 server protocol, the Twisted layer that
moves bytes and state.  Parsing lives in :mod:`twisted_socks5.codec`, the
server's settings and its gates in its factory
(:class:`twisted_socks5.server.SOCKS5ServerFactory`, which the protocol
sees as a :class:`Server`; its public home is :mod:`twisted_socks5.server`).

One connection walks this machine (``State``)::

    GREETING --(method chosen)--> AUTHENTICATING --(success)--> REQUEST
    REQUEST --(CONNECT)--> CONNECTING --(connected)--> RELAYING
    any state --(error, refusal, timeout)--> CLOSING

The handshake itself (greeting, method, sub-negotiation, request) is
:class:`twisted_socks5.handshake.ServerHandshake`, sans-IO: the protocol
feeds it bytes and acts on its events, mirroring its progress in ``state``.
Every state before RELAYING is covered by the handshake timeout and by a
bound on buffered input; input is parsed greedily so that a client may
pipeline its greeting, credentials, request and first payload in one segment.
The login's steps are :mod:`twisted_socks5.admission`'s, a request's its
command handler's (:mod:`twisted_socks5.commands`).
"""

from __future__ import annotations

import enum
from typing import Any, Callable, ClassVar, Dict, Optional, Protocol, Sequence

from twisted.internet import defer, protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from . import admission
from ._twisted import awaiting_proxy_header
from .admission import Admission
from .bind import BindWaiter
from .codec import (
    NULL_ADDRESS,
    Address,
    Method,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
)
from .commands import handler_for
from .handshake import (
    AuthContinue,
    Authenticated,
    AuthFailed,
    AuthPending,
    BufferOverflow,
    Event,
    MethodChosen,
    Rejected,
    RequestReceived,
    ServerHandshake,
    ServerState,
)
from .interfaces import AuthResult, IAuthenticator
from .limits import checking_client
from .relay import OutboundProtocol, RelayCounters
from .tunnel import (
    AssociationSettings,
    Tunnel,
    Watched,
    check_association,
    watch_association,
)
from .udp import UDPAssociation
from .writenow import write_now

#: While a CONNECT is being connected the client is still read (so that one
#: that resets or leaves is noticed at once and the attempt cancelled), and
#: only paused once it has sent this much ahead of the reply.
EARLY_DATA_PAUSE = 64 * 1024


class State(enum.Enum):
    GREETING = "greeting"
    AUTHENTICATING = "authenticating"
    REQUEST = "request"
    CONNECTING = "connecting"
    BINDING = "binding"
    ASSOCIATED = "associated"
    RELAYING = "relaying"
    CLOSING = "closing"


#: The protocol states in which the handshake runs.
_HANDSHAKING = frozenset((State.GREETING, State.AUTHENTICATING, State.REQUEST))


#: The state of each value (a command handler names its phase by value).
_PHASES: Dict[Optional[str], State] = {state.value: state for state in State}


class Server(AssociationSettings, Protocol):
    """What a connection uses of its factory (a ``SOCKS5ServerFactory``)."""

    handshake_timeout: float
    admission: Admission
    #: Its :class:`~twisted_socks5.metrics.Metrics`, when enabled.
    metrics: Any

    def select_authenticator(
        self, offered: Sequence[int]
    ) -> Optional[IAuthenticator]: ...

    def unwatch_activity(self, watched: Watched) -> None: ...

    def connection_closed(self, protocol: Any, reason: Failure) -> None: ...


@implementer(IHalfCloseableProtocol)
class SOCKS5ServerProtocol(protocol.Protocol, TimeoutMixin):
    """One client connection."""

    @property
    def log(self) -> Logger:
        """Its logger, per use as ``Logger()``'s, in its ``server.py`` namespace."""
        return Logger("twisted_socks5.server.SOCKS5ServerProtocol", self)

    factory: Server
    transport: Any

    def __init__(self, factory: Server) -> None:
        self.factory = factory
        self.state = State.GREETING
        #: The sans-IO handshake (see :mod:`twisted_socks5.handshake`).
        self.handshake = ServerHandshake(factory.select_authenticator, AuthResult)
        #: Its buffer: after the request, early data for the relay.
        self._buffer = self.handshake.buffer
        self._waiting = False
        #: A credential check under way (dropped if the client goes).
        self.checking: Optional[defer.Deferred[Any]] = None
        #: Waiting for a check from the same address to end.
        self.parked = False
        #: The look-up or connect under way (cancelled if the client goes).
        self.pending: Optional[defer.Deferred[Any]] = None
        self._client_eof = False
        #: The rules' answer to the request (its route, when final).
        self.decision: Any = None
        #: When a UDP association last saw a datagram (see tunnel.py).
        self.silent_since = 0.0
        #: The relaying pair, once the request succeeded (see tunnel.py).
        self.tunnel: Optional[Tunnel] = None
        #: A BIND's wait for its peer.
        self.binding: Optional[BindWaiter] = None
        #: The UDP relay of an UDP ASSOCIATE.
        self.udp: Optional[UDPAssociation] = None
        #: The peer that connected to a BIND.
        self.peer: Optional[Address] = None
        self.counters = RelayCounters()
        # Facts for the connection's log event.
        self.client_ip = ""
        #: Closed at once by a limit or the rules (logged by the factory).
        self.refused = False
        #: Counted by the limits as from ``client_ip`` (not yet, behind a
        #: PROXY header still to come).
        self.identified = False
        #: Holds a UDP association's extra descriptors in the limits.
        self.udp_counted = False
        self.started = 0.0
        self.client: Optional[Address] = None
        self.method: Optional[int] = None
        self.user: Optional[str] = None
        self.request: Optional[Request] = None
        self.reply: Optional[ReplyCode] = None
        self.bound: Optional[Address] = None
        #: What ended the connection, when it was told (see ``outcome``).
        self._why: Optional[str] = None
        #: The access rule that denied this connection, if one did.
        self.rule: Optional[str] = None

    #: Whether a PROXY header (``haproxy:``) names the client: set only then,
    #: so other connections pay nothing for it.
    behind_proxy = False
    #: The address an --outgoing set made a connection leave from (for the
    #: log): set only then.
    outgoing: Optional[str] = None
    # i16-log: set only when an access log or revocation needs them.
    #: The address a CONNECT reached (see ``commands/connect.py``).
    resolved: Optional[Address] = None
    #: The address the client connected to, for the access log.
    listener: Optional[str] = None
    #: A fingerprint of the password-file entry the user logged in with.
    credential: Optional[bytes] = None
    #: Why the connection was revoked (:mod:`twisted_socks5.revocation`).
    revoked: Optional[str] = None

    # TimeoutMixin schedules through this, so tests drive it with a Clock.
    def callLater(self, delay: float, f: Callable[..., Any], *a: Any) -> Any:  # type: ignore[override]
        return self.factory.reactor.callLater(delay, f, *a)

    # ------------------------------------------------------------------
    # Twisted callbacks

    def connectionMade(self) -> None:
        self.started = self.factory.reactor.seconds()
        self.setTimeout(self.factory.handshake_timeout)
        if awaiting_proxy_header(self.transport):
            # Behind the haproxy: endpoint the wrapper connects us before the
            # PROXY header arrives: counted from now against the server's
            # limits (a silent client holds a slot too); the client's own
            # limits and the rules wait for the header to name it.
            self.behind_proxy = True
            admission.admit_connection(self, identified=False)
            return
        admission.admit_connection(self)

    def refuse(self) -> None:
        """Drop the connection unanswered (a limit or the rules refused it)."""
        self.refused = True
        self.state = State.CLOSING
        self.setTimeout(None)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.RELAYING:
            tunnel = self.tunnel
            counters = self.counters
            counters.bytes_up += len(data)
            counters.active = True
            failed = write_now(tunnel.outbound.transport, data)  # type: ignore[union-attr]
            if failed is not None:
                tunnel.target_failed(str(failed.strerror))  # type: ignore[union-attr]
                return
            if counters.due_for_splice():
                tunnel.hand_over_to_splice()  # type: ignore[union-attr]
            return
        if self.state is State.CLOSING:
            return
        if not self.identified and not admission.identify_connection(self):
            return
        if self.state is State.ASSOCIATED:
            # RFC 1928 gives the control connection nothing more to carry.
            self.counters.bytes_up += len(data)
            return
        handshake = self.handshake
        try:
            handshake.receive_data(data)
        except BufferOverflow as e:
            self._abort(str(e))
            return
        if self._waiting and len(handshake.buffer) >= EARLY_DATA_PAUSE:
            self.transport.pauseProducing()  # back-pressure until the relay
        self._process()

    def readConnectionLost(self) -> None:
        """The client sent EOF (half-close)."""
        self._client_eof = True
        if self.state is State.RELAYING:
            self.tunnel.client_ended()  # type: ignore[union-attr]
        elif self.state is State.ASSOCIATED:
            self.outcome = "association ended by the client"
            self.close()
        elif self.state is State.BINDING:
            self.outcome = "client went away while binding"
            self.close()
        elif self.state is not State.CONNECTING:
            # EOF before a request is complete: nothing will follow.
            if self.state is not State.CLOSING:
                self.outcome = "client closed during handshake"
            self.close()

    def writeConnectionLost(self) -> None:
        """Our EOF to the client has been sent."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.state = State.CLOSING
        self.setTimeout(None)
        if self.refused:
            return
        self.factory.unwatch_activity(self)
        if self.parked:
            self.factory.admission.stop_waiting_for_check(self)
        if self.checking is not None:
            self.checking.cancel()
        if self.binding is not None:
            waiter, self.binding = self.binding, None
            waiter.cancel()
        if self.udp is not None:
            self.udp.close()
            if self.udp_counted:
                self.udp_counted = False
                self.factory.limits.udp_ended()
        if self.pending is not None:
            self.outcome = "client went away while connecting"
            d, self.pending = self.pending, None
            d.cancel()
        if self.tunnel is not None:
            self.tunnel.close(reason)
        self.factory.connection_closed(self, reason)

    def timeoutConnection(self) -> None:
        self._abort(f"handshake timeout in state {self.state.value}")

    # ------------------------------------------------------------------
    # Handshake

    def _process(self) -> None:
        """Act on the handshake's events until it needs more input."""
        handshake = self.handshake
        while not self._waiting and self.state in _HANDSHAKING:
            before = handshake.state
            checking = None
            if before is ServerState.AUTHENTICATING and handshake.auth_data_waiting:
                if not admission.may_check(self):
                    return
                # Whom a check started now is for: a hash pool's fair share.
                checking = checking_client.set(self.factory.limits.key(self.client_ip))
            try:
                event = handshake.next_event()
            except ProtocolError as e:
                self._protocol_error(e, before)
                return
            finally:
                if checking is not None:
                    checking_client.reset(checking)
            if event is None:
                return
            self._ON_EVENT[type(event)](self, event)

    def _protocol_error(self, e: ProtocolError, state: ServerState) -> None:
        self.outcome = f"protocol error: {e}"
        if state is ServerState.REQUEST and e.reply is not None:
            self.send_reply(e.reply)
        self.close()

    def _method_chosen(self, event: MethodChosen) -> None:
        self.method = event.method
        write_now(self.transport, event.data)
        self.state = State.AUTHENTICATING

    def _rejected(self, event: Rejected) -> None:
        self.method = Method.NO_ACCEPTABLE_METHODS
        self.outcome = event.reason
        self.transport.write(event.data)
        self.close()

    def _authenticated(self, event: Authenticated) -> None:
        if admission.authenticated(self, event):
            self.state = State.REQUEST
            credentials = getattr(self.factory, "credentials", None)
            if credentials is not None and self.user is not None:
                self.credential = credentials.fingerprint(self.user)

    def handle_event(self, event: Event) -> None:
        """Act on a handshake event (also one a check answered later)."""
        self._ON_EVENT[type(event)](self, event)

    def _on_request(self, event: RequestReceived) -> None:
        """Dispatch: the rules' first answer, then the command's handler."""
        request = self.request = event.request
        handler = handler_for(self, request)
        if handler is None:
            return
        if handler.phase is not None:
            self.state = _PHASES[handler.phase]
            # The client has done its part; the command's own timeouts bound
            # the rest (a connect's expiry is answered, 0x06, not cut short).
            self.setTimeout(None)
        handler.handle(self, request)

    #: The handler of each handshake event: plain functions (bound methods
    #: kept on the instance would make every connection a reference cycle,
    #: left for the cyclic garbage collector instead of freed at close).
    _ON_EVENT: ClassVar[Dict[type, Callable[[Any, Any], None]]] = {
        MethodChosen: _method_chosen,
        Rejected: _rejected,
        AuthContinue: admission.auth_said,
        AuthPending: admission.auth_pending,
        Authenticated: _authenticated,
        AuthFailed: admission.auth_failed,
        RequestReceived: _on_request,
    }

    # ------------------------------------------------------------------
    # What a command handler may use (commands.base.RequestContext)

    @property
    def policy_ip(self) -> str:
        """The client IP the rules see (UNIX-socket clients are local)."""
        return self.client_ip or "127.0.0.1"

    @property
    def closing(self) -> bool:
        """Whether the connection is closing (a command's work is moot)."""
        return self.state is State.CLOSING

    @property
    def outcome(self) -> str:
        """The connection log's text: what ended it, else its state's."""
        tunnel = self.tunnel
        if tunnel is not None:
            return tunnel.outcome
        if self._why is not None:
            return self._why
        if self.udp is not None:
            if self.state is State.ASSOCIATED:
                return "associated"
            return "association ended"
        return "closed during handshake"

    @outcome.setter
    def outcome(self, text: str) -> None:
        if self.tunnel is not None:
            self.tunnel.why = text
        else:
            self._why = text

    def deny(self, rule: str) -> None:
        self.rule = rule
        self.fail(ReplyCode.CONNECTION_NOT_ALLOWED, f"denied by {rule}")

    def start_tunnel(self, peer: OutboundProtocol) -> None:
        """Both ends are connected and the reply is queued: move bytes."""
        self.state = State.RELAYING
        self.setTimeout(None)
        early = bytes(self._buffer)
        self._buffer = bytearray()
        tunnel = self.tunnel = Tunnel(
            self.factory, self.transport, peer, self.counters, self._client_eof
        )
        if tunnel.start(early, self.factory.reactor.seconds()):
            self.unwait(None)
            if self.counters.due_for_splice():  # early data alone may be enough
                tunnel.hand_over_to_splice()

    def associated(self) -> None:
        """The UDP association is up: the control connection only waits."""
        self.state = State.ASSOCIATED
        self.setTimeout(None)
        self._buffer.clear()
        watch_association(self)

    def check_activity(self, now: float) -> None:
        """The watch looks at a UDP association (tunnels: Tunnel's)."""
        check_association(self, now)

    # ------------------------------------------------------------------
    # Helpers

    def send_reply(self, code: ReplyCode, address: Optional[Address] = None) -> None:
        first = self.reply is None
        self.reply = code
        if first and self.factory.metrics is not None:
            self.factory.metrics.replied(self)
        write_now(self.transport, Reply(code, address or NULL_ADDRESS).to_bytes())

    def fail(self, code: ReplyCode, outcome: str) -> None:
        """Answer the request with a failure code, then close (RFC 1928 s. 6)."""
        self.outcome = outcome
        self.send_reply(code)
        self.close()

    def wait(self) -> None:
        """Stop reading the client while something asynchronous runs."""
        self._waiting = True
        self.transport.pauseProducing()

    def hold(self) -> None:
        """
        Stop parsing while the outbound connection is made, but keep reading:
        a client that resets meanwhile cancels the attempt at once (a paused
        socket is not watched), its EOF is remembered for the relay, and
        data it sends ahead is kept for the destination, the client being
        paused past ``EARLY_DATA_PAUSE`` bytes.  It also spares two
        ``epoll_ctl`` calls per tunnel.
        """
        self._waiting = True

    def unwait(self, result: Any) -> Any:
        self._waiting = False
        if self.state is not State.CLOSING and not self.transport.disconnected:
            self.transport.resumeProducing()
            if self.state is not State.RELAYING:
                self._process()
        return result

    def close(self) -> None:
        """Close after the queued reply has been written."""
        self.state = State.CLOSING
        self._buffer.clear()
        self.transport.loseConnection()

    def _abort(self, why: str) -> None:
        self.outcome = why
        self.state = State.CLOSING
        self._buffer.clear()
        self.transport.abortConnection()
