"""
What a reload's revocation sweep costs with many open tunnels, in memory
(no sockets): the whole sweep, and its longest slice, which is the longest
the reactor waits for it.

    PYTHONPATH=. /work/venv/bin/python bench/revocation_sweep.py [--tunnels N]

Half the tunnels go to a port the new rules deny, half are users of a
password table in which half the users then change; the rules file has a
few dozen lines, as a real one might.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, List

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from zope.interface import implementer

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import Address, Command, Request, UserPassRequest
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.outbound import IOutboundConnector
from twisted_socks5.rules import RuleSet
from twisted_socks5.server import SOCKS5ServerFactory, State
from twisted_socks5.testing import HalfCloseTransport

SERVER = IPv4Address("TCP", "127.0.0.1", 1080)
TARGET = IPv4Address("TCP", "127.0.0.1", 8080)


@implementer(IOutboundConnector)
class Connected:
    """Connects at once, in memory."""

    def connect(self, address: Any, factory: Any, *a: Any, **kw: Any) -> Any:
        protocol = factory.buildProtocol(TARGET)
        protocol.makeConnection(HalfCloseTransport(SERVER, TARGET))
        return defer.succeed(protocol)

    def resolve(self, name: str) -> Any:
        return defer.succeed(["127.0.0.1"])


def rules(deny_port: int) -> RuleSet:
    lines = [f"deny to 10.{i}.0.0/16 port {1000 + i}" for i in range(40)]
    if deny_port:
        lines.append(f"deny to 127.0.0.0/8 port {deny_port}")
    lines.append("default allow")
    return RuleSet.parse("\n".join(lines) + "\n", "bench.rules")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tunnels", type=int, default=20000)
    count = parser.parse_args().tunnels
    users = 200
    table = InMemoryUsernamePasswordDatabaseDontUse()
    table.users = {f"user{i}".encode(): b"pw" for i in range(users)}
    reactor = MemoryReactorClock()
    factory = SOCKS5ServerFactory(
        [UsernamePasswordAuthenticator.from_checkers(table)],
        reactor=reactor,
        connector=Connected(),
        policy=rules(0),
        limits=ConnectionLimits(reactor.seconds, max_connections=0, max_per_client=0),
    )
    opened: List[Any] = []
    for i in range(count):
        protocol = factory.buildProtocol(SERVER)
        peer = IPv4Address("TCP", "127.0.0.1", 1024 + i % 60000)
        protocol.makeConnection(HalfCloseTransport(SERVER, peer))
        user = f"user{i % users}".encode()
        port = 443 if i % 2 else 8443
        request = Request(Command.CONNECT, Address.from_host("127.0.0.1", port))
        protocol.dataReceived(
            b"\x05\x01\x02"
            + UserPassRequest(user, b"pw").to_bytes()
            + request.to_bytes()
        )
        opened.append(protocol)
    assert all(p.state is State.RELAYING for p in opened), "not all relaying"
    # Half the users change their password; the rules deny port 8443.
    for i in range(0, users, 2):
        table.users[f"user{i}".encode()] = b"new"
    factory.policy = rules(8443)
    slices: List[float] = []
    started = time.perf_counter()
    done = factory.reload()
    slices.append(time.perf_counter() - started)
    while not done.called:  # each later slice, one reactor turn each
        (call,) = [
            c
            for c in reactor.getDelayedCalls()
            if c.func.__module__ == "twisted_socks5.revocation"
        ]
        func, args = call.func, call.args
        call.cancel()
        before = time.perf_counter()
        func(*args)
        slices.append(time.perf_counter() - before)
    total = time.perf_counter() - started
    revoked = done.result
    print(
        f"{count} tunnels: {revoked} revoked in {total * 1000:.1f} ms "
        f"({total / count * 1e6:.2f} us per tunnel, 41 rules); "
        f"{len(slices)} reactor turns, the longest {max(slices) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
