"""
The relay's guarantees through each of its paths, on real loopback sockets:
the ordinary copying relay (``copy``), the zero-copy splice relay from the
first byte (``splice``, Linux, ``splice_after=0``) and a tunnel that starts
copying and is handed to the splice relay by its first chunk (``handover``,
``splice_after=1``: the hand-over happens with bytes in flight).  Every test
runs once per path and checks that the path it asked for moved the bytes.
"""

from __future__ import annotations

import gc
import hashlib
import os
import socket
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import pytest_twisted
from conftest import LOOPBACKS, Echo, HashSink, Source, _Chunks, turn, until
from test_clients import _download, _read_all, _upload, _url_host
from test_flow import BOUND, TOTAL, FastSender, StallingSink, buffered
from twisted.internet import defer, error, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_socks5.codec import Address, Command, Request
from twisted_socks5.server import SOCKS5ServerFactory, SOCKS5ServerProtocol
from twisted_socks5.splice import PIPE_SIZE, _SocketEnd, splice_available
from twisted_socks5.testing import pattern_chunk, pattern_sha256

_needs_splice = pytest.mark.skipif(
    not splice_available(), reason="os.splice needs Linux"
)
#: Factory options per relay path.
PATHS = [
    pytest.param({"splice": False}, id="copy"),
    pytest.param({"splice": True, "splice_after": 0}, id="splice", marks=_needs_splice),
    pytest.param(
        {"splice": True, "splice_after": 1}, id="handover", marks=_needs_splice
    ),
]

SIXTEEN_MIB = 16 << 20
GREETING = b"\x05\x01\x00"


@pytest.fixture(params=PATHS)
def path(request: Any) -> Dict[str, Any]:
    return dict(request.param)


class Proxy:
    """A proxy on loopback that remembers every client connection it served."""

    def __init__(self, factory: SOCKS5ServerFactory, port: int, host: str) -> None:
        self.factory = factory
        self.port = port
        self.url = f"socks5://{_url_host(host)}:{port}"
        self.protocols: List[SOCKS5ServerProtocol] = []
        opened = factory.connection_opened

        def record(p: SOCKS5ServerProtocol) -> None:
            self.protocols.append(p)
            opened(p)

        factory.connection_opened = record  # type: ignore[method-assign]

    def assert_path(self) -> None:
        """
        Every tunnel went through the relay path the factory asked for (a
        hand-over needs a first chunk before either side's EOF).
        """
        relayed = [p for p in self.protocols if p.request is not None]
        assert relayed, "no tunnel was relayed"
        for p in relayed:
            took_splice = p.tunnel is not None and p.tunnel.splice is not None
            assert took_splice is self.factory.splice, p.outcome
        if not self.factory.active:
            assert self.factory.limits.spliced == 0, "pipes not accounted back"

    def request(self, port: int, host: str = "127.0.0.1") -> bytes:
        return (
            GREETING
            + Request(Command.CONNECT, Address.from_host(host, port)).to_bytes()
        )


@pytest.fixture
def factories() -> List[SOCKS5ServerFactory]:
    """The factories this test made (earlier tests' tunnels may still log)."""
    return []


@pytest.fixture
def make(
    make_proxy: Any, path: Dict[str, Any], factories: List[SOCKS5ServerFactory]
) -> Callable[..., Proxy]:
    def make(host: str = "127.0.0.1", **kwargs: Any) -> Proxy:
        factory, port = make_proxy(host, **path, **kwargs)
        factories.append(factory)
        return Proxy(factory, port, host)

    return make


@pytest.fixture
def events(factories: List[SOCKS5ServerFactory]) -> Iterator[List[Dict[str, Any]]]:
    """This test's per-connection log events (``socks5.connection``)."""
    seen: List[Dict[str, Any]] = []

    def watch(event: Dict[str, Any]) -> None:
        if event.get("event") == "socks5.connection" and any(
            event.get("log_source") is f for f in factories
        ):
            seen.append(event)

    globalLogPublisher.addObserver(watch)
    yield seen
    globalLogPublisher.removeObserver(watch)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def splice_descriptors() -> List[Any]:
    selectables = list(reactor.getReaders()) + list(reactor.getWriters())
    return [s for s in selectables if isinstance(s, _SocketEnd)]


# --------------------------------------------------------------------------
# A client speaking SOCKS5 on the reactor


@implementer(IHalfCloseableProtocol)
class Client(protocol.Protocol):
    """
    Sends the greeting and request (and optional pipelined payload) at once,
    then hands everything after the 12-byte reply to ``on_data``.  Closes
    once both halves of the connection are done, like a socket's close().
    """

    def __init__(self, request: bytes, early: bytes = b"") -> None:
        self.request = request
        self.early = early
        self.header = b""
        self.data = bytearray()
        self.relaying: defer.Deferred[None] = defer.Deferred()
        self.eof: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[BaseException] = defer.Deferred()
        self.write_closed = False

    def connectionMade(self) -> None:
        self.transport.write(self.request + self.early)

    def dataReceived(self, data: bytes) -> None:
        if len(self.header) < 12:
            need = 12 - len(self.header)
            self.header += data[:need]
            data = data[need:]
            if len(self.header) == 12:
                assert self.header[:4] == b"\x05\x00\x05\x00", self.header
                self.relaying.callback(None)
        if data:
            self.on_data(data)

    def on_data(self, data: bytes) -> None:
        self.data += data

    def readConnectionLost(self) -> None:
        self.eof.callback(None)
        if self.write_closed:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        if self.eof.called:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        if not self.eof.called:
            self.eof.callback(None)
        self.lost.callback(reason.value)


async def connect(proxy: Proxy, client: Client) -> Client:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port)
    await connectProtocol(endpoint, client)
    return client


# --------------------------------------------------------------------------
# Integrity


@pytest.mark.parametrize("proxy_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_sixteen_mib_each_way_sha256(
    make: Any, tcp_target: Any, events: Any, proxy_host: str
) -> None:
    proxy = make(proxy_host)
    sink = tcp_target(HashSink)
    source = tcp_target(Source)
    expected = pattern_sha256(SIXTEEN_MIB)
    digest = await threads.deferToThread(_upload, proxy.url, sink, SIXTEEN_MIB)
    assert digest.decode() == expected
    got = await threads.deferToThread(_download, proxy.url, source, SIXTEEN_MIB)
    assert got == expected
    await until(lambda: len(events) == 2, "two connection events")
    assert sorted((e["bytes_up"], e["bytes_down"]) for e in events) == [
        (len(b"16777216\n"), SIXTEEN_MIB),
        (SIXTEEN_MIB, 64),
    ]
    assert [e["outcome"] for e in events] == ["closed", "closed"]
    proxy.assert_path()


@pytest_twisted.ensureDeferred
async def test_byte_counters_include_pipelined_payload(
    make: Any, tcp_target: Any, events: Any
) -> None:
    """Payload sent with the request goes first, and is counted, on both paths."""
    proxy = make()
    sink = tcp_target(HashSink)
    early = b"sent with the request\n"
    rest = os.urandom(300_001)
    client = await connect(proxy, Client(proxy.request(sink), early))
    await client.relaying
    client.transport.write(rest)
    client.transport.loseWriteConnection()
    await client.lost
    assert client.data.decode() == hashlib.sha256(early + rest).hexdigest()
    await until(lambda: len(events) == 1, "the connection event")
    (event,) = events
    assert (event["bytes_up"], event["bytes_down"]) == (len(early + rest), 64)
    assert event["outcome"] == "closed"
    proxy.assert_path()


# --------------------------------------------------------------------------
# Half-close, both ways


ANSWER = 4 << 20


@implementer(IHalfCloseableProtocol)
class AnswerAfterEOF(HashSink):
    """Reads until EOF, then sends ANSWER pattern bytes and closes."""

    uploads: List[str] = []

    def readConnectionLost(self) -> None:
        AnswerAfterEOF.uploads.append(self.hash.hexdigest())
        self.transport.registerProducer(_Chunks(self.transport, ANSWER), False)


def _upload_then_read(url: str, port: int, size: int) -> bytes:
    """Send ``size`` bytes, half-close, then read the answer to the end."""
    import python_socks.sync

    proxy = python_socks.sync.Proxy.from_url(url)
    s = proxy.connect(dest_host="127.0.0.1", dest_port=port, timeout=60)
    try:
        s.sendall(os.urandom(size))
        s.shutdown(socket.SHUT_WR)
        return _read_all(s)
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_client_half_close_still_receives_the_whole_response(
    make: Any, tcp_target: Any, events: Any
) -> None:
    AnswerAfterEOF.uploads.clear()
    proxy = make()
    port = tcp_target(AnswerAfterEOF)
    answer = await threads.deferToThread(_upload_then_read, proxy.url, port, 1 << 20)
    assert hashlib.sha256(answer).hexdigest() == pattern_sha256(ANSWER)
    assert len(AnswerAfterEOF.uploads) == 1
    await until(lambda: len(events) == 1, "the connection event")
    assert (events[0]["bytes_up"], events[0]["bytes_down"]) == (1 << 20, ANSWER)
    proxy.assert_path()


@implementer(IHalfCloseableProtocol)
class SpeaksFirst(HashSink):
    """Says hello and half-closes at once, then reads until the client's EOF."""

    digests: List[str] = []

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.write(b"hello")
        self.transport.loseWriteConnection()

    def readConnectionLost(self) -> None:
        SpeaksFirst.digests.append(self.hash.hexdigest())
        self.transport.loseConnection()


@pytest_twisted.ensureDeferred
async def test_target_half_close_first_then_client_uploads(
    make: Any, tcp_target: Any, events: Any
) -> None:
    SpeaksFirst.digests.clear()
    proxy = make()
    port = tcp_target(SpeaksFirst)
    client = await connect(proxy, Client(proxy.request(port)))
    await client.eof  # the target's half-close reached us
    assert bytes(client.data) == b"hello"
    assert not client.lost.called
    upload = os.urandom(4 << 20)
    client.transport.write(upload)
    client.transport.loseWriteConnection()
    reason = await client.lost
    assert isinstance(reason, error.ConnectionDone)
    await until(lambda: bool(SpeaksFirst.digests), "the target's EOF")
    assert SpeaksFirst.digests == [hashlib.sha256(upload).hexdigest()]
    await until(lambda: len(events) == 1, "the connection event")
    assert (events[0]["bytes_up"], events[0]["bytes_down"]) == (len(upload), 5)
    assert events[0]["outcome"] == "closed"
    proxy.assert_path()


# --------------------------------------------------------------------------
# Flow control


def _user_space(proxy: Proxy) -> int:
    """Bytes the proxy holds in Twisted's write buffers, over all tunnels."""
    total = 0
    for p in proxy.factory.active:
        total += buffered(p.transport)
        if p.tunnel is not None and p.tunnel.outbound is not None:
            total += buffered(p.tunnel.outbound.transport)
    return total


def _in_pipes(proxy: Proxy) -> int:
    return sum(
        p.tunnel.splice.buffered
        for p in proxy.factory.active
        if p.tunnel is not None and p.tunnel.splice
    )


@pytest_twisted.ensureDeferred
async def test_stalled_target_stops_the_upload_without_buffering_it(
    make: Any, tcp_target: Any
) -> None:
    StallingSink.instances.clear()
    proxy = make()
    sink_port = tcp_target(StallingSink)
    peak = [0, 0]

    def on_progress() -> None:
        peak[0] = max(peak[0], _user_space(proxy))
        peak[1] = max(peak[1], _in_pipes(proxy))

    sender = FastSender(proxy.request(sink_port)[3:], on_progress)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), sender)
    await _wait_until_still(lambda: (sender.sent, sender.paused), on_progress)
    assert sender.paused, "the sender never stalled"
    assert sender.sent < TOTAL, "everything fit in kernel buffers: test is void"
    (server,) = proxy.factory.active
    assert server.counters.bytes_up < TOTAL
    if server.tunnel.splice is not None:
        # Stalled the splice way: bytes wait in the pipe, the client is not read.
        relay = server.tunnel.splice
        assert relay.up.pending > 0
        assert relay.target.writing and not relay.client.reading
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    assert peak[1] <= PIPE_SIZE
    _collect_garbage_while_paused(proxy)

    (sink,) = StallingSink.instances
    sink.transport.resumeProducing()
    digest = await sender.reply.addTimeout(120, reactor)
    assert digest.decode() == pattern_sha256(TOTAL)
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    assert peak[1] <= PIPE_SIZE
    proxy.assert_path()
    sender.transport.loseConnection()


class StallingReader(Client):
    """Asks a Source for TOTAL bytes (pipelined), then reads only when told."""

    def __init__(self, request: bytes, on_progress: Callable[[], None]) -> None:
        super().__init__(request, early=b"%d\n" % TOTAL)
        self.on_progress = on_progress
        self.hash = hashlib.sha256()
        self.received = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.transport.pauseProducing()

    def on_data(self, data: bytes) -> None:
        self.hash.update(data)
        self.received += len(data)
        self.on_progress()


@pytest_twisted.ensureDeferred
async def test_stalled_client_stops_the_download_without_buffering_it(
    make: Any, tcp_target: Any
) -> None:
    proxy = make()
    source_port = tcp_target(Source)
    peak = [0, 0]

    def on_progress() -> None:
        peak[0] = max(peak[0], _user_space(proxy))
        peak[1] = max(peak[1], _in_pipes(proxy))

    reader = StallingReader(proxy.request(source_port), on_progress)
    client = await connect(proxy, reader)
    await until(lambda: bool(proxy.factory.active), "the tunnel")
    (server,) = proxy.factory.active
    await until(lambda: server.counters.bytes_down > 0, "the download started")
    await _wait_until_still(lambda: server.counters.bytes_down, on_progress)
    assert server.counters.bytes_down < TOTAL, "everything fit in kernel buffers"
    if server.tunnel.splice is not None:
        relay = server.tunnel.splice
        assert relay.down.pending > 0
        assert relay.client.writing and not relay.target.reading
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    assert peak[1] <= PIPE_SIZE
    _collect_garbage_while_paused(proxy)

    client.transport.resumeProducing()
    await client.eof.addTimeout(120, reactor)  # the Source closed after TOTAL
    assert client.received == TOTAL
    assert client.hash.hexdigest() == pattern_sha256(TOTAL)
    assert peak[0] <= BOUND, f"proxy buffered {peak[0]} bytes"
    assert peak[1] <= PIPE_SIZE
    proxy.assert_path()
    client.transport.loseConnection()
    await client.lost


def _collect_garbage_while_paused(proxy: Proxy) -> None:
    """
    A paused Twisted transport is in no reactor map: if nothing else refers
    to it, the cyclic GC collects it and its socket's finaliser closes the
    descriptor, which the peer sees as a clean FIN.  (An unreferenced test
    target did exactly that once and looked like a relay bug.)  The proxy's
    stalled tunnel must hold its own sockets.
    """
    (server,) = proxy.factory.active
    fds = fd_count()
    gc.collect()
    assert fd_count() == fds, "a collected transport closed its socket"
    assert server.transport.connected and server.tunnel.outbound is not None
    assert server.tunnel.outbound.transport.connected


async def _wait_until_still(state: Callable[[], Any], on_progress: Any) -> None:
    """Reactor turns until ``state()`` has not changed for 200 turns."""
    last: Optional[Any] = None
    still = 0
    for _ in range(200_000):
        await turn()
        on_progress()
        current = state()
        still = still + 1 if current == last else 0
        last = current
        if still >= 200:
            return
    raise AssertionError("the transfer never stalled")


# --------------------------------------------------------------------------
# Errors and timeouts


class ResetMidway(protocol.Protocol):
    """Sends 256 KiB once asked, then resets the connection (RST)."""

    sent: Optional[bool] = None

    def dataReceived(self, data: bytes) -> None:
        if self.sent is None:
            self.sent = False
            self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if not self.sent:
            self.sent = True
            self.transport.write(pattern_chunk(0) * 4)
            return
        # Flushed to the kernel: now the reset.
        self.transport.unregisterProducer()
        self.transport.abortConnection()

    def stopProducing(self) -> None:
        pass


@pytest_twisted.ensureDeferred
async def test_target_reset_mid_transfer_aborts_the_client(
    make: Any, tcp_target: Any, events: Any
) -> None:
    proxy = make()
    port = tcp_target(ResetMidway)
    client = await connect(proxy, Client(proxy.request(port), early=b"go"))
    reason = await client.lost
    assert isinstance(reason, error.ConnectionLost), reason  # a reset, not an EOF
    assert len(client.data) <= 256 << 10
    await until(lambda: len(events) == 1, "the connection event")
    assert events[0]["outcome"].startswith("target connection lost"), events[0]
    proxy.assert_path()


class Watched(Echo):
    lost: List[BaseException] = []

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        Watched.lost.append(reason.value)


@pytest_twisted.ensureDeferred
async def test_client_reset_mid_transfer_aborts_the_target(
    make: Any, tcp_target: Any, events: Any
) -> None:
    Watched.lost.clear()
    proxy = make()
    port = tcp_target(Watched)
    client = await connect(proxy, Client(proxy.request(port), early=b"ping"))
    await until(lambda: bytes(client.data) == b"ping", "the echo")
    client.transport.abortConnection()
    await until(lambda: bool(Watched.lost), "the target's connectionLost")
    assert isinstance(Watched.lost[0], error.ConnectionLost), Watched.lost
    await until(lambda: len(events) == 1, "the connection event")
    proxy.assert_path()


@pytest_twisted.ensureDeferred
async def test_idle_timeout_closes_a_silent_tunnel(
    make: Any, tcp_target: Any, events: Any
) -> None:
    proxy = make(idle_timeout=0.2)
    port = tcp_target(Echo)
    client = await connect(proxy, Client(proxy.request(port), early=b"ping"))
    await until(lambda: bytes(client.data) == b"ping", "the echo")
    # Now silence: the proxy must give up on the tunnel by itself.
    reason = await client.lost.addTimeout(60, reactor)
    assert isinstance(reason, error.ConnectionLost), reason
    await until(lambda: len(events) == 1, "the connection event")
    assert events[0]["outcome"] == "idle timeout"
    assert (events[0]["bytes_up"], events[0]["bytes_down"]) == (4, 4)
    proxy.assert_path()
    assert splice_descriptors() == []


# --------------------------------------------------------------------------
# Resources


class CountedSink(HashSink):
    closed = 0

    def connectionLost(self, reason: Failure = Failure(error.ConnectionDone())) -> None:  # noqa: B008
        CountedSink.closed += 1


async def _short_tunnel(proxy: Proxy, port: int, i: int) -> None:
    payload = b"tunnel %d\n" % i
    client = await connect(proxy, Client(proxy.request(port), early=payload))
    await client.relaying
    client.transport.loseWriteConnection()
    reason = await client.lost
    assert isinstance(reason, error.ConnectionDone), reason
    assert client.data.decode() == hashlib.sha256(payload).hexdigest()


@pytest_twisted.ensureDeferred
async def test_no_descriptor_leak_after_many_tunnels(
    make: Any, tcp_target: Any
) -> None:
    proxy = make()
    port = tcp_target(CountedSink)
    CountedSink.closed = 0
    await _short_tunnel(proxy, port, -1)  # warm up whatever is created lazily
    await until(lambda: not proxy.factory.active and CountedSink.closed == 1, "idle")
    before = fd_count()
    selectables = len(reactor.getReaders()) + len(reactor.getWriters())
    for batch in range(10):
        await defer.gatherResults(
            [
                defer.ensureDeferred(_short_tunnel(proxy, port, batch * 20 + i))
                for i in range(20)
            ]
        )
    await until(
        lambda: not proxy.factory.active and CountedSink.closed == 201,
        "all tunnels closed on both sides",
    )
    assert fd_count() == before
    assert len(reactor.getReaders()) + len(reactor.getWriters()) == selectables
    assert splice_descriptors() == []
    assert len(proxy.protocols) == 201
    proxy.assert_path()


class _SpeaksFirst(Echo):
    """A destination with a banner (SMTP, FTP, SSH...): it talks on connect."""

    def connectionMade(self) -> None:
        self.transport.write(b"220 banner from the destination\r\n")


@pytest_twisted.ensureDeferred
async def test_a_destination_that_speaks_first_never_overtakes_the_reply(
    make: Any, tcp_target: Any
) -> None:
    proxy = make()
    port = tcp_target(_SpeaksFirst)
    for _ in range(20):  # each tunnel races the banner against the reply
        # The Client checks that the first 12 bytes are the SOCKS replies.
        client = await connect(proxy, Client(proxy.request(port), early=b"ping"))
        await until(lambda c=client: len(c.data) >= 37, "the banner and the echo")
        assert bytes(client.data) == b"220 banner from the destination\r\nping"
        client.transport.loseConnection()
        await client.lost
    await until(lambda: not proxy.factory.active, "every tunnel closed")
    proxy.assert_path()
