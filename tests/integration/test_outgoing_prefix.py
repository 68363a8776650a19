"""
``--outgoing 2001:db8:1::/64``: a random address of the prefix per
connection (IP_FREEBIND), in a network namespace this test creates
(``unshare -rn``) where the prefix is routed to loopback
(``ip -6 route add local PREFIX dev lo``); nothing leaves the namespace.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import sys
import textwrap
from typing import Any, Dict

import pytest

PREFIX = "2001:db8:1::/64"

#: Runs inside the namespace: a proxy with --outgoing PREFIX, a TCP and a UDP
#: target on ::1 that report their peer; prints what they saw as JSON.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from twisted.internet import defer, protocol, reactor, task
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted_socks5.client import SOCKS5ClientEndpoint
    from twisted_socks5.codec import (
        Address, Command, Request, UDPDatagram, parse_udp_datagram)
    from twisted_socks5.options import Options
    from twisted_socks5.outbound import DirectConnector
    from twisted_socks5.tap import build_factory
    from twisted_socks5.testing import LoopbackResolver
    from test_outgoing import Line, ReportPeer, UDPReportPeer
    from test_bind_udp import UDPClient, control

    async def main(_):
        options = Options()
        options.parseOptions(["--outgoing", sys.argv[1]])
        factory = build_factory(options, reactor)
        # Names: localhost is 127.0.0.1 and ::1, with no system resolver.
        factory.connector = DirectConnector(
            reactor, 5, resolver=LoopbackResolver(),
            outgoing=factory.connector.outgoing)
        proxy = reactor.listenTCP(0, factory, interface="127.0.0.1")
        port = proxy.getHost().port
        target = reactor.listenTCP(
            0, protocol.Factory.forProtocol(ReportPeer), interface="::1")
        seen = []
        for host in ["::1"] * 4 + ["localhost"] * 2:
            endpoint = SOCKS5ClientEndpoint(
                TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                host, target.getHost().port)
            line = await endpoint.connect(protocol.Factory.forProtocol(Line))
            host, source_port = (await line.done).decode().split()
            bound = line.transport.bound
            seen.append([host, int(source_port), bound.host, bound.port])
        echo = reactor.listenUDP(0, UDPReportPeer(), interface="::1")
        me = UDPClient()
        reactor.listenUDP(0, me, interface="127.0.0.1")
        client = await control(port, "127.0.0.1", Request(
            Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0)))
        relay = (await client.reply(1)).address
        me.transport.write(UDPDatagram(
            Address.from_host("::1", echo.getHost().port), b"who").to_bytes(),
            (relay.host, relay.port))
        data, _ = await me.next()
        udp = parse_udp_datagram(data).data.decode().split()[0]
        print(json.dumps({"tcp": seen, "udp": udp}))

    task.react(lambda r: defer.ensureDeferred(main(r)))
    """
)


def _namespace_problem() -> str:
    """Why this machine cannot run the test, or ''."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    setup = f"ip link set lo up && ip -6 route add local {PREFIX} dev lo"
    run = subprocess.run(
        ["unshare", "-rn", "sh", "-c", setup],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if run.returncode:
        return (
            "cannot route an IPv6 prefix to loopback in a user network "
            f"namespace here (unshare -rn; {setup}): {run.stderr.strip()}"
        )
    return ""


def _run_in_namespace(prefix: str) -> Dict[str, Any]:
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [root, here, os.path.dirname(here), env.get("PYTHONPATH", "")]
    )
    setup = f"ip link set lo up && ip -6 route add local {prefix} dev lo"
    run = subprocess.run(
        ["unshare", "-rn", "sh", "-c", f'{setup} && exec "$0" -c "$1" "$2"']
        + [sys.executable, SCRIPT, prefix],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    result: Dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def test_a_random_address_of_the_prefix_per_connection() -> None:
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    result = _run_in_namespace(PREFIX)
    network = ipaddress.IPv6Network(PREFIX)
    sources = set()
    for host, port, bound_host, bound_port in result["tcp"]:
        assert ipaddress.IPv6Address(host) in network
        # BND.ADDR is the address the target saw.
        assert (bound_host, bound_port) == (host, port)
        sources.add(host)
    # Six draws from 2**64 addresses (by address, by name): all different.
    assert len(sources) == 6
    assert ipaddress.IPv6Address(result["udp"]) in network
