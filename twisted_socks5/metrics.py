"""
Prometheus metrics (optional: ``pip install 'twisted-socks5[metrics]'``).

Nothing is counted per chunk: byte and datagram totals are the sum of the
finished connections (added once, at close) and of the open ones (read at
scrape time), so the relay's hot path pays nothing for metrics.  The scrape
runs on the reactor thread, where the connection set is safe to read.
"""

from __future__ import annotations

import enum
from typing import Any, Collection, Dict, Iterator, List, Optional, Protocol

from twisted.web import resource, server

from ._extras import optional_import
from .codec import ReplyCode, Request
from .limits import ConnectionLimits
from .logs import protocol_of
from .relay import RelayCounters
from .udp import UDPAssociation


class Counted(Protocol):
    """What the metrics read of a connection (the server protocol)."""

    request: Optional[Request]
    reply: Optional[ReplyCode]
    started: float
    counters: RelayCounters
    udp: Optional[UDPAssociation]

    @property
    def state(self) -> enum.Enum: ...


class CountingFactory(Protocol):
    """What the metrics read of the server factory."""

    reactor: Any
    limits: ConnectionLimits

    @property
    def active(self) -> Collection[Counted]: ...


#: Handshake latency buckets, seconds: loopback to slow upstream DNS.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


def _prometheus() -> Any:
    return optional_import("prometheus_client", "metrics need")


class Metrics:
    """The server's metrics, registered in their own registry."""

    def __init__(self, factory: CountingFactory, registry: Any = None) -> None:
        prom = _prometheus()
        self.factory = factory
        self.registry = registry or prom.CollectorRegistry()
        self.connections = prom.Counter(
            "socks5_connections",
            "Finished client connections, by command, reply and protocol.",
            ["command", "reply", "protocol"],
            registry=self.registry,
        )
        self.refused = prom.Counter(
            "socks5_refused_connections",
            "Clients closed at accept by a limit or the access rules.",
            ["reason"],
            registry=self.registry,
        )
        self.limit_refusals = prom.Counter(
            "socks5_limit_refusals",
            "Requests refused by a limit line (sessions, rate, quota) or "
            "because the limits store was unavailable (store).",
            ["limit"],
            registry=self.registry,
        )
        self.limit_refusals_by_user = prom.Counter(
            "socks5_limit_refusals_by_user",
            "socks5_limit_refusals by user ('-': anonymous), with --metrics-per-user.",
            ["limit", "user"],
            registry=self.registry,
        )
        self.auth_failures = prom.Counter(
            "socks5_auth_failures",
            "Failed authentications.",
            registry=self.registry,
        )
        self.handshake = prom.Histogram(
            "socks5_handshake_seconds",
            "Time from accept to the request's (first) reply.",
            ["command", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._closed_bytes = {"up": 0, "down": 0}
        self._closed_udp: Dict[str, int] = {"up": 0, "down": 0}
        self._closed_udp_bytes = {"up": 0, "down": 0}
        self._closed_drops: Dict[str, int] = {}
        self.registry.register(_LiveCollector(self))

    # Hooks called by the factory and protocol.

    def replied(self, protocol: Counted) -> None:
        request = protocol.request
        command = request.command.phrase if request else "none"
        elapsed = self.factory.reactor.seconds() - protocol.started
        self.handshake.labels(command, protocol_of(protocol)).observe(max(0.0, elapsed))

    def closed(self, protocol: Counted) -> None:
        request = protocol.request
        command = request.command.phrase if request else "none"
        reply = protocol.reply.phrase if protocol.reply is not None else "none"
        self.connections.labels(command, reply, protocol_of(protocol)).inc()
        self._closed_bytes["up"] += protocol.counters.bytes_up
        self._closed_bytes["down"] += protocol.counters.bytes_down
        udp = protocol.udp
        if udp is not None:
            c = udp.counters
            self._closed_udp["up"] += c.datagrams_up
            self._closed_udp["down"] += c.datagrams_down
            self._closed_udp_bytes["up"] += c.bytes_up
            self._closed_udp_bytes["down"] += c.bytes_down
            for reason, count in c.drops.items():
                self._closed_drops[reason] = self._closed_drops.get(reason, 0) + count

    def refused_connection(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def limit_refused(self, limit: str, user: Optional[str] = None) -> None:
        """A request refused by ``limit``; by user too when ``user`` is given."""
        self.limit_refusals.labels(limit).inc()
        if user is not None:
            self.limit_refusals_by_user.labels(limit, user).inc()

    def auth_failed(self) -> None:
        self.auth_failures.inc()

    def render(self) -> bytes:
        return bytes(_prometheus().generate_latest(self.registry))


class _LiveCollector:
    """Totals that include the connections still open."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.metrics
        active = list(m.factory.active)
        tunnels = GaugeMetricFamily(
            "socks5_active_connections",
            "Client connections open now, by state.",
            labels=["state"],
        )
        states: Dict[str, int] = {}
        for p in active:
            states[p.state.value] = states.get(p.state.value, 0) + 1
        for state, count in sorted(states.items()):
            tunnels.add_metric([state], count)
        yield tunnels
        yield GaugeMetricFamily(
            "socks5_spliced_tunnels",
            "Tunnels on the zero-copy splice relay now (each holds two pipes).",
            value=m.factory.limits.spliced,
        )

        udps = [p.udp.counters for p in active if p.udp is not None]
        yield _both_ways(
            "socks5_relayed_bytes",
            "Bytes relayed over TCP, up (client to destination) and down.",
            m._closed_bytes,
            [p.counters for p in active],
            "bytes_up",
            "bytes_down",
        )
        yield _both_ways(
            "socks5_udp_datagrams",
            "UDP datagrams relayed, up and down.",
            m._closed_udp,
            udps,
            "datagrams_up",
            "datagrams_down",
        )
        yield _both_ways(
            "socks5_udp_bytes",
            "UDP payload bytes relayed, up and down.",
            m._closed_udp_bytes,
            udps,
            "bytes_up",
            "bytes_down",
        )
        drops = CounterMetricFamily(
            "socks5_udp_dropped_datagrams",
            "UDP datagrams dropped, by reason.",
            labels=["reason"],
        )
        totals = dict(m._closed_drops)
        for c in udps:
            for reason, count in c.drops.items():
                totals[reason] = totals.get(reason, 0) + count
        for reason, count in sorted(totals.items()):
            drops.add_metric([reason], count)
        yield drops


def _both_ways(
    name: str,
    documentation: str,
    closed: Dict[str, int],
    live: List[Any],
    up: str,
    down: str,
) -> Any:
    """A counter by direction: finished connections plus the open ones."""
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=["direction"])
    for direction, attribute in (("up", up), ("down", down)):
        total = closed[direction] + sum(getattr(c, attribute) for c in live)
        family.add_metric([direction], total)
    return family


class MetricsResource(resource.Resource):
    """``GET /metrics`` in the Prometheus text format."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.metrics.render()


def metrics_site(metrics: Metrics) -> server.Site:
    """A site serving ``/metrics`` (and the same at ``/``)."""
    root = resource.Resource()
    page = MetricsResource(metrics)
    root.putChild(b"metrics", page)
    root.putChild(b"", page)
    site = server.Site(root)
    site.noisy = False
    return site
