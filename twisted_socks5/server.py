"""
The SOCKS5 server protocol and factory: the Twisted layer that moves bytes
and state.  Parsing lives in :mod:`twisted_socks5.codec`.

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
"""

from __future__ import annotations

import enum
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from . import admission
from ._twisted import awaiting_proxy_header
from .admission import Admission
from .auth import NoAuthAuthenticator
from .bind import BindWaiter
from .codec import (
    NULL_ADDRESS,
    Address,
    Command,
    Method,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
)
from .commands import HANDLERS, ICommandHandler, handler_for
from .handshake import MAX_EARLY_DATA as MAX_EARLY_DATA
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
from .limits import ConnectionLimits, checking_client
from .logs import log_connection
from .metrics import Metrics
from .outbound import DirectConnector, IOutboundConnector
from .relay import OutboundProtocol, RelayCounters
from .reloading import reload_all, reloadables
from .rules import AllowAll, IPolicy
from .selfnet import HostAddresses, default_host
from .tunnel import (
    ActivityWatch,
    Tunnel,
    Watched,
    check_association,
    watch_association,
)
from .udp import UDPAssociation
from .writenow import write_now

#: ``protect_host``'s default: the proxy host is no destination for clients
#: that connected to a non-loopback address of it (the factory cannot know
#: how it listens; a client that came in on loopback is on this host anyway).
PROTECT_WHEN_EXPOSED = "when-exposed"

#: While a CONNECT is being connected the client is still read (so that one
#: that resets or leaves is noticed at once and the attempt cancelled), and
#: only paused once it has sent this much ahead of the reply.
EARLY_DATA_PAUSE = 64 * 1024

#: Bytes a tunnel moves by copying before the splice relay takes over.
DEFAULT_SPLICE_AFTER = 64 * 1024


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


@implementer(IHalfCloseableProtocol)
class SOCKS5ServerProtocol(Protocol, TimeoutMixin):
    """One client connection."""

    log = Logger()
    factory: SOCKS5ServerFactory
    transport: Any

    def __init__(self, factory: SOCKS5ServerFactory) -> None:
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


class SOCKS5ServerFactory(Factory):
    """
    A SOCKS5 server for any Twisted stream endpoint::

        from twisted.internet import endpoints, reactor
        from twisted_socks5 import SOCKS5ServerFactory

        endpoints.serverFromString(reactor, "tcp:1080").listen(SOCKS5ServerFactory())

    :param authenticators: the methods offered, in the server's order of
        preference; a client gets the first one it also offers.  Default:
        no authentication only.
    :param connector: opens outbound connections; default
        :class:`~twisted_socks5.outbound.DirectConnector`.
    :param handshake_timeout: seconds from accept to the start of the relay.
    :param connect_timeout: seconds for an outbound connect, name
        resolution included.
    :param idle_timeout: close a tunnel after this many seconds without a
        byte either way; ``None`` (the default) never does.
    :param stall_timeout: close a tunnel that moved nothing for this many
        seconds while bytes wait for a peer that does not read (flow control
        then stops watching the other peer, whose departure would go
        unnoticed); ``None`` never does.  Unlike ``idle_timeout``, a quiet
        tunnel with nothing waiting is left alone.
    :param splice: move bytes with ``os.splice`` through kernel pipes when
        both ends are plain TCP sockets on Linux (on by default); the
        ordinary relay serves everything else, or everything when ``False``.
    :param splice_after: bytes (both ways together) a tunnel moves on the
        ordinary relay before it is handed to the splice relay (default
        64 KiB): short tunnels never pay for pipes.  ``0``: splice from the
        first byte after the reply.
    :param bind_timeout: seconds a BIND waits for its peer (answer 0x06).
    :param bind_ports: the ports (``(low, high)``, inclusive) a BIND for
        ``0.0.0.0:PORT`` may listen on as the client asks; any other port
        asked for, or none configured (the default), gets a port the system
        chooses, so that no client squats a port of the proxy's address.
    :param udp_idle_timeout: close a UDP association after this many seconds
        without a datagram either way (default 300), so that idle
        associations do not hold connection slots for ever; ``None`` never.
    :param udp_allow_unknown_sources: relay UDP answers from addresses the
        client never sent to (some NAT traversal needs it); off by default.
    :param commands: the commands served; others get 0x07.
    :param limits: connection limits and failed-login throttling; default
        :class:`~twisted_socks5.limits.ConnectionLimits` with its defaults.
    :param policy: access rules (:class:`~twisted_socks5.rules.IPolicy`),
        e.g. a :class:`~twisted_socks5.rules.RuleSet`; default: allow all.
    :param routes: connectors by name, for the rules' ``via NAME``
        (``direct`` is built in), e.g. ``{"tor": UpstreamConnector(...)}``.
    :param protect_host: the proxy host's addresses
        (:class:`~twisted_socks5.selfnet.HostAddresses`): destinations among
        them are refused (0x02) unless the rule allowing them names ``self``.
        By default (:data:`PROTECT_WHEN_EXPOSED`) that holds for clients that
        connected to a non-loopback address of this host, so that a factory
        listening on every interface protects its host without being told;
        ``twistd socks5`` passes the host's addresses when a listener is
        reachable from other hosts, and ``None`` (no protection) when all
        listen on loopback or ``--allow-self-destinations`` is given.
        Unspecified destinations (``0.0.0.0/8``, ``::``) are refused whatever
        this says.
    """

    log = Logger()
    protocol = SOCKS5ServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        authenticators: Optional[Sequence[IAuthenticator]] = None,
        *,
        reactor: Any = None,
        connector: Optional[IOutboundConnector] = None,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
        idle_timeout: Optional[float] = None,
        splice: bool = True,
        splice_after: int = DEFAULT_SPLICE_AFTER,
        stall_timeout: Optional[float] = 300.0,
        bind_timeout: float = 120.0,
        bind_ports: Optional[Tuple[int, int]] = None,
        udp_idle_timeout: Optional[float] = 300.0,
        udp_allow_unknown_sources: bool = False,
        commands: Sequence[Command] = (
            Command.CONNECT,
            Command.BIND,
            Command.UDP_ASSOCIATE,
        ),
        limits: Optional[ConnectionLimits] = None,
        policy: Optional[IPolicy] = None,
        routes: Optional[Dict[str, IOutboundConnector]] = None,
        protect_host: Union[HostAddresses, str, None] = PROTECT_WHEN_EXPOSED,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.reactor = reactor
        if authenticators is None:
            authenticators = [NoAuthAuthenticator()]
        if not authenticators:
            raise ValueError("at least one authentication method is needed")
        self.authenticators = list(authenticators)
        self.connector = connector or DirectConnector(reactor, connect_timeout)
        #: Named routes for rules' ``via NAME``; ``direct`` is always there.
        self.routes: Dict[str, IOutboundConnector] = dict(routes or {})
        self.routes.setdefault("direct", DirectConnector(reactor, connect_timeout))
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.stall_timeout = stall_timeout
        #: Relay with os.splice() when both ends are plain TCP sockets.
        self.splice = splice
        self.splice_after = splice_after
        self.bind_timeout = bind_timeout
        self.bind_ports = bind_ports
        self.udp_idle_timeout = udp_idle_timeout
        self.udp_allow_unknown_sources = udp_allow_unknown_sources
        self.commands = frozenset(commands)
        #: The handler of each command (see :mod:`twisted_socks5.commands`).
        self.handlers: Dict[Command, ICommandHandler] = dict(HANDLERS)
        self.active: set[SOCKS5ServerProtocol] = set()
        self.limits = limits or ConnectionLimits(reactor.seconds)
        #: The access rules; ``None`` allows everything (and costs nothing).
        self.policy: Optional[IPolicy] = (
            None if policy is None or isinstance(policy, AllowAll) else policy
        )
        #: Refuse destinations on this host unless a rule names ``self``:
        #: always (a :class:`HostAddresses`), never (``None``), or for clients
        #: that came in on a non-loopback address (:data:`PROTECT_WHEN_EXPOSED`).
        self.protect_when_exposed = protect_host == PROTECT_WHEN_EXPOSED
        if isinstance(protect_host, str):
            if not self.protect_when_exposed:
                raise ValueError(f"protect_host: unknown mode {protect_host!r}")
            protect_host = default_host()
        self.protect_host: Optional[HostAddresses] = protect_host
        self.draining = False
        self._drained: List[defer.Deferred[None]] = []
        #: Tunnels and associations under the idle/stall watch.
        self.watch = ActivityWatch(reactor, self._watch_periods)
        #: Prometheus metrics, once :meth:`enable_metrics` was called.
        self.metrics: Optional[Metrics] = None
        #: Who gets in: the connection and login gates (admission.py).
        self.admission = Admission(self)

    @property
    def methods(self) -> list[int]:
        """METHOD codes offered, in order of preference."""
        return [int(a.method) for a in self.authenticators]

    def buildProtocol(self, addr: Any) -> SOCKS5ServerProtocol:  # type: ignore[override]
        return SOCKS5ServerProtocol(self)

    def watch_activity(self, watched: Watched) -> None:
        """Check ``watched`` (a UDP association's protocol) for silence."""
        self.watch.add(watched)

    def unwatch_activity(self, watched: Watched) -> None:
        """Stop checking ``watched``; the timer goes with the last one."""
        self.watch.discard(watched)

    def _watch_periods(self) -> List[float]:
        timeouts = (self.idle_timeout, self.stall_timeout, self.udp_idle_timeout)
        return [t for t in timeouts if t]

    def identify(self, protocol: SOCKS5ServerProtocol) -> bool:
        """
        A client counted since accept was named by its PROXY header: its
        own limits and the rules now.  Refused, it is no longer counted.
        """
        if self.admission.identify(protocol.client_ip):
            return True
        if protocol in self.active:
            self.active.discard(protocol)
            self.limits.closed(None)
        return False

    def drain(self, timeout: float) -> defer.Deferred[None]:
        """
        Stop taking clients and wait for the open ones to finish, aborting
        those still open after ``timeout`` seconds (a graceful stop).
        """
        self.draining = True
        done: defer.Deferred[None] = defer.Deferred()
        if not self.active:
            done.callback(None)
            return done
        self._drained.append(done)

        def expire() -> None:
            for protocol in list(self.active):
                protocol.outcome = "aborted at shutdown"
                protocol.transport.abortConnection()

        call = self.reactor.callLater(timeout, expire)

        def cancel_timer(result: None) -> None:
            if call.active():
                call.cancel()

        return done.addCallback(cancel_timer)

    def bind_port_for(self, requested: Address) -> int:
        """
        The port a BIND listens on: the one a ``0.0.0.0:PORT`` request asks
        for only inside ``bind_ports``; else 0, a port the system picks.
        """
        if self.bind_ports is None or not requested.is_unspecified:
            return 0
        low, high = self.bind_ports
        return requested.port if low <= requested.port <= high else 0

    def connector_for(self, route: Optional[str]) -> IOutboundConnector:
        """The connector of a rule's ``via`` route (``None``: the default)."""
        if route is None:
            return self.connector
        return self.routes[route]

    def select_authenticator(self, offered: Sequence[int]) -> Optional[IAuthenticator]:
        """The first of our methods, in our order, that the client offers."""
        for authenticator in self.authenticators:
            if authenticator.method in offered:
                return authenticator
        return None

    # Hooks, overridable, for limits and accounting.

    def connection_opened(self, protocol: SOCKS5ServerProtocol) -> None:
        self.active.add(protocol)
        self.limits.opened(protocol.client_ip if protocol.identified else None)

    def reloadables(self) -> List[Any]:
        """
        Everything with a ``reload()``: the access rules, authenticators
        (plugins included) and the credential checkers behind them.
        """
        return reloadables(self.protect_host, self.policy, self.authenticators)

    def reload(self) -> None:
        """
        Re-read configuration files (SIGHUP) without touching open tunnels;
        a file that fails to load keeps its old contents, and the log says why.
        """
        reload_all(self.reloadables(), self.log)

    # Kept for one release: the gates are the factory's ``admission`` now
    # (:class:`~twisted_socks5.admission.Admission`), which does not call these.

    def admit(self, ip: Optional[str]) -> bool:
        """Deprecated: ``admission.admit``."""
        return self.admission.admit(ip)

    def authentication_failed(self, protocol: SOCKS5ServerProtocol) -> None:
        """Deprecated: ``admission.authentication_failed``."""
        self.admission.authentication_failed(protocol)

    def login_throttled(self, protocol: SOCKS5ServerProtocol) -> None:
        """Deprecated: ``admission.login_throttled``."""
        self.admission.login_throttled(protocol)

    def login_busy(self, protocol: SOCKS5ServerProtocol) -> None:
        """Deprecated: ``admission.login_busy``."""
        self.admission.login_busy(protocol)

    def wait_for_check(self, protocol: SOCKS5ServerProtocol) -> None:
        """Deprecated: ``admission.wait_for_check``."""
        self.admission.wait_for_check(protocol)

    def stop_waiting_for_check(self, protocol: SOCKS5ServerProtocol) -> None:
        """Deprecated: ``admission.stop_waiting_for_check``."""
        self.admission.stop_waiting_for_check(protocol)

    def check_ended(self, ip: str) -> None:
        """Deprecated: ``admission.check_ended``."""
        self.admission.check_ended(ip)

    def enable_metrics(self, registry: Any = None) -> Metrics:
        """Start counting for Prometheus (needs ``prometheus_client``)."""
        self.metrics = Metrics(self, registry)
        return self.metrics

    def connection_closed(
        self, protocol: SOCKS5ServerProtocol, reason: Failure
    ) -> None:
        if protocol in self.active:
            self.active.discard(protocol)
            self.limits.closed(protocol.client_ip if protocol.identified else None)
        if self.metrics is not None:
            self.metrics.closed(protocol)
        if self.draining and not self.active:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)
        log_connection(self.log, protocol, self.reactor.seconds() - protocol.started)
