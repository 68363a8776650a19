"""
The splice relay on its own: when it steps aside, how it hands over and
how it cleans up.  Real loopback sockets wherever the kernel matters; the
tunnel guarantees through both relay paths are in
``tests/integration/test_relay_paths.py``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import termios
from typing import Any, Callable, Iterator, List, Optional

import pytest
import pytest_twisted
from helpers import Harness, until
from twisted.internet import defer, error, protocol, reactor, ssl
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from zope.interface.verify import verifyObject

import twisted_socks5.splice as splice_module
from twisted_socks5.codec import Address, AddressType, Command, Request
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.relay import OutboundProtocol, RelayCounters
from twisted_socks5.splice import (
    SpliceRelay,
    _SocketEnd,
    plain_tcp,
    splice_available,
    start_splice_relay,
)
from twisted_socks5.tunnel import ActivityWatch
from twisted_socks5.tunnel import Tunnel as SOCKSTunnel

needs_splice = pytest.mark.skipif(
    not splice_available(), reason="os.splice needs Linux and Python 3.10+"
)

REPLY = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
TARGET = Address(AddressType.IPV4, "127.0.0.1", 8080)


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Read ``size`` bytes from a non-blocking socket, letting the reactor run."""
    data = bytearray()

    def more() -> bool:
        try:
            chunk = sock.recv(size - len(data))
        except BlockingIOError:
            return False
        if not chunk:
            raise AssertionError(f"EOF after {len(data)} of {size} bytes")
        data.extend(chunk)
        return len(data) == size

    await until(more, f"{size} bytes")
    return bytes(data)


async def recv_eof(sock: socket.socket) -> None:
    def eof() -> bool:
        try:
            chunk = sock.recv(1)
        except BlockingIOError:
            return False
        assert chunk == b"", chunk
        return True

    await until(eof, "EOF")


async def recv_error(sock: socket.socket) -> int:
    """The errno a socket reports once the reactor has aborted its peer."""
    result: List[int] = []

    def failed() -> bool:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            return False
        except OSError as e:
            result.append(e.errno or 0)
            return True
        assert chunk, "clean EOF instead of a reset"
        return False

    await until(failed, "a connection error")
    return result[0]


def queued(fd: int) -> int:
    """Bytes waiting in a socket's receive queue."""
    buf = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def assert_closed(fds: Any) -> None:
    for fd in fds:
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


def our_descriptors() -> List[Any]:
    return [
        d
        for d in list(reactor.getReaders()) + list(reactor.getWriters())
        if isinstance(d, _SocketEnd)
    ]


class _Settings:
    """The factory settings a tunnel reads."""

    splice = True
    splice_after = 0
    idle_timeout: Optional[float] = None
    stall_timeout: Optional[float] = None

    def __init__(self) -> None:
        self.limits = ConnectionLimits(reactor.seconds)
        self.watch = ActivityWatch(reactor, list)


class RecordingTunnel(SOCKSTunnel):
    """The real tunnel, remembering how its target was lost."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.target_lost_reasons: List[Failure] = []

    def target_lost(self, reason: Failure) -> None:
        self.target_lost_reasons.append(reason)
        super().target_lost(reason)


class FakeServer(protocol.Protocol):
    """The client's side of a tunnel, as SOCKS5ServerProtocol, on a real socket."""

    def __init__(self) -> None:
        self.counters = RelayCounters()
        self.tunnel: Optional[RecordingTunnel] = None
        #: What Twisted read from the client: nothing, once the relay starts.
        self.read_by_twisted = b""
        #: Fires with the exception connectionLost was called with.
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def connectionMade(self) -> None:
        # As at the hook: the client still read (the server does not pause
        # it while connecting), the reply queued in Twisted.
        self.transport.write(REPLY)

    def dataReceived(self, data: bytes) -> None:
        self.read_by_twisted += data

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if self.tunnel is not None and self.tunnel.splice is not None:
            self.tunnel.splice.stop()
        self.lost.callback(reason.value)


class FakeOutbound(OutboundProtocol):
    """The real outbound protocol, telling the test when it is gone."""

    def __init__(self) -> None:
        super().__init__()
        self.lost: defer.Deferred[BaseException] = defer.Deferred()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        super().connectionLost(reason)
        self.lost.callback(reason.value)


class _Recording(protocol.Factory):
    noisy = False

    def __init__(self, protocol_class: type) -> None:
        self.protocol = protocol_class
        self.built: List[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        p = protocol.Factory.buildProtocol(self, addr)
        self.built.append(p)
        return p


class Tunnel:
    """The proxy's two accepted transports and the peers' raw sockets."""

    server: FakeServer
    outbound: FakeOutbound
    tunnel: RecordingTunnel
    client: socket.socket
    target: socket.socket
    relay: Optional[SpliceRelay] = None

    def start(self, early: bytes = b"") -> SpliceRelay:
        relay = start_splice_relay(self.tunnel, early)
        assert relay is not None
        self.relay = self.tunnel.splice = relay
        return relay

    async def started(self, early: bytes = b"") -> SpliceRelay:
        relay = self.start(early)
        await self.started_already()
        if early:
            assert await recv_exactly(self.target, len(early)) == early
        return relay

    async def started_already(self) -> None:
        """Wait until the relay started by :meth:`start` took over."""
        relay = self.relay
        assert relay is not None
        await until(lambda: relay.started, "the relay took over")
        assert await recv_exactly(self.client, len(REPLY)) == REPLY


@pytest.fixture
def make_tunnel() -> Iterator[Callable[[], Any]]:
    ports: List[Any] = []
    tunnels: List[Tunnel] = []

    async def make() -> Tunnel:
        servers = _Recording(FakeServer)
        targets = _Recording(FakeOutbound)
        for f in (servers, targets):
            ports.append(reactor.listenTCP(0, f, interface="127.0.0.1"))
        t = Tunnel()
        t.client = socket.create_connection(("127.0.0.1", ports[-2].getHost().port))
        t.target = socket.create_connection(("127.0.0.1", ports[-1].getHost().port))
        t.client.setblocking(False)
        t.target.setblocking(False)
        tunnels.append(t)
        await until(lambda: bool(servers.built and targets.built), "accept")
        t.server, t.outbound = servers.built[0], targets.built[0]
        t.tunnel = RecordingTunnel(
            _Settings(), t.server.transport, t.outbound, t.server.counters
        )
        t.server.tunnel = t.tunnel
        return t

    yield make
    for t in tunnels:
        t.client.close()
        t.target.close()
        if t.relay is not None:
            t.relay.stop()
        for p in (getattr(t, "server", None), getattr(t, "outbound", None)):
            if p is not None and p.transport.connected:
                p.transport.abortConnection()
    for port in ports:
        pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))
    for t in tunnels:
        for p in (getattr(t, "server", None), getattr(t, "outbound", None)):
            if p is not None:
                pytest_twisted.blockon(p.lost)


def reset(sock: socket.socket) -> None:
    """Close with a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --------------------------------------------------------------------------
# When the relay steps aside


def test_string_transports_fall_back_to_the_ordinary_relay() -> None:
    h = Harness(splice=True)
    h.send(b"\x05\x01\x00" + Request(Command.CONNECT, TARGET).to_bytes())
    _, out_transport = h.connector.succeed()
    assert h.protocol.tunnel is not None and h.protocol.tunnel.splice is None
    h.send(b"payload")
    assert out_transport.value() == b"payload"
    assert h.protocol.counters.bytes_up == len(b"payload")


def test_fakes_are_not_plain_tcp() -> None:
    assert not plain_tcp(StringTransport())
    assert not plain_tcp(iosim.FakeTransport(protocol.Protocol(), True))
    assert not plain_tcp(None)


@pytest_twisted.ensureDeferred
async def test_real_tcp_transports_are_plain_tcp(make_tunnel: Any) -> None:
    t = await make_tunnel()
    assert plain_tcp(t.server.transport)
    assert plain_tcp(t.outbound.transport)


@pytest_twisted.ensureDeferred
async def test_without_os_splice_nothing_is_touched(
    make_tunnel: Any, monkeypatch: Any
) -> None:
    t = await make_tunnel()
    monkeypatch.delattr(os, "splice", raising=False)
    before = open_fds()
    assert start_splice_relay(t.tunnel, b"early") is None
    assert open_fds() == before
    assert t.server.transport.producer is None
    assert t.outbound.transport.producer is None and t.tunnel.splice is None


@pytest_twisted.ensureDeferred
async def test_a_reactor_without_fd_sets_falls_back(
    make_tunnel: Any, monkeypatch: Any
) -> None:
    t = await make_tunnel()
    monkeypatch.setattr(t.server.transport, "reactor", Clock())
    monkeypatch.setattr(t.outbound.transport, "reactor", Clock())
    before = open_fds()
    assert start_splice_relay(t.tunnel, b"") is None
    assert open_fds() == before


# Twisted's certificate options still hand pyOpenSSL objects to pyOpenSSL.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest_twisted.ensureDeferred
async def test_tls_transports_fall_back(make_tunnel: Any) -> None:
    t = await make_tunnel()
    pem = os.path.join(os.path.dirname(ssl.__file__), "..", "test", "server.pem")
    with open(pem, "rb") as f:
        certificate = ssl.PrivateCertificate.loadPEM(f.read())
    t.server.transport.startTLS(certificate.options())
    assert not plain_tcp(t.server.transport)
    assert start_splice_relay(t.tunnel, b"") is None


@pytest_twisted.ensureDeferred
async def test_unix_sockets_fall_back(tmp_path: Any) -> None:
    servers = _Recording(FakeServer)
    port = reactor.listenUNIX(str(tmp_path / "s"), servers)
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        peer.connect(str(tmp_path / "s"))
        await until(lambda: bool(servers.built), "accept")
        (server,) = servers.built
        assert not plain_tcp(server.transport)
        server.transport.abortConnection()
        await server.lost
    finally:
        peer.close()
        await defer.maybeDeferred(port.stopListening)


# --------------------------------------------------------------------------
# Hand-over and relaying


@needs_splice
@pytest_twisted.ensureDeferred
async def test_reply_and_early_data_go_first_then_bytes_move_both_ways(
    make_tunnel: Any,
) -> None:
    t = await make_tunnel()
    relay = await t.started(early=b"pipelined")
    assert t.server.transport.producer is None
    assert t.outbound.transport.producer is None
    for end in (relay.client, relay.target):
        verifyObject(IReadDescriptor, end)
        verifyObject(IWriteDescriptor, end)
    t.client.sendall(b"up")
    assert await recv_exactly(t.target, 2) == b"up"
    t.target.sendall(b"down!")
    assert await recv_exactly(t.client, 5) == b"down!"
    counters = t.server.counters
    assert (counters.bytes_up, counters.bytes_down) == (len(b"pipelined") + 2, 5)
    assert counters.active


@needs_splice
@pytest_twisted.ensureDeferred
async def test_bytes_sent_while_the_reply_drains_are_spliced_in_order(
    make_tunnel: Any,
) -> None:
    """
    The relay stops Twisted reading the client before it waits for the
    reply to drain: what the client sends meanwhile must not be read (and
    forwarded) by Twisted, behind the splice relay's back.
    """
    t = await make_tunnel()
    t.start(early=b"early,")
    t.client.sendall(b"then more")  # in the socket before the next turn
    await t.started_already()
    assert await recv_exactly(t.target, len(b"early,then more")) == b"early,then more"
    assert t.server.read_by_twisted == b""


@needs_splice
@pytest_twisted.ensureDeferred
async def test_half_closes_both_ways_then_closes_cleanly(make_tunnel: Any) -> None:
    t = await make_tunnel()
    relay = await t.started()
    fds = relay.pipe_fds
    t.client.shutdown(socket.SHUT_WR)
    await recv_eof(t.target)
    assert t.server.counters.up_closed
    t.target.sendall(b"after the client's EOF")
    assert await recv_exactly(t.client, 22) == b"after the client's EOF"
    t.target.shutdown(socket.SHUT_WR)
    await recv_eof(t.client)
    assert isinstance(await t.server.lost, error.ConnectionDone)
    assert isinstance(await t.outbound.lost, error.ConnectionDone)
    assert relay.stopped
    assert_closed(fds)
    assert our_descriptors() == []


@needs_splice
@pytest_twisted.ensureDeferred
async def test_client_eof_seen_during_the_connect_is_forwarded(
    make_tunnel: Any,
) -> None:
    t = await make_tunnel()
    t.tunnel.client_eof = True
    await t.started(early=b"last words")
    await recv_eof(t.target)
    t.target.sendall(b"reply")
    assert await recv_exactly(t.client, 5) == b"reply"


@needs_splice
@pytest_twisted.ensureDeferred
async def test_stop_is_idempotent_and_closes_the_pipes(make_tunnel: Any) -> None:
    t = await make_tunnel()
    relay = await t.started()
    assert our_descriptors() != []
    before = open_fds()
    fds = relay.pipe_fds
    relay.stop()
    relay.stop()
    assert_closed(fds)
    assert open_fds() == before - 4
    assert our_descriptors() == []
    # Twisted still owns the sockets and closes them as usual.
    t.server.transport.loseConnection()
    assert isinstance(await t.server.lost, error.ConnectionDone)


@needs_splice
@pytest_twisted.ensureDeferred
async def test_stop_while_flushing_lets_go_of_the_transports(
    make_tunnel: Any,
) -> None:
    t = await make_tunnel()
    relay = t.start(early=b"x" * 100)
    assert t.server.transport.producer is not None
    relay.stop()
    assert t.server.transport.producer is None
    assert t.outbound.transport.producer is None
    assert_closed(relay.pipe_fds)
    # With the producer gone, loseConnection() completes.
    t.server.transport.loseConnection()
    t.outbound.transport.loseConnection()
    await t.server.lost
    await t.outbound.lost
    assert not relay.started


@needs_splice
@pytest_twisted.ensureDeferred
async def test_target_lost_before_the_takeover_ends_the_client(
    make_tunnel: Any,
) -> None:
    t = await make_tunnel()
    relay = t.start(early=b"x")
    t.outbound.transport.abortConnection()
    assert isinstance(await t.outbound.lost, error.ConnectionAborted)
    assert relay.stopped and not relay.started
    assert_closed(relay.pipe_fds)
    assert [r.type for r in t.tunnel.target_lost_reasons] == [error.ConnectionAborted]
    await t.server.lost


@needs_splice
@pytest_twisted.ensureDeferred
async def test_target_reset_aborts_the_client(make_tunnel: Any) -> None:
    t = await make_tunnel()
    relay = await t.started()
    reset(t.target)
    assert await recv_error(t.client) == errno.ECONNRESET
    assert isinstance(await t.server.lost, error.ConnectionAborted)
    assert t.tunnel.outcome.startswith("target connection lost: ")
    assert relay.stopped
    assert our_descriptors() == []


@needs_splice
@pytest_twisted.ensureDeferred
async def test_a_hangup_reported_by_the_reactor_aborts_both(
    make_tunnel: Any,
) -> None:
    t = await make_tunnel()
    relay = await t.started()
    # What the reactor does on EPOLLHUP/EPOLLERR for a descriptor not reading.
    relay.client.connectionLost(Failure(error.ConnectionLost()))
    assert relay.stopped
    assert_closed(relay.pipe_fds)
    assert isinstance(await t.server.lost, error.ConnectionAborted)
    assert isinstance(await t.outbound.lost, error.ConnectionAborted)
    assert t.tunnel.outcome == "relaying"  # the client side: not the target's fault


@needs_splice
@pytest_twisted.ensureDeferred
async def test_a_refused_pipe_size_is_not_an_error(
    make_tunnel: Any, monkeypatch: Any
) -> None:
    real_fcntl = fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == fcntl.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "over the pipe quota")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(fcntl, "fcntl", refusing)
    t = await make_tunnel()
    relay = await t.started()
    assert relay.up.size == relay.down.size == 65536
    payload = os.urandom(100_000)
    t.client.sendall(payload)  # fits the kernel's socket buffers at once
    assert await recv_exactly(t.target, len(payload)) == payload


@needs_splice
@pytest_twisted.ensureDeferred
async def test_one_wakeup_does_a_bounded_number_of_splices(
    make_tunnel: Any, monkeypatch: Any
) -> None:
    t = await make_tunnel()
    relay = await t.started()
    calls = [0]
    real_splice = splice_module._SPLICE

    def counting(*args: Any) -> int:
        calls[0] += 1
        return real_splice(*args)

    monkeypatch.setattr(splice_module, "_SPLICE", counting)
    monkeypatch.setattr(splice_module, "SPLICES_PER_WAKEUP", 2)
    relay.up.size = 1000  # small reads, so that 64 kB need many rounds
    payload = os.urandom(64_000)
    # Hold the relay back until the proxy's socket has all of it queued.
    relay.client.want_read(False)
    t.client.sendall(payload)
    await until(lambda: queued(relay.client.fd) == len(payload), "queued")
    relay.pump(relay.up)
    assert calls[0] == 2
    assert t.server.counters.bytes_up == 1000
    # The reactor's readiness callbacks move the rest, a little at a time.
    assert await recv_exactly(t.target, len(payload)) == payload
    assert calls[0] >= 2 * len(payload) // 1000
