"""The Prometheus endpoint, scraped over HTTP while traffic flows."""

from __future__ import annotations

import re
from typing import Any

import pytest
import pytest_twisted
from conftest import Echo, all_closed, closed_port, listen, until
from test_errors import RawClient, connect_request, exchange
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

pytest.importorskip("prometheus_client")

from twisted_socks5.metrics import metrics_site  # noqa: E402
from twisted_socks5.splice import splice_available  # noqa: E402


def value(text: str, name: str, **labels: str) -> float:
    """The sample ``name{labels}`` in a Prometheus text page."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        match = re.match(r"([a-zA-Z0-9_:]+)(\{[^}]*\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if found == labels:
            return float(match.group(3))
    raise KeyError(f"{name}{labels}")


@pytest_twisted.ensureDeferred
async def test_scrape_counts_traffic_outcomes_and_latency(
    make_proxy: Any, tcp_target: Any
) -> None:
    factory, port = make_proxy(splice_after=1)  # the tunnel below is spliced
    metrics = factory.enable_metrics()
    site_port = listen(metrics_site(metrics))
    try:

        async def scrape() -> str:
            raw = await exchange(
                site_port.getHost().port, b"GET /metrics HTTP/1.0\r\n\r\n"
            )
            head, _, body = raw.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.0 200")
            return body.decode()

        # One refused CONNECT, one tunnel still open with traffic.
        await exchange(
            port, b"\x05\x01\x00" + connect_request("127.0.0.1", closed_port())
        )
        echo = tcp_target(Echo)
        client = RawClient(
            b"\x05\x01\x00" + connect_request("127.0.0.1", echo) + b"x" * 100
        )
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        await until(lambda: len(b"".join(client.received)) >= 12 + 100, "the echo")

        text = await scrape()
        assert (
            value(
                text,
                "socks5_connections_total",
                command="connect",
                reply="connection refused",
                protocol="socks5",
            )
            == 1
        )
        assert value(text, "socks5_active_connections", state="relaying") == 1
        spliced = 1 if splice_available() else 0
        assert value(text, "socks5_spliced_tunnels") == spliced
        assert value(text, "socks5_relayed_bytes_total", direction="up") == 100
        assert value(text, "socks5_relayed_bytes_total", direction="down") == 100
        assert (
            value(
                text,
                "socks5_handshake_seconds_count",
                command="connect",
                protocol="socks5",
            )
            == 2
        )

        client.transport.loseConnection()
        await client.done
        await all_closed(factory, 30)
        text = await scrape()
        assert (
            value(
                text,
                "socks5_connections_total",
                command="connect",
                reply="succeeded",
                protocol="socks5",
            )
            == 1
        )
        assert value(text, "socks5_relayed_bytes_total", direction="up") == 100
        assert value(text, "socks5_spliced_tunnels") == 0
    finally:
        await site_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_auth_failures_are_counted(make_proxy: Any) -> None:
    from test_clients import userpass

    factory, port = make_proxy(authenticators=[userpass(a="b")])
    metrics = factory.enable_metrics()
    await exchange(port, b"\x05\x01\x02\x01\x01a\x01x")
    await all_closed(factory, 30)
    assert metrics.auth_failures._value.get() == 1
