"""
The limits on real sockets: clients behind a PROXY header are counted from
accept, and at a low descriptor limit UDP associations are refused before
the process runs out of descriptors.
"""

from __future__ import annotations

import signal
import socket
import sys
from typing import Any, Iterator, List, Optional, Tuple

import pytest
import pytest_twisted
from conftest import HAS_IPV6, all_closed, closed_port, turn, until
from test_bind_udp import UDPEcho
from test_errors import connect_request, exchange, failure
from test_twistd import TWISTD, Twistd, _env
from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    serverFromString,
)

from twisted_socks5.codec import (
    Address,
    Command,
    ReplyCode,
    Request,
    UDPDatagram,
    parse_reply,
    parse_udp_datagram,
)
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.server import SOCKS5ServerFactory

GREETING = b"\x05\x01\x00"


def _hello() -> bytes:
    """A whole exchange the proxy ends itself: a CONNECT to a closed port."""
    return GREETING + connect_request("127.0.0.1", closed_port())


#: What the proxy answers to it.
REFUSED = b"\x05\x00" + failure(ReplyCode.CONNECTION_REFUSED)


class Silent(protocol.Protocol):
    """Connects and says nothing."""


@pytest.fixture
def haproxy() -> Iterator[Any]:
    ports: List[Any] = []

    async def listen(
        protect_host: Any = None, **limits: Any
    ) -> Tuple[SOCKS5ServerFactory, int]:
        # The destinations here are on loopback: no host protection unless
        # a test asks (behind a PROXY header every client is from outside).
        factory = SOCKS5ServerFactory(reactor=reactor, protect_host=protect_host)
        factory.limits = ConnectionLimits(reactor.seconds, **limits)
        endpoint = serverFromString(reactor, "haproxy:tcp:0:interface=127.0.0.1")
        port = await endpoint.listen(factory)
        ports.append(port)
        return factory, port.getHost().port

    yield listen
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


def _header(ip: str) -> bytes:
    return f"PROXY TCP4 {ip} 127.0.0.1 5555 1080\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_a_silent_client_holds_a_slot(haproxy: Any) -> None:
    """Counted from accept: two clients that never send fill a server of two."""
    factory, port = await haproxy(max_connections=2, max_per_client=0)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    silent = [await connectProtocol(endpoint, Silent()) for _ in range(2)]
    await until(lambda: factory.limits.total == 2, "both silent clients counted")
    assert await exchange(port, _header("192.0.2.9") + _hello()) == b""
    for client in silent:
        client.transport.loseConnection()
    await all_closed(factory)
    assert factory.limits.total == 0 and factory.limits.per_client == {}
    assert await exchange(port, _header("192.0.2.9") + _hello()) == REFUSED


@pytest_twisted.ensureDeferred
async def test_behind_haproxy_each_client_has_its_own_limit(haproxy: Any) -> None:
    factory, port = await haproxy(max_connections=10, max_per_client=1)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    first = await connectProtocol(endpoint, Silent())
    first.transport.write(_header("192.0.2.1") + GREETING)
    await until(lambda: factory.limits.per_client == {"192.0.2.1": 1}, "counted")
    # Same client again: refused, and no longer counted at all.
    assert await exchange(port, _header("192.0.2.1") + _hello()) == b""
    assert factory.limits.total == 1
    # Another client behind the same balancer is not affected.
    assert await exchange(port, _header("192.0.2.2") + _hello()) == REFUSED
    first.transport.loseConnection()
    await all_closed(factory)
    assert factory.limits.total == 0 and factory.limits.per_client == {}


# --------------------------------------------------------------------------
# A real twistd at a low descriptor limit

#: Low enough that associations of four descriptors, at the connection cap
#: a limit of three per connection allows, would exhaust the process.
NOFILE = 400


def _start_limited(cwd: Any, *socks5: str) -> Twistd:
    """``twistd -n socks5`` with RLIMIT_NOFILE (soft and hard) at NOFILE."""
    process = Twistd()
    wrapper = (
        "import os, resource, sys; "
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    args = [
        sys.executable,
        "-c",
        wrapper,
        TWISTD,
        "-n",
        "--pidfile=",
        "socks5",
        "--listen",
        "tcp:0:interface=127.0.0.1",
        *socks5,
    ]
    reactor.spawnProcess(process, sys.executable, args, env=_env(), path=str(cwd))
    return process


def _recv_exactly(s: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        try:
            chunk = s.recv(size - len(data))
        except ConnectionError:
            break
        if not chunk:
            break
        data += chunk
    return data


def _associate(port: int, echoes: List[Tuple[str, int]]) -> Optional[Any]:
    """
    One association that sends through every family's outbound socket:
    its sockets, or None when the proxy refused the client; an error reply
    or a lost datagram fails the test.
    """
    request = Request(Command.UDP_ASSOCIATE, Address.from_host("0.0.0.0", 0))
    try:
        control = socket.create_connection(("127.0.0.1", port), timeout=20)
        control.sendall(GREETING + request.to_bytes())
    except ConnectionError:  # refused at accept (a reset) before the request
        return None
    answer = _recv_exactly(control, 2 + 10)
    if len(answer) < 2 + 10:
        control.close()
        assert answer in (b"", b"\x05\x00"), answer
        return None
    parsed = parse_reply(answer[2:])
    assert parsed is not None
    reply, _ = parsed
    assert reply.reply is ReplyCode.SUCCEEDED, reply
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(20)
    relay = (reply.address.host, reply.address.port)
    for host, echo in echoes:
        payload = f"to {host}".encode()
        udp.sendto(
            UDPDatagram(Address.from_host(host, echo), payload).to_bytes(), relay
        )
        back = parse_udp_datagram(udp.recv(65535))
        assert back.data == payload
    return control, udp


def _associate_many(port: int, count: int, echoes: List[Tuple[str, int]]) -> Any:
    held, refused = [], 0
    for _ in range(count):
        sockets = _associate(port, echoes)
        if sockets is None:
            refused += 1
        else:
            held.append(sockets)
    return held, refused


@pytest_twisted.ensureDeferred
async def test_at_a_low_descriptor_limit_associations_are_refused_not_failed(
    tmp_path: Any,
) -> None:
    echo_ports = [reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")]
    if HAS_IPV6:
        echo_ports.append(reactor.listenUDP(0, UDPEcho(), interface="::1"))
    echoes = [(p.getHost().host, p.getHost().port) for p in echo_ports]
    process = _start_limited(tmp_path, "--max-connections-per-client", "0")
    held: List[Any] = []
    try:
        port = await process.listening.addTimeout(30, reactor)
        held, refused = await threads.deferToThread(_associate_many, port, 130, echoes)
        assert held and refused
        for control, udp in held:
            control.close()
            udp.close()
        held = []
        await process.wait_for(b"out of descriptors").addTimeout(30, reactor)
        # Still serving once the associations are gone.
        for _ in range(50):
            sockets = await threads.deferToThread(_associate, port, echoes)
            if sockets is not None:
                break
            await turn()
        assert sockets is not None
        held.append(sockets)
    finally:
        for control, udp in held:
            control.close()
            udp.close()
        process.transport.signalProcess(signal.SIGTERM)
        await process.ended
        for echo in echo_ports:
            await echo.stopListening()
    output = b"".join(process.output)
    assert b"Too many open files" not in output and b"EMFILE" not in output
    assert b"udp associate failed" not in output
