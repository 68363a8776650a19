"""
The SOCKS5 server factory: a server's settings, its open connections and
their log events, and the owner of what all its connections share: the
gates (:mod:`twisted_socks5.admission`), the idle/stall watch
(:mod:`twisted_socks5.tunnel`) and the command handlers.

Each connection is a :class:`SOCKS5ServerProtocol`
(:mod:`twisted_socks5.connection`), importable from here as ever.
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from twisted.internet import defer
from twisted.internet.interfaces import IHostnameResolver
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from .accesslog import AccessLog, address_text
from .addresses import by_family
from .admission import Admission
from .auth import NoAuthAuthenticator
from .codec import Address, Command, Method
from .commands import HANDLERS, ICommandHandler
from .connection import EARLY_DATA_PAUSE as EARLY_DATA_PAUSE
from .connection import PROTOCOLS, WithoutSOCKS5
from .connection import SOCKS5ServerProtocol as SOCKS5ServerProtocol
from .connection import State as State
from .handshake import MAX_EARLY_DATA as MAX_EARLY_DATA
from .httpproxy import take_over as http_take_over
from .interfaces import IAuthenticator
from .limits import ConnectionLimits
from .logs import log_connection
from .metrics import Metrics
from .outbound import DirectConnector, IOutboundConnector
from .outgoing import OutgoingAddresses
from .reloading import reload_all, reloadables
from .resolver import FamilyPreference
from .revocation import Credentials, sweep
from .rules import AllowAll, IPolicy
from .selfnet import HostAddresses, default_host
from .tunnel import ActivityWatch, Watched
from .udp import PortRange

#: ``protect_host``'s default: the proxy host is no destination for clients
#: that connected to a non-loopback address of it (the factory cannot know
#: how it listens; a client that came in on loopback is on this host anyway).
PROTECT_WHEN_EXPOSED = "when-exposed"

#: Bytes a tunnel moves by copying before the splice relay takes over.
DEFAULT_SPLICE_AFTER = 64 * 1024


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
    :param udp_bind: the addresses, at most one per family, UDP relay
        sockets bind to: the one of the client's family; default (and for a
        family not given) the address the client reached (a wildcard
        address binds every address, the reply naming the one reached).
    :param udp_ports: the ports (``(low, high)``, inclusive) UDP relay
        sockets take, for a firewall or a port forwarding; none free: the
        ASSOCIATE gets 0x01.  Default: ports the system picks.
    :param udp_advertise: the BND.ADDR of UDP ASSOCIATE replies, at most one
        per family (the public address of a NAT in front): the one of the
        client's family; default the address bound.
    :param bind_advertise: the same for BIND's first reply.
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
    :param resolver: the ``IHostnameResolver`` of the connectors the factory
        builds (``--resolver``: a
        :class:`~twisted_socks5.resolver.NamesResolver`); default: the
        reactor's.
    :param prefer: ``--prefer``
        (:class:`~twisted_socks5.resolver.FamilyPreference`), applied to a
        name's addresses the rules allowed, for CONNECT and UDP.
    :param protocols: what its clients may speak, from ``"socks5"``,
        ``"socks4"`` (SOCKS4 and 4a) and ``"http"``: each client's first
        byte tells which (see ``docs/protocols.rst``).  Default: SOCKS5 only.
    :param access_log: an :class:`~twisted_socks5.accesslog.AccessLog`: one
        JSON record per finished connection (``--access-log``).
    :param revoke_on_reload: whether :meth:`reload` closes the open
        connections the new rules or password files no longer allow
        (:mod:`twisted_socks5.revocation`); ``False``:
        ``--keep-tunnels-on-reload``.
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
        udp_bind: Sequence[str] = (),
        udp_ports: Optional[Tuple[int, int]] = None,
        udp_advertise: Sequence[str] = (),
        bind_advertise: Sequence[str] = (),
        commands: Sequence[Command] = (
            Command.CONNECT,
            Command.BIND,
            Command.UDP_ASSOCIATE,
        ),
        limits: Optional[ConnectionLimits] = None,
        policy: Optional[IPolicy] = None,
        routes: Optional[Dict[str, IOutboundConnector]] = None,
        protect_host: Union[HostAddresses, str, None] = PROTECT_WHEN_EXPOSED,
        resolver: Optional[IHostnameResolver] = None,
        prefer: Optional[FamilyPreference] = None,
        protocols: Sequence[str] = ("socks5",),
        access_log: Optional[AccessLog] = None,
        revoke_on_reload: bool = True,
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
        #: ``--prefer``: the family order (or the one family) of names'
        #: addresses the rules allowed.
        self.prefer = prefer
        #: ``--resolver``'s resolver (re-read on SIGHUP), if any.
        self.resolver = resolver
        self.connector = connector or DirectConnector(
            reactor, connect_timeout, resolver=resolver, prefer=prefer
        )
        #: Named routes for rules' ``via NAME``; ``direct`` is always there.
        self.routes: Dict[str, IOutboundConnector] = dict(routes or {})
        self.routes.setdefault(
            "direct",
            DirectConnector(reactor, connect_timeout, resolver=resolver, prefer=prefer),
        )
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
        #: Behind NAT: where relays listen and what the replies name, by family.
        self.udp_bind = by_family(udp_bind)
        self.udp_ports = None if udp_ports is None else PortRange(*udp_ports)
        self.udp_advertise = by_family(udp_advertise)
        self.bind_advertise = by_family(bind_advertise)
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
        unknown = set(protocols) - set(PROTOCOLS)
        if unknown or not protocols:
            raise ValueError(f"protocols: unknown or none: {sorted(unknown)}")
        #: The protocols its clients may speak (the first byte tells which).
        self.protocols = frozenset(protocols)
        if self.policy is not None and self.protocols != {"socks5"}:
            _check_takes_protocol(self.policy)
        self._connection = (
            SOCKS5ServerProtocol if "socks5" in self.protocols else WithoutSOCKS5
        )
        #: ``--access-log``, or ``None`` (then nothing is done for it).
        self.access_log = access_log
        self.revoke_on_reload = revoke_on_reload
        #: The password files whose entries a login's fingerprint is taken
        #: from, when a reload revokes (else ``None``: nothing per login).
        self.credentials: Optional[Credentials] = (
            Credentials.of(self.authenticators) if revoke_on_reload else None
        )

    @property
    def methods(self) -> list[int]:
        """METHOD codes offered, in order of preference."""
        return [int(a.method) for a in self.authenticators]

    def buildProtocol(self, addr: Any) -> SOCKS5ServerProtocol:  # type: ignore[override]
        return self._connection(self)

    @property
    def requires_password(self) -> bool:
        """Whether every method offered authenticates (none is 0x00)."""
        return all(a.method != Method.NO_AUTHENTICATION for a in self.authenticators)

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

    def outgoing_for(self, route: Optional[str]) -> Optional[OutgoingAddresses]:
        """
        The source addresses of a route's direct connections (UDP relay
        sockets): the route's own set, else ``direct``'s (UDP is never
        chained through an upstream); ``None``: the system's choice.
        """
        connector = self.routes.get(route, self.connector) if route else self.connector
        outgoing = getattr(connector, "outgoing", None)
        if outgoing is None:
            outgoing = getattr(self.routes.get("direct"), "outgoing", None)
        return outgoing

    def take_over_http(self, connection: SOCKS5ServerProtocol, data: bytes) -> None:
        """
        The protocol front found a client speaking HTTP: the HTTP proxy
        takes the connection over (:func:`twisted_socks5.httpproxy.take_over`).
        """
        http_take_over(connection, data)

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
        if self.access_log is not None:
            protocol.listener = address_text(protocol.transport.getHost())

    def reloadables(self) -> List[Any]:
        """
        Everything with a ``reload()``: the access rules, authenticators
        (plugins included), the credential checkers behind them, and the
        name resolver.
        """
        found = reloadables(
            self.protect_host, self.policy, self.authenticators, self.resolver
        )
        if self.limiter is not None:
            found.append(self.limiter)  # after the rules: their new limits
        if self.access_log is not None:
            found.append(self.access_log)  # reopened, for logrotate
        return found

    def reload(self) -> defer.Deferred[int]:
        """
        Re-read configuration files (SIGHUP, the console's reload); a file
        that fails to load keeps its old contents, and the log says why.
        Then, unless ``revoke_on_reload`` is off, close the connections the
        new configuration no longer allows: the Deferred fires with how
        many, once all were looked at (:func:`~twisted_socks5.revocation.sweep`).
        """
        reload_all(self.reloadables(), self.log)
        if not self.revoke_on_reload:
            return defer.succeed(0)
        return sweep(self)

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

    #: The rules' limit lines' enforcement (see :meth:`enable_limits`).
    limiter: Any = None

    def enable_limits(self, store: Any, **settings: Any) -> Any:
        """
        Enforce the rules' ``limit`` lines with ``store`` (an ILimitStore);
        ``start()`` the limiter returned (``twistd socks5`` does) to load the
        store and count live tunnels' bytes, ``stop()`` it to save.
        """
        from .limiting import Limiter

        self.limiter = Limiter(self, store, **settings)
        return self.limiter

    def enable_metrics(self, registry: Any = None) -> Metrics:
        """Start counting for Prometheus (needs ``prometheus_client``)."""
        self.metrics = Metrics(self, registry)
        return self.metrics

    def user_limits(self, user: str) -> Optional[Dict[str, Any]]:
        """What the rules' limits hold of ``user`` (the console's view)."""
        limiter = self.limiter
        return None if limiter is None else limiter.user_view(user)

    def connection_closed(
        self, protocol: SOCKS5ServerProtocol, reason: Failure
    ) -> None:
        if protocol in self.active:
            self.active.discard(protocol)
            self.limits.closed(protocol.client_ip if protocol.identified else None)
        if self.metrics is not None:
            self.metrics.closed(protocol)
        event = log_connection(
            self.log, protocol, self.reactor.seconds() - protocol.started
        )
        if self.access_log is not None:
            self.access_log.finished(protocol, event)
        # Last: what waits for the drain (closing the access log) sees
        # this connection's lines written.
        if self.draining and not self.active:
            drained, self._drained = self._drained, []
            for d in drained:
                d.callback(None)


def _check_takes_protocol(policy: IPolicy) -> None:
    """
    A policy serving other protocols than SOCKS5 is asked with ``protocol``
    and ``explicit``: one that cannot take them would fail every such
    request, so it is refused at once.
    """
    for name in ("check_request", "check_resolved"):
        parameters = inspect.signature(getattr(policy, name)).parameters.values()
        if not any(
            p.name == "explicit" or p.kind is inspect.Parameter.VAR_KEYWORD
            for p in parameters
        ):
            raise ValueError(
                f"policy {policy!r}: {name} takes no 'protocol' and 'explicit' "
                "keywords, so it can serve SOCKS5 only (see IPolicy)"
            )
