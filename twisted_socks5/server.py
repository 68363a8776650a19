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

import collections
import enum
import time
from functools import partial
from typing import (
    Any,
    Callable,
    ClassVar,
    Deque,
    Dict,
    List,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure
from zope.interface import implementer

from .auth import STATUS_FAILURE, NoAuthAuthenticator
from .bind import BindWaiter, normalize_ip
from .codec import (
    NULL_ADDRESS,
    Address,
    AddressType,
    Command,
    Method,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
    UserPassStatus,
)
from .connect import (
    DirectConnector,
    IOutboundConnector,
    PolicyDenied,
    first_allowed,
    reply_for_failure,
)
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
from .limits import ConnectionLimits
from .logs import escape, escape_line
from .metrics import Metrics
from .relay import OutboundProtocol, RelayCounters, half_close
from .rules import AllowAll, Decision, IPolicy
from .selfnet import (
    SELF_RULE,
    UNSPECIFIED_RULE,
    HostAddresses,
    default_host,
    reached_from_outside,
    unspecified,
)
from .udp import UDPAssociation
from .writenow import close_ended, write_now

_ALLOWED = Decision(True, "no access rules")
_UNSPECIFIED = Decision(False, UNSPECIFIED_RULE)
#: ``protect_host``'s default: the proxy host is no destination for clients
#: that connected to a non-loopback address of it (the factory cannot know
#: how it listens; a client that came in on loopback is on this host anyway).
PROTECT_WHEN_EXPOSED = "when-exposed"
_SELF_REFUSED = Decision(False, SELF_RULE)

#: While a CONNECT is being connected the client is still read (so that one
#: that resets or leaves is noticed at once and the attempt cancelled), and
#: only paused once it has sent this much ahead of the reply.
EARLY_DATA_PAUSE = 64 * 1024

#: Bytes a tunnel moves by copying before the splice relay takes over.
DEFAULT_SPLICE_AFTER = 64 * 1024


class _OutboundFactory(Factory):
    noisy = False
    protocol = OutboundProtocol
    #: Its protocols announce their own connection (``connected_deferred``).
    fast_connect = True


_OUTBOUND_FACTORY = _OutboundFactory()


def _unregister_producer(transport: Any) -> None:
    if getattr(transport, "producer", None):
        transport.unregisterProducer()


def _write_buffered(transport: Any) -> int:
    """Bytes in a Twisted socket transport's write buffer (0 if unknown)."""
    try:
        waiting: int = (
            len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        )
    except (AttributeError, TypeError):
        return 0
    return waiting


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


def address_of(ip_address: Any) -> Optional[Address]:
    """The SOCKS address of a Twisted IPv4Address/IPv6Address, or None."""
    host = getattr(ip_address, "host", None)
    port = getattr(ip_address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        return Address.from_host(host, port)
    except ValueError:
        return None


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
        self._checking: Optional[defer.Deferred[Any]] = None
        #: Waiting for a check from the same address to end.
        self._parked = False
        self._connecting: Optional[defer.Deferred[Any]] = None
        self._outbound: Optional[OutboundProtocol] = None
        self._client_eof = False
        #: The rules' answer to the request (its route, when final).
        self._decision: Any = None
        self._silent_since = 0.0
        #: The zero-copy relay, when one took over (see splice.py).
        self._splice: Any = None
        self._binding: Optional[BindWaiter] = None
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
        self._udp_counted = False
        self.started = 0.0
        self.client: Optional[Address] = None
        self.method: Optional[int] = None
        self.user: Optional[str] = None
        self.request: Optional[Request] = None
        self.reply: Optional[ReplyCode] = None
        self.bound: Optional[Address] = None
        self.outcome = "closed during handshake"
        #: The access rule that denied this connection, if one did.
        self.rule: Optional[str] = None

    #: The handler of each handshake event, by method name: bound methods
    #: kept on the instance would make every connection a reference cycle,
    #: left for the cyclic garbage collector instead of freed at close.
    _ON_EVENT: ClassVar[Dict[type, str]] = {
        MethodChosen: "_method_chosen",
        Rejected: "_rejected",
        AuthContinue: "_auth_said",
        AuthPending: "_auth_pending",
        Authenticated: "_authenticated",
        AuthFailed: "_auth_failed",
        RequestReceived: "_on_request",
    }

    # TimeoutMixin schedules through this, so tests drive it with a Clock.
    def callLater(self, delay: float, f: Callable[..., Any], *a: Any) -> Any:  # type: ignore[override]
        return self.factory.reactor.callLater(delay, f, *a)

    # ------------------------------------------------------------------
    # Twisted callbacks

    def connectionMade(self) -> None:
        self.started = self.factory.reactor.seconds()
        self.setTimeout(self.factory.handshake_timeout)
        if getattr(self.transport, "_proxyInfo", False) is None:
            # Behind the haproxy: endpoint the wrapper connects us before the
            # PROXY header arrives: counted from now against the server's
            # limits (a silent client holds a slot too); the client's own
            # limits and the rules wait for the header to name it.
            self._admit(identified=False)
            return
        self._admit()

    def _admit(self, identified: bool = True) -> bool:
        """The limits and the rules' client check; False if refused."""
        peer = self.transport.getPeer()
        self.handshake.client = peer
        if identified:
            self.client_ip = normalize_ip(getattr(peer, "host", "") or "")
        if not self.factory.admit(self.client_ip if identified else None):
            self._refuse()
            return False
        if identified:
            self.client = address_of(peer)
        self.identified = identified
        self.factory.connection_opened(self)
        return True

    def _identify(self) -> bool:
        """The PROXY header named the client: its own limits and the rules."""
        peer = self.handshake.client = self.transport.getPeer()
        self.client_ip = normalize_ip(getattr(peer, "host", "") or "")
        if not self.factory.identify(self):
            self._refuse()
            return False
        self.identified = True
        self.client = address_of(peer)
        return True

    def _refuse(self) -> None:
        self.refused = True
        self.state = State.CLOSING
        self.setTimeout(None)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.state is State.RELAYING:
            counters = self.counters
            counters.bytes_up += len(data)
            counters.active = True
            failed = write_now(self._outbound.transport, data)  # type: ignore[union-attr]
            if failed is not None:
                self.outcome = f"target connection lost: {failed.strerror}"
                return
            if counters.due_for_splice():
                self._hand_over_to_splice()
            return
        if self.state is State.CLOSING:
            return
        if not self.identified and not self._identify():
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
            self._forward_client_eof()
        elif self.state is State.ASSOCIATED:
            self.outcome = "association ended by the client"
            self._close()
        elif self.state is State.BINDING:
            self.outcome = "client went away while binding"
            self._close()
        elif self.state is not State.CONNECTING:
            # EOF before a request is complete: nothing will follow.
            if self.state is not State.CLOSING:
                self.outcome = "client closed during handshake"
            self._close()

    def writeConnectionLost(self) -> None:
        """Our EOF to the client has been sent."""

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.state = State.CLOSING
        self.setTimeout(None)
        if self.refused:
            return
        self.factory.unwatch_activity(self)
        if self._parked:
            self.factory.stop_waiting_for_check(self)
        if self._checking is not None:
            self._checking.cancel()
        if self._splice is not None:
            self._splice.stop()
        if self._binding is not None:
            waiter, self._binding = self._binding, None
            waiter.cancel()
        if self.udp is not None:
            self.udp.close()
            if self._udp_counted:
                self._udp_counted = False
                self.factory.limits.udp_ended()
            if self.outcome == "associated":
                self.outcome = "association ended"
        if self._connecting is not None:
            self.outcome = "client went away while connecting"
            d, self._connecting = self._connecting, None
            d.cancel()
        if self._outbound is not None:
            outbound, self._outbound = self._outbound, None
            outbound.on_lost = None
            if isinstance(reason.value, ConnectionDone):
                outbound.transport.loseConnection()
            else:
                outbound.transport.abortConnection()
        if self.outcome == "relaying":
            self.outcome = "closed"
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
            if (
                before is ServerState.AUTHENTICATING
                and handshake.auth_data_waiting
                and not self._may_check()
            ):
                return
            try:
                event = handshake.next_event()
            except ProtocolError as e:
                self._protocol_error(e, before)
                return
            if event is None:
                return
            getattr(self, self._ON_EVENT[type(event)])(event)

    def _protocol_error(self, e: ProtocolError, state: ServerState) -> None:
        self.outcome = f"protocol error: {e}"
        if state is ServerState.REQUEST and e.reply is not None:
            self._send_reply(e.reply)
        self._close()

    def _method_chosen(self, event: MethodChosen) -> None:
        self.method = event.method
        write_now(self.transport, event.data)
        self.state = State.AUTHENTICATING

    def _rejected(self, event: Rejected) -> None:
        self.method = Method.NO_ACCEPTABLE_METHODS
        self.outcome = event.reason
        self.transport.write(event.data)
        self._close()

    def _may_check(self) -> bool:
        """The login limits of this address, before a method sees its bytes."""
        factory = self.factory
        if not factory.limits.may_check(self.client_ip):
            # As many checks from this address as it may have run already:
            # wait for one to end (and be counted) before this one starts.
            self._hold()
            factory.wait_for_check(self)
            return False
        if factory.limits.throttled(self.client_ip):
            self._refuse_throttled()
            return False
        return True

    def _auth_pending(self, event: AuthPending) -> None:
        result = event.result
        if not isinstance(result, defer.Deferred):
            self._on_event(self.handshake.auth_result(result))  # refused
            return
        # Held, not paused: a client that goes away is noticed, and its
        # check is dropped if it has not started (see connectionLost).
        self._hold()
        self._checking = result
        self.factory.limits.check_started(self.client_ip)
        result.addCallbacks(self._auth_result, self._auth_error)
        # Only once a failure is counted may the next check begin.
        result.addBoth(self._check_ended)
        result.addBoth(self._unwait)

    def _on_event(self, event: Event) -> None:
        getattr(self, self._ON_EVENT[type(event)])(event)

    def _check_ended(self, result: Any) -> Any:
        self._checking = None
        self.factory.check_ended(self.client_ip)
        return result

    def _auth_result(self, result: Any) -> None:
        """A method's asynchronous check answered."""
        if self.state is State.CLOSING or self.transport.disconnected:
            return
        self._on_event(self.handshake.auth_result(result))

    def _auth_error(self, failure: Failure) -> None:
        if self.state is State.CLOSING or self.transport.disconnected:
            return  # the check was dropped with the connection
        self.log.failure("authenticator failed", failure)
        self.handshake.auth_error(failure.value)  # type: ignore[arg-type]
        self._authentication_failed("authenticator error")

    def _auth_said(self, event: Union[AuthContinue, Authenticated, AuthFailed]) -> None:
        if event.data:
            self.transport.write(event.data)
        if event.user is not None:
            self.user = event.user

    def _authenticated(self, event: Authenticated) -> None:
        # Failures from other connections may have throttled this address
        # while this check ran: a right password is refused too.
        if self.factory.limits.throttled(self.client_ip):
            self._refuse_throttled()
            return
        if event.data:
            self.transport.write(event.data)
        if event.user is not None:
            self.user = event.user
        self.state = State.REQUEST

    def _auth_failed(self, event: AuthFailed) -> None:
        if event.error is not None:
            self.log.failure("authenticator failed", Failure(event.error))
            self._authentication_failed("authenticator error")
            return
        self._auth_said(event)
        self._authentication_failed("authentication failed")

    def _authentication_failed(self, outcome: str) -> None:
        self.outcome = outcome
        self.factory.authentication_failed(self)
        self._close()

    def _refuse_throttled(self) -> None:
        """Refuse a login from an address over its failed-login budget."""
        self.outcome = "login refused: too many failed logins"
        if self.method == Method.USERNAME_PASSWORD:
            self.transport.write(UserPassStatus(STATUS_FAILURE).to_bytes())
        self.factory.login_throttled(self)
        self._close()

    def _on_request(self, event: RequestReceived) -> None:
        request = self.request = event.request
        if request.command not in self.factory.commands:
            self._fail(
                ReplyCode.COMMAND_NOT_SUPPORTED, f"{request.command.phrase} not enabled"
            )
            return
        policy = self.factory.policy
        if policy is not None:
            # A UDP ASSOCIATE names the client's own source, not a destination:
            # its destinations are checked datagram by datagram.
            destination = (
                NULL_ADDRESS
                if request.command is Command.UDP_ASSOCIATE
                else request.address
            )
            decision = policy.check_request(
                self.policy_ip, self.user, request.command, destination
            )
            self._decision = decision
            if not decision.allowed:
                self._deny(decision.rule)
                return
        if request.command is Command.CONNECT:
            self._connect(request)
        elif request.command is Command.BIND:
            self._bind(request)
        else:
            self._associate(request)

    # ------------------------------------------------------------------
    # CONNECT

    def _connect(self, request: Request) -> None:
        self.state = State.CONNECTING
        # The client has done its part; the connect timeout bounds the rest,
        # and its expiry is answered (0x06) rather than cut short.
        self.setTimeout(None)
        check = None
        address = request.address
        route = None
        policy = self.factory.policy
        decision = self._decision
        if address.type is not AddressType.DOMAIN:
            decision = self._resolved_decision(address, address.host)
            if not decision.allowed:
                self._deny(decision.rule)
                return
            route = decision.via
        elif policy is not None and not decision.final:
            # Which rule allows the name, and so its route, depends on the
            # addresses: resolve here, check each, connect by IP.
            self._hold()
            resolving = self.factory.connector.resolve(address.host)
            self._connecting = resolving
            resolving.addCallback(self._route_resolved, address)
            resolving.addCallbacks(self._connected, self._connect_failed)
            return
        else:
            # The route is known: the connector checks each address the
            # name resolves to and uses only the allowed ones (with
            # HostnameEndpoint's fallback among them).  One check per name,
            # here or in _route_resolved, never both.  Without rules, an
            # upstream resolves names on its own host: nothing to guard.
            route = decision.via if decision is not None else None
            if policy is not None or isinstance(
                self.factory.connector_for(route), DirectConnector
            ):
                check = partial(self._resolved_denial, address)
        connector = self.factory.connector_for(route)
        self._hold()
        if check is None:
            d = connector.connect(address, _OUTBOUND_FACTORY)
        else:
            d = connector.connect(address, _OUTBOUND_FACTORY, check)
        self._connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _route_resolved(
        self, addresses: List[str], address: Address
    ) -> defer.Deferred[IProtocol]:
        """Connect to the first allowed address, by the route its rule names."""
        decisions = {}

        def check(ip: str) -> Optional[str]:
            decision = decisions[ip] = self._resolved_decision(address, ip)
            return None if decision.allowed else decision.rule

        ip = first_allowed(addresses, check)
        d = self.factory.connector_for(decisions[ip].via).connect(
            Address.from_host(ip, address.port), _OUTBOUND_FACTORY
        )
        self._connecting = d
        return d

    def _connected(self, protocol: IProtocol) -> None:
        self._connecting = None
        if not isinstance(protocol, OutboundProtocol):  # pragma: no cover
            raise TypeError(f"unexpected outbound protocol {protocol!r}")
        self._outbound = protocol
        # Through an upstream, the address that matters is the upstream's.
        bound = getattr(protocol.transport, "bound", None)
        self.bound = bound if isinstance(bound, Address) else None
        if self.bound is None:
            self.bound = address_of(protocol.transport.getHost())
        self._send_reply(ReplyCode.SUCCEEDED, self.bound)
        self._start_relay(protocol)

    def _start_relay(self, peer: OutboundProtocol) -> None:
        """Both ends are connected and the reply is queued: move bytes."""
        self.state = State.RELAYING
        self.outcome = "relaying"
        self.setTimeout(None)
        early = bytes(self._buffer)
        self._buffer = bytearray()
        self._watch_activity()
        if self.factory.splice:
            if self.factory.splice_after <= 0:
                self._start_splice(peer, early)
                if self._splice is not None:
                    return
            else:
                self.counters.splice_at = self.factory.splice_after
        peer.start_relay(
            self.transport,
            self.counters,
            self._target_eof,
            self._target_lost,
            self._hand_over_to_splice,
        )
        counters = self.counters
        if early:
            counters.bytes_up += len(early)
            peer.transport.write(early)
        if self._client_eof:
            self._forward_client_eof()
            return
        self._unwait(None)
        if counters.due_for_splice():  # early data alone may be enough
            self._hand_over_to_splice()

    def _start_splice(
        self, peer: OutboundProtocol, early: bytes = b"", handover: bool = False
    ) -> None:
        """Let the zero-copy relay take over, if the descriptors allow."""
        limits = self.factory.limits
        if not limits.may_splice():
            return
        from .splice import start_splice_relay

        relay = start_splice_relay(self, peer, early, handover)
        if relay is not None:
            limits.splice_started()
            relay.on_stop = limits.splice_ended
            self._splice = relay

    def _hand_over_to_splice(self) -> None:
        """The tunnel moved ``splice_after`` bytes: worth a pair of pipes."""
        peer = self._outbound
        if (
            peer is None
            or self._splice is not None
            or self.state is not State.RELAYING
            or self.counters.up_closed
            or self.counters.down_closed
        ):
            return
        self._start_splice(peer, handover=True)

    def _splice_called_off(self) -> None:
        """The hand-over timed out (see splice.py): back to copying."""
        self._splice = None
        peer = self._outbound
        if peer is None or self.state is not State.RELAYING:
            return
        peer.start_relay(
            self.transport, self.counters, self._target_eof, self._target_lost
        )
        self.transport.resumeProducing()

    def _connect_failed(self, failure: Failure) -> None:
        self._connecting = None
        if self.transport.disconnected:
            # The client left and cancelled the attempt; its connectionLost
            # said so (HostnameEndpoint reports a cancelled look-up as a DNS
            # failure, not as a cancellation).
            return
        code = reply_for_failure(failure)
        if failure.check(PolicyDenied):
            self.rule = failure.value.rule  # type: ignore[union-attr]
        self._fail(code, f"connect failed: {failure.getErrorMessage()}")

    # ------------------------------------------------------------------
    # Access rules

    @property
    def policy_ip(self) -> str:
        """The client IP the rules see (UNIX-socket clients are local)."""
        return self.client_ip or "127.0.0.1"

    def _resolved_decision(self, destination: Address, ip: str) -> Any:
        """
        The final word on using ``ip`` for this request: never an
        unspecified address, whatever the rules say; then the rules; and on
        a server listening beyond loopback (``protect_host``), never the
        proxy host itself unless the allowing rule names ``self``.
        """
        if unspecified(ip):
            return _UNSPECIFIED
        policy = self.factory.policy
        request = self.request
        decision = _ALLOWED
        if policy is not None and request is not None:
            decision = policy.check_resolved(
                self.policy_ip, self.user, request.command, destination, ip
            )
        host = self.factory.protect_host
        if (
            host is not None
            and decision.allowed
            and not getattr(decision, "names_self", False)
            and ip in host
            and (not self.factory.protect_when_exposed or self._reached_from_outside())
        ):
            return _SELF_REFUSED
        return decision

    def _reached_from_outside(self) -> bool:
        """Whether this client came in on an address other hosts can reach."""
        return reached_from_outside(getattr(self.transport.getHost(), "host", None))

    def _resolved_denial(self, destination: Address, ip: str) -> Optional[str]:
        """None when the rules allow using ``ip`` for this request, else the rule."""
        decision = self._resolved_decision(destination, ip)
        return None if decision.allowed else str(decision.rule)

    def _udp_allowed(self, destination: Address, ip: str) -> bool:
        """
        May this datagram go to ``ip``?  The association's first refusal is
        logged (a name's next address may still take the datagram).
        """
        policy = self.factory.policy
        decision = None
        if policy is not None:
            decision = policy.check_request(
                self.policy_ip, self.user, Command.UDP_ASSOCIATE, destination
            )
        if decision is None or decision.allowed:
            decision = self._resolved_decision(destination, ip)
            if decision.allowed:
                return True
        if self.rule is None:
            # One line per association: a client must not flood the log.
            self.rule = decision.rule
            self.log.info(
                "UDP destination {destination} ({ip}) refused for {client}: "
                "denied by {rule}",
                event="socks5.udp_denied",
                client=self.client_ip,
                # A name from the wire: escaped, never a raw newline or ESC.
                destination=repr(str(destination))[1:-1],
                ip=ip,
                rule=decision.rule,
            )
        return False

    def _deny(self, rule: str) -> None:
        self.rule = rule
        self._fail(ReplyCode.CONNECTION_NOT_ALLOWED, f"denied by {rule}")

    # ------------------------------------------------------------------
    # BIND

    def _local_host(self) -> str:
        """The address the client reached us on, IPv4-mapped made plain."""
        return normalize_ip(self.transport.getHost().host)

    def _bind(self, request: Request) -> None:
        self.state = State.BINDING
        self.setTimeout(None)
        address = request.address
        if address.type is AddressType.DOMAIN:
            self._wait()
            d = self.factory.connector.resolve(address.host)
            self._connecting = d
            d.addCallbacks(self._bind_listen, self._bind_failed)
            d.addBoth(self._unwait)
        elif address.is_unspecified:
            self._bind_listen(None)  # 0.0.0.0 or :: exactly: any peer (RFC 1928)
        else:
            self._bind_listen([address.host])

    def _bind_listen(self, allowed: Optional[List[str]]) -> None:
        self._connecting = None
        if self.state is not State.BINDING:
            return
        if allowed is not None:
            # No peer comes from 0.1.2.3 or from a name's 0.0.0.0: a client
            # naming one is probing, not binding.
            allowed = [ip for ip in allowed if not unspecified(ip)]
            if not allowed:
                self._deny(UNSPECIFIED_RULE)
                return
        check_peer = None
        if self.request is not None:
            check_peer = partial(self._bind_peer_allowed, self.request.address)
        waiter = BindWaiter(
            self.factory.reactor, allowed, self.factory.bind_timeout, check_peer
        )
        requested = self.request.address  # type: ignore[union-attr]
        wanted = self.factory.bind_port_for(requested)
        try:
            first = waiter.listen(self._local_host(), wanted)
        except Exception as e:  # noqa: BLE001 - CannotListenError and kin
            self._fail(ReplyCode.GENERAL_FAILURE, f"bind failed: {e}")
            return
        self._binding = waiter
        self.bound = first
        self._send_reply(ReplyCode.SUCCEEDED, first)
        waiter.accepted.addCallbacks(self._bind_accepted, self._bind_failed)

    def _bind_peer_allowed(self, destination: Address, ip: str) -> bool:
        rule = self._resolved_denial(destination, ip)
        if rule is not None:
            self.log.info("BIND peer {peer} denied by {rule}", peer=ip, rule=rule)
        return rule is None

    def _bind_accepted(self, peer: OutboundProtocol) -> None:
        self._binding = None
        self._outbound = peer
        remote = address_of(peer.transport.getPeer())
        self.peer = remote
        self._send_reply(ReplyCode.SUCCEEDED, remote)
        self._wait()
        self._start_relay(peer)

    def _bind_failed(self, failure: Failure) -> None:
        self._binding = None
        self._connecting = None
        if failure.check(defer.CancelledError) or self.state is State.CLOSING:
            return
        self._fail(
            reply_for_failure(failure), f"bind failed: {failure.getErrorMessage()}"
        )

    # ------------------------------------------------------------------
    # UDP ASSOCIATE

    def _associate(self, request: Request) -> None:
        limits = self.factory.limits
        if not limits.may_associate():
            self._fail(ReplyCode.GENERAL_FAILURE, "udp associate: out of descriptors")
            return
        client = self.transport.getPeer()
        association = UDPAssociation(
            self.factory.reactor,
            getattr(client, "host", ""),
            request.address,
            self.factory.connector.resolve,
            allow_unknown_sources=self.factory.udp_allow_unknown_sources,
            check_destination=self._udp_allowed,
            on_activity=self._udp_activity,
        )
        try:
            bound = association.listen(self._local_host())
        except Exception as e:  # noqa: BLE001 - CannotListenError and kin
            self._fail(ReplyCode.GENERAL_FAILURE, f"udp associate failed: {e}")
            return
        self.udp = association
        # Counted as the four descriptors it may come to hold, before it does.
        limits.udp_started()
        self._udp_counted = True
        self.bound = bound
        self.state = State.ASSOCIATED
        self.outcome = "associated"
        self.setTimeout(None)
        self._send_reply(ReplyCode.SUCCEEDED, bound)
        self._buffer.clear()
        self._watch_activity()

    def _udp_activity(self) -> None:
        self.counters.active = True

    # ------------------------------------------------------------------
    # Relay

    def _forward_client_eof(self) -> None:
        self.counters.up_closed = True
        if self._outbound is not None and not half_close(self._outbound.transport):
            # TLS toward the destination (an upstream over TLS) has no
            # half-close: keep the tunnel open for the answer instead.
            return
        self._maybe_finished()

    def _target_eof(self) -> None:
        self.counters.down_closed = True
        if not half_close(self.transport):
            # A TLS client cannot be half-closed; all the destination had to
            # say is queued, so end the tunnel cleanly (close_notify).
            self.counters.up_closed = True
        self._maybe_finished()

    def _maybe_finished(self) -> None:
        if self.counters.up_closed and self.counters.down_closed:
            self._unlink_producers()
            # Ours to close, not connectionLost's (which would close it the
            # ordinary way) nor _target_lost's.
            outbound, self._outbound = self._outbound, None
            if outbound is not None:
                outbound.on_lost = None
            close_ended(self.transport)
            if outbound is not None:
                close_ended(outbound.transport)

    def _unlink_producers(self) -> None:
        """
        Undo the mutual producer registration before a clean close: a TLS
        transport waits for its producer to go before sending close_notify,
        and a closing transport stops its producer, which for a TLS
        transport means a bare TCP close the peer sees as truncation.
        """
        _unregister_producer(self.transport)
        if self._outbound is not None:
            _unregister_producer(self._outbound.transport)

    def _target_lost(self, reason: Failure) -> None:
        """The destination connection is gone: end the client side too."""
        self._outbound = None
        if isinstance(reason.value, ConnectionDone):
            _unregister_producer(self.transport)
            self.transport.loseConnection()
        else:
            if self.outcome == "relaying":  # not already told by a failed write
                self.outcome = f"target connection lost: {reason.getErrorMessage()}"
            self.transport.abortConnection()

    def _watch_activity(self) -> None:
        """
        Put the tunnel under the factory's idle/stall watch: one timer for
        all tunnels, every ``min(idle_timeout, stall_timeout)`` seconds,
        checks whether a byte moved (a flag the relay sets).  Nothing runs
        per chunk, and nothing is scheduled or cancelled per tunnel.
        """
        factory = self.factory
        if not (factory.idle_timeout or factory.stall_timeout or self._udp_idle()):
            return
        self._silent_since = factory.reactor.seconds()
        factory.watch_activity(self)

    def check_activity(self, now: float) -> None:
        """The factory's watch looks: close the tunnel if silent or stalled too long."""
        if self.counters.active:
            self.counters.active = False
            self._silent_since = now
        silent = now - self._silent_since
        idle, stall = (
            self._udp_idle() or self.factory.idle_timeout,
            self.factory.stall_timeout,
        )
        if idle and silent >= idle:
            self._watch_abort("idle timeout")
        elif stall and silent >= stall and self._stalled():
            # Flow control stopped reading one side while the other does not
            # read: nothing watches the paused socket any more, so a peer
            # that went away would never be noticed.  Reclaim the tunnel.
            self._watch_abort("stalled: no progress with data waiting")

    def _udp_idle(self) -> Optional[float]:
        """An association's idle limit: the shorter of the two timeouts."""
        if self.udp is None:
            return None
        limits = [
            t for t in (self.factory.udp_idle_timeout, self.factory.idle_timeout) if t
        ]
        return min(limits) if limits else None

    def _watch_abort(self, outcome: str) -> None:
        """The watch gives up on this tunnel (its close comes a turn later)."""
        self.factory.unwatch_activity(self)
        self.outcome = outcome
        self.transport.abortConnection()

    def _stalled(self) -> bool:
        """Bytes are waiting for a peer that does not take them."""
        if self._splice is not None:
            return bool(getattr(self._splice, "buffered", 0))
        outbound = self._outbound
        transports = [self.transport, outbound.transport if outbound else None]
        return any(_write_buffered(t) for t in transports if t is not None)

    # ------------------------------------------------------------------
    # Helpers

    def _send_reply(self, code: ReplyCode, address: Optional[Address] = None) -> None:
        first = self.reply is None
        self.reply = code
        if first and self.factory.metrics is not None:
            self.factory.metrics.replied(self)
        write_now(self.transport, Reply(code, address or NULL_ADDRESS).to_bytes())

    def _fail(self, code: ReplyCode, outcome: str) -> None:
        """Answer the request with a failure code, then close (RFC 1928 s. 6)."""
        self.outcome = outcome
        self._send_reply(code)
        self._close()

    def _wait(self) -> None:
        """Stop reading the client while something asynchronous runs."""
        self._waiting = True
        self.transport.pauseProducing()

    def _hold(self) -> None:
        """
        Stop parsing while the outbound connection is made, but keep reading:
        a client that resets meanwhile cancels the attempt at once (a paused
        socket is not watched), its EOF is remembered for the relay, and
        data it sends ahead is kept for the destination, the client being
        paused past ``EARLY_DATA_PAUSE`` bytes.  It also spares two
        ``epoll_ctl`` calls per tunnel.
        """
        self._waiting = True

    def _unwait(self, result: Any) -> Any:
        self._waiting = False
        if self.state is not State.CLOSING and not self.transport.disconnected:
            self.transport.resumeProducing()
            if self.state is not State.RELAYING:
                self._process()
        return result

    def _close(self) -> None:
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
        :class:`~twisted_socks5.connect.DirectConnector`.
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
        self.active: set[SOCKS5ServerProtocol] = set()
        self.limits = limits or ConnectionLimits(reactor.seconds)
        #: Connections waiting for their address's credential checks, by IP.
        self._check_waiters: Dict[str, Deque[SOCKS5ServerProtocol]] = {}
        self._waking: set[str] = set()
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
        #: Tunnels under the idle/stall watch, and its timer while any are.
        self._watching: set[SOCKS5ServerProtocol] = set()
        self._watch_call: Any = None
        #: Prometheus metrics, once :meth:`enable_metrics` was called.
        self.metrics: Optional[Metrics] = None

    @property
    def methods(self) -> list[int]:
        """METHOD codes offered, in order of preference."""
        return [int(a.method) for a in self.authenticators]

    def buildProtocol(self, addr: Any) -> SOCKS5ServerProtocol:  # type: ignore[override]
        return SOCKS5ServerProtocol(self)

    def watch_activity(self, protocol: SOCKS5ServerProtocol) -> None:
        """Check ``protocol``'s tunnel for silence and stalls from now on."""
        self._watching.add(protocol)
        if self._watch_call is None:
            self._schedule_watch()

    def unwatch_activity(self, protocol: SOCKS5ServerProtocol) -> None:
        """Stop checking ``protocol``; the timer goes with the last tunnel."""
        self._watching.discard(protocol)
        if not self._watching and self._watch_call is not None:
            self._watch_call.cancel()
            self._watch_call = None

    def _schedule_watch(self) -> None:
        periods = [
            t
            for t in (self.idle_timeout, self.stall_timeout, self.udp_idle_timeout)
            if t
        ]
        if periods:
            self._watch_call = self.reactor.callLater(min(periods), self._watch)

    def _watch(self) -> None:
        """One look at every watched tunnel, then the next in one period."""
        self._watch_call = None
        now = self.reactor.seconds()
        for protocol in list(self._watching):
            if protocol in self._watching:  # not closed meanwhile
                protocol.check_activity(now)
        if self._watching:
            self._schedule_watch()

    def admit(self, ip: Optional[str]) -> bool:
        """
        Whether a new client from ``ip`` may go on: the connection limits,
        shutdown, and the rules' client check (``ip`` ``None``: a client a
        PROXY header has yet to name, checked again by :meth:`identify`).
        A refusal is logged here.
        """
        refusal = self.limits.refusal(ip)
        if refusal is None and self.draining:
            refusal = ("draining", "server is shutting down")
        if refusal is None and ip is not None:
            refusal = self._rules_refusal(ip)
        return self._admitted(ip, refusal)

    def identify(self, protocol: SOCKS5ServerProtocol) -> bool:
        """
        A client counted since accept was named by its PROXY header: its
        own limits and the rules now.  Refused, it is no longer counted.
        """
        ip = protocol.client_ip
        refusal = self.limits.client_refusal(ip) or self._rules_refusal(ip)
        if self._admitted(ip, refusal):
            self.limits.identified(ip)
            return True
        if protocol in self.active:
            self.active.discard(protocol)
            self.limits.closed(None)
        return False

    def _rules_refusal(self, ip: str) -> Optional[tuple[str, str]]:
        if self.policy is not None:
            decision = self.policy.check_client(ip or "127.0.0.1")
            if not decision.allowed:
                return ("rules", f"denied by {decision.rule}")
        return None

    def _admitted(self, ip: Optional[str], refusal: Optional[tuple[str, str]]) -> bool:
        if refusal is not None:
            # Returning None makes Twisted close the connection at once.
            kind, why = refusal
            self.log.info(
                "refused {client}: {reason}",
                event="socks5.refused",
                client=escape(ip),
                kind=kind,
                reason=why,
            )
            if self.metrics is not None:
                self.metrics.refused_connection(kind)
            return False
        return True

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

    def authentication_failed(self, protocol: SOCKS5ServerProtocol) -> None:
        self.limits.auth_failed(protocol.client_ip)
        if self.metrics is not None:
            self.metrics.auth_failed()

    def login_throttled(self, protocol: SOCKS5ServerProtocol) -> None:
        """A login on an open connection refused: its address is throttled."""
        self.log.info(
            "refused login from {client}: throttled",
            event="socks5.refused",
            client=protocol.client_ip,
            kind="throttled",
            reason=f"throttled after {self.limits.auth_failures} failed logins",
        )
        if self.metrics is not None:
            self.metrics.refused_connection("throttled")

    def wait_for_check(self, protocol: SOCKS5ServerProtocol) -> None:
        """Park ``protocol`` until a check from its address ends."""
        protocol._parked = True
        self._check_waiters.setdefault(protocol.client_ip, collections.deque()).append(
            protocol
        )

    def stop_waiting_for_check(self, protocol: SOCKS5ServerProtocol) -> None:
        protocol._parked = False
        waiters = self._check_waiters.get(protocol.client_ip)
        if waiters is not None:
            waiters.remove(protocol)
            if not waiters:
                del self._check_waiters[protocol.client_ip]

    def check_ended(self, ip: str) -> None:
        """A credential check from ``ip`` ended: parked ones go on in turn."""
        self.limits.check_ended(ip)
        if ip in self._waking:
            return  # a woken connection's own quick check: the loop goes on
        self._waking.add(ip)
        try:
            while self.limits.may_check(ip):
                waiters = self._check_waiters.get(ip)
                if not waiters:
                    break
                protocol = waiters.popleft()
                if not waiters:
                    del self._check_waiters[ip]
                protocol._parked = False
                protocol._unwait(None)
        finally:
            self._waking.discard(ip)

    def reloadables(self) -> List[Any]:
        """
        Everything with a ``reload()``: the access rules, authenticators
        (plugins included) and the credential checkers behind them.
        """
        found: List[Any] = []
        if self.protect_host is not None:
            found.append(self.protect_host)
        if self.policy is not None and hasattr(self.policy, "reload"):
            found.append(self.policy)
        for authenticator in self.authenticators:
            if hasattr(authenticator, "reload"):
                found.append(authenticator)
            portal = getattr(authenticator, "portal", None)
            for checker in getattr(portal, "checkers", {}).values():
                if hasattr(checker, "reload") and checker not in found:
                    found.append(checker)
        return found

    def reload(self) -> None:
        """
        Re-read configuration files (SIGHUP) without touching open tunnels;
        a file that fails to load keeps its old contents, and the log says why.
        """
        for item in self.reloadables():
            try:
                item.reload()
            except (ValueError, OSError) as e:  # a broken file: RulesError says where
                self.log.warn(
                    "reload of {item!r} failed, keeping it as it was: {error}",
                    item=item,
                    error=str(e),
                    event="socks5.reload_failed",
                )
            except Exception:  # noqa: BLE001 - keep serving with the old one
                self.log.failure(
                    "reload of {item!r} failed; keeping it as it was", item=item
                )
            else:
                self.log.info("reloaded {item!r}", item=item, event="socks5.reloaded")

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
        request = protocol.request
        # Names, users and error messages come from the network: escaped
        # here, once, so no observer (text, JSON, a worker's relay) shows a
        # forged line or a terminal escape.
        client = escape(protocol.client) if protocol.client else None
        user = escape(protocol.user) if protocol.user is not None else None
        command = request.command.phrase if request else None
        target = escape(request.address) if request else None
        outcome = escape_line(protocol.outcome)
        rule = escape(protocol.rule) if protocol.rule is not None else None
        reply = protocol.reply
        reply_text = reply.phrase if reply is not None else "-"
        counters = protocol.counters
        duration = self.reactor.seconds() - protocol.started
        # The line for text logs is rendered here, with an f-string: Twisted
        # would otherwise run its pure-Python formatter over a dozen fields,
        # a tenth of what a short connection costs.  Every field stays in
        # the event for structured observers (JSON logs).  The event is the
        # one Logger.info would build (the keys twisted.logger documents):
        # Logger.emit would first check its level against a sorted list of
        # LogLevel constants, for every connection.
        log = self.log
        log.observer(
            {
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": "{summary}",
                "log_time": time.time(),
                "summary": f"{client or '-'} {user or '-'} {command or '-'} "
                f"{target or '-'} -> {reply_text}: {outcome}; "
                f"up {counters.bytes_up} B, down {counters.bytes_down} B "
                f"in {duration:.3f} s",
                "event": "socks5.connection",
                "client": client,
                "user": user,
                "method": protocol.method,
                "command": command,
                "target": target,
                "reply": int(reply) if reply is not None else None,
                "reply_text": reply_text,
                "bound": str(protocol.bound) if protocol.bound else None,
                "peer": str(protocol.peer) if protocol.peer else None,
                "udp": protocol.udp.counters.as_dict() if protocol.udp else None,
                "outcome": outcome,
                "rule": rule,
                "bytes_up": counters.bytes_up,
                "bytes_down": counters.bytes_down,
                "duration": duration,
            }
        )
