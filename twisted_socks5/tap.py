"""
``twistd socks5``: the service the command-line options build (listening,
draining on stop, SIGHUP, metrics, workers).  The options are in
:mod:`twisted_socks5.options`; whether the server may start exposed is
decided in :mod:`twisted_socks5.exposure`.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import Any, Dict, Iterator, List, Optional

from twisted.application import service
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IHostnameResolver,
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.failure import Failure

from ._version import version_line as version_line
from .accesslog import AccessLog, Rotation
from .exposure import protected_host
from .exposure import warn_if_metrics_exposed as warn_if_metrics_exposed
from .limits import ConnectionLimits
from .options import DEFAULT_LISTEN as DEFAULT_LISTEN
from .options import Options as Options
from .options import build_authenticators as build_authenticators
from .options import escape_ipv6_interface as escape_ipv6_interface
from .options import find_authenticator_factory as find_authenticator_factory
from .outbound import DirectConnector
from .resolver import DEFAULT_TIMEOUT as DEFAULT_DNS_TIMEOUT
from .resolver import NamesResolver, read_hosts
from .rules import RulesFile as RulesFile
from .server import SOCKS5ServerFactory

# The ``as`` imports keep the names of the options, the exposure guards and
# RulesFile importable from here, where they lived before the split.

log = Logger()


class TwistdOptions(Options):
    """
    The options as ``twistd socks5`` parses them: a usage error ends twistd
    with status 1 on every Twisted (twistd itself exits 0 after printing
    one before Twisted 26.10, so a refused configuration, an open relay
    among them, looked like a clean stop to systemd and scripts).
    """

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            print(self)
            raise SystemExit(f"{' '.join(sys.argv[0:2])}: {e}") from None


class SOCKS5Service(service.MultiService):
    """
    One listening service per ``--listen``; logs where it actually listens
    (the real port when ``tcp:0`` was asked for) and what it offers.
    """

    def __init__(
        self,
        factory: SOCKS5ServerFactory,
        listen: List[str],
        drain_timeout: float = 10.0,
    ) -> None:
        super().__init__()
        self.factory = factory
        self.drain_timeout = drain_timeout
        self.ports: List[Any] = []
        #: --upstream URLs by route name (``None``: the default route).
        self.upstreams: Dict[Optional[str], str] = {}
        #: --outgoing address lists by route name (``None``: the default set).
        self.outgoing: Dict[Optional[str], List[str]] = {}
        self._listeners: List[ListeningService] = []
        for description in listen:
            endpoint = serverFromString(
                factory.reactor, escape_ipv6_interface(description)
            )
            child = ListeningService(endpoint, factory)
            child.setServiceParent(self)
            self._listeners.append(child)

    def privilegedStartService(self) -> None:
        with exit_on_listen_error():
            super().privilegedStartService()

    def startService(self) -> None:
        super().startService()
        install_reload_signal(self.factory)
        if self.factory.limiter is not None:
            self.factory.limiter.start()
        waiting: List[Any] = [child.listening for child in self._listeners]
        gatherResults(waiting, consumeErrors=True).addCallback(self._listening)

    def stopService(self) -> Any:
        """Stop listening, then let open tunnels drain (twistd waits for it)."""
        stopped = super().stopService()
        log.info(
            "stopping: {count} connection(s) open, waiting up to {timeout} s",
            count=len(self.factory.active),
            timeout=self.drain_timeout,
        )
        drained = self.factory.drain(self.drain_timeout)
        if self.factory.limiter is not None:
            drained = self.factory.limiter.stop_after(drained)
        done = gatherResults([stopped, drained], consumeErrors=True)
        if self.factory.access_log is not None:  # the drained tunnels' too
            return self.factory.access_log.close_after(done)
        return done

    def _listening(self, ports: List[Any]) -> None:
        self.ports = ports = [port for port in ports if port is not None]
        where = ", ".join(_describe(port.getHost()) for port in ports)
        methods = ", ".join(
            f"0x{a.method:02x} ({a.name})" for a in self.factory.authenticators
        )
        log.info(
            "{version} listening on {listen}; methods offered: {methods}; "
            "routes: {routes}",
            version=version_line(),
            listen=where,
            methods=methods,
            routes=describe_routes(self.upstreams, self.outgoing),
            event="socks5.listening",
        )
        host = self.factory.protect_host
        if host is not None:
            log.info(
                "listening beyond loopback: destinations on this host ({host}) "
                "are refused unless a rule allows 'to self' "
                "(--allow-self-destinations lifts this)",
                host=host,
                event="socks5.self_protected",
            )
        policy = self.factory.policy
        if policy is not None and hasattr(policy, "describe"):
            log.info("access rules: {rules}", rules=policy.describe())
            for warning in getattr(getattr(policy, "rules", policy), "warnings", []):
                log.warn("access rules: {warning}", warning=warning)


class ListeningService(service.Service):
    """
    Listens on one endpoint while running, with public API only (Twisted's
    ``StreamServerEndpointService`` needs two private attributes for this):
    a port that cannot be had raises at start-up, so twistd exits non-zero,
    and :attr:`listening` fires with the port.
    """

    def __init__(
        self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
    ) -> None:
        self.endpoint = endpoint
        self.factory = factory
        #: Fires with the listening port once the endpoint listens.
        self.listening: Optional[Deferred[IListeningPort]] = None

    def privilegedStartService(self) -> None:
        """Listen before twistd drops privileges (ports below 1024)."""
        super().privilegedStartService()
        self._listen()

    def startService(self) -> None:
        super().startService()
        if self.listening is None:  # started without privilegedStartService
            self._listen()

    def _listen(self) -> None:
        listening = self.endpoint.listen(self.factory)
        at_once: List[Failure] = []

        def failed(reason: Failure) -> None:
            if self.listening is None:  # at once: fail the start-up with it
                at_once.append(reason)
            elif not reason.check(CancelledError):  # later: as Twisted does
                log.failure("cannot listen: {e}", reason, e=self.endpoint)

        listening.addErrback(failed)
        if at_once:
            at_once[0].raiseException()
        self.listening = listening

    def stopService(self) -> Deferred[None]:
        super().stopService()
        listening, self.listening = self.listening, None
        if listening is None:
            return succeed(None)
        listening.cancel()  # still waiting: do not listen after all

        def stop(port: Optional[IListeningPort]) -> Any:
            return port.stopListening() if port is not None else None

        return listening.addCallback(stop)


@contextlib.contextmanager
def exit_on_listen_error() -> Iterator[None]:
    """A port that cannot be had ends twistd with one line, not a traceback."""
    try:
        yield
    except CannotListenError as e:
        raise SystemExit(f"twistd socks5: {e}") from None


def install_reload_signal(factory: SOCKS5ServerFactory) -> None:
    """SIGHUP reloads rules and credential files (it would otherwise kill us)."""
    import signal

    def handler(signum: int, frame: Any) -> None:
        factory.reactor.callFromThread(factory.reload)

    if hasattr(signal, "SIGHUP"):
        # ValueError: not the main thread (embedded, tests).
        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGHUP, handler)
    access_log = factory.access_log
    if access_log is not None and hasattr(signal, "SIGUSR1"):

        def reopen(signum: int, frame: Any) -> None:
            factory.reactor.callFromThread(access_log.reopen)

        with contextlib.suppress(ValueError):
            signal.signal(signal.SIGUSR1, reopen)


def describe_routes(
    upstreams: Dict[Optional[str], str],
    outgoing: Optional[Dict[Optional[str], List[str]]] = None,
) -> str:
    """
    Where CONNECTs go, for the start-up line (with the --outgoing sets they
    leave from); passwords left out.
    """
    outgoing = outgoing or {}
    default = upstreams.get(None)
    direct = "direct" + _from(outgoing.get(None))
    routes = [f"default via {_without_password(default)}" if default else direct]
    if default and None in outgoing:
        routes.append(direct)
    named = {name: f"via {_without_password(spec)}" for name, spec in upstreams.items()}
    named.update((name, _from(entries)[1:]) for name, entries in outgoing.items())
    routes += [
        f"{name} {where}"
        for name, where in sorted(named.items(), key=lambda item: str(item[0]))
        if name is not None
    ]
    return ", ".join(routes)


def _from(entries: Optional[List[str]]) -> str:
    return f" from {','.join(entries)}" if entries else ""


def _without_password(spec: str) -> str:
    scheme, sep, rest = spec.partition("://")
    if not sep:
        return spec
    userinfo, at, host = rest.rpartition("@")
    if not at or "/" in userinfo:
        return spec
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else spec


def _describe(address: Any) -> str:
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if host is not None and port is not None:
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    return str(address)


def _upstream(options: Options, reactor: Any, spec: str) -> Any:
    """An upstream route, reached from the default --outgoing set."""
    from .outbound import UpstreamConnector, parse_upstream, upstream_reactor
    from .outgoing import OutgoingAddresses

    entries = options["outgoing"].get(None)
    outgoing = (
        None
        if entries is None
        else OutgoingAddresses(entries, options["outgoing-rotation"])
    )
    proxy, username, password = parse_upstream(
        upstream_reactor(reactor, outgoing, name_resolver(options, reactor)), spec
    )
    return UpstreamConnector(
        reactor,
        proxy,
        username,
        password,
        timeout=options["connect-timeout"],
        local=DirectConnector(
            reactor,
            options["connect-timeout"],
            resolver=name_resolver(options, reactor),
            prefer=options["prefer"],
        ),
    )


#: Read for names when --resolver is given without --hosts.
DEFAULT_HOSTS = "/etc/hosts"


def name_resolver(options: Options, reactor: Any) -> Optional[IHostnameResolver]:
    """
    ``--resolver`` and ``--hosts``' resolver, one per process (one cache);
    ``None``: the reactor's.  A look-up is given half the connect timeout,
    so that a silent DNS server is answered 0x04 (host unreachable), not
    0x06 (the connect timeout).
    """
    built: Optional[NamesResolver] = getattr(options, "name_resolver", None)
    if built is not None or not (options["resolver"] or options["hosts"]):
        return built
    hosts_file = options["hosts"]
    if hosts_file is None and os.path.exists(DEFAULT_HOSTS):
        hosts_file = DEFAULT_HOSTS
    resolver = NamesResolver(
        reactor,
        options["resolver"],
        read_hosts(hosts_file) if hosts_file else {},
        timeout=min(DEFAULT_DNS_TIMEOUT, options["connect-timeout"] / 2),
        hosts_path=hosts_file,
    )
    options.name_resolver = resolver  # type: ignore[attr-defined]
    return resolver


def _connector(options: Options, reactor: Any) -> Any:
    spec = options["upstreams"].get(None)
    if spec is None:
        return _direct(options, reactor, None)
    return _upstream(options, reactor, spec)


def _routes(options: Options, reactor: Any, default: Any) -> Any:
    routes = {
        name: _upstream(options, reactor, spec)
        for name, spec in options["upstreams"].items()
        if name is not None
    }
    for name in options["outgoing"]:
        if name is None and getattr(default, "outgoing", None) is not None:
            routes["direct"] = default  # one set, one rotation
        else:
            routes[name or "direct"] = _direct(options, reactor, name)
    return routes


def _direct(options: Options, reactor: Any, name: Optional[str]) -> Any:
    """A direct route leaving from its --outgoing set (the default: ``None``)."""
    from .outbound import DirectConnector
    from .outgoing import OutgoingAddresses

    entries = options["outgoing"].get(name)
    if entries is None:
        return None
    outgoing = OutgoingAddresses(entries, options["outgoing-rotation"])
    return DirectConnector(
        reactor,
        options["connect-timeout"],
        outgoing=outgoing,
        resolver=name_resolver(options, reactor),
        prefer=options["prefer"],
    )


def build_factory(options: Options, reactor: Any) -> SOCKS5ServerFactory:
    """The server factory the options describe."""
    authenticators = build_authenticators(options)
    connector = _connector(options, reactor)
    factory = SOCKS5ServerFactory(
        authenticators,
        reactor=reactor,
        handshake_timeout=options["handshake-timeout"],
        connect_timeout=options["connect-timeout"],
        idle_timeout=options["idle-timeout"],
        stall_timeout=options["stall-timeout"],
        bind_timeout=options["bind-timeout"],
        bind_ports=options["bind-ports"],
        udp_idle_timeout=options["udp-idle-timeout"],
        splice=not options["no-splice"],
        splice_after=options["splice-after"],
        udp_allow_unknown_sources=bool(options["udp-allow-unknown-sources"]),
        udp_bind=options["udp-bind"] or (),
        udp_ports=options["udp-ports"],
        udp_advertise=options["udp-advertise"] or (),
        bind_advertise=options["bind-advertise"] or (),
        commands=options["commands"],
        policy=options.policy,
        protect_host=protected_host(
            bool(options["allow-self-destinations"]),
            options["listen"],
            getattr(options, "host", None),
        ),
        connector=connector,
        routes=_routes(options, reactor, connector),
        resolver=name_resolver(options, reactor),
        prefer=options["prefer"],
        limits=ConnectionLimits(
            reactor.seconds,
            max_connections=options["max-connections"],
            max_per_client=options["max-connections-per-client"],
            auth_failures=options["auth-failures"],
            auth_window=options["auth-failure-window"],
            ipv6_client_prefix=options["ipv6-client-prefix"],
        ),
        # i15-socks4
        protocols=options["protocols"],
        # i16-log
        access_log=open_access_log(options, reactor),
        revoke_on_reload=not options["keep-tunnels-on-reload"],
    )
    # i14-core: the rules' limit lines (only with rules: none costs nothing).
    if options.policy is not None:
        from .limiting import build_store

        factory.enable_limits(
            build_store(options["limits-store"], reactor, options["state-file"]),
            on_store_failure=options["limits-on-store-failure"],
            per_user_metrics=bool(options["metrics-per-user"]),
        )
    return factory


def open_access_log(options: Options, reactor: Any) -> Optional[AccessLog]:
    """``--access-log``, opened (a usage error if it cannot be)."""
    path = options["access-log"]
    if not path:
        return None
    rotation = options["access-log-rotate"]
    try:
        return AccessLog.open(
            path, reactor, rotation if isinstance(rotation, Rotation) else None
        )
    except OSError as e:
        raise SystemExit(f"twistd socks5: --access-log {path}: {e}") from None


def _without_workers(argv: List[str]) -> List[str]:
    """The options again, less --workers, for the worker processes."""
    out: List[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--workers":
            skip = True
        elif not arg.startswith("--workers="):
            out.append(arg)
    return out


def freeze_startup_heap() -> None:
    """
    Put what start-up created (modules, Twisted, the configuration) out of
    the cyclic garbage collector's reach (``gc.freeze``).  Otherwise every
    full collection walks that whole heap again: under connection churn, a
    pause of up to 38 ms every second or two, which was the churn p99; frozen,
    the longest was 5 ms.  The process owns its heap only under twistd or a
    worker: a program that embeds the factory decides for itself.
    """
    gc.collect()
    gc.freeze()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from .limits import raise_fd_limit

    raise_fd_limit()
    reactor.callWhenRunning(freeze_startup_heap)  # type: ignore[attr-defined]

    if options["workers"] > 1:
        from .workers import WorkerSupervisor

        return WorkerSupervisor(
            reactor,
            options["workers"],
            options["listen"],
            _without_workers(options.argv),
            options["drain-timeout"],
        )
    factory = build_factory(options, reactor)
    top = SOCKS5Service(factory, options["listen"], options["drain-timeout"])
    top.upstreams = dict(options["upstreams"])
    top.outgoing = dict(options["outgoing"])
    if options["metrics"]:
        from .metrics import metrics_site

        site = metrics_site(factory.enable_metrics())
        warn_if_metrics_exposed(options["metrics"])
        endpoint = serverFromString(reactor, escape_ipv6_interface(options["metrics"]))
        ListeningService(endpoint, site).setServiceParent(top)
    # i16-console: the live console
    if options["admin"]:
        from .admin import console_site
        from .exposure import warn_if_console_in_clear

        warn_if_console_in_clear(options["admin"])
        console = console_site(factory, options["admin-auth"])
        endpoint = serverFromString(reactor, options["admin"])
        ListeningService(endpoint, console).setServiceParent(top)
    return top
