"""
The floor of connection churn for a CPython SOCKS5 relay: not a server.

The least a SOCKS5 CONNECT relay can do per connection in CPython (no
logging, no timeouts, no limits, no error replies, IPv4 only, level-
triggered epoll), to tell what in the churn figure is the language, what
is the framework and what is our server.  Three variants:

- ``--loop epoll`` (default): its own ``select.epoll`` loop;
- ``--loop twisted``: the same descriptors driven by Twisted's epoll reactor
  (``addReader``/``addWriter``), without Twisted transports or protocols;
- ``--loop transports``: Twisted's TCP transports and two minimal protocols,
  with the server's own shortcuts (``tcpconnect``, ``writenow``): what any
  SOCKS server built on ``Protocol``/``Factory`` pays before it does
  anything a real server does (timeouts, limits, rules, logs, replies to
  errors, authentication).

Measure it like any proxy (it listens on 127.0.0.1 only)::

    python bench/bench.py --only churn --no-others \\
        --proxy-cmd "python bench/floor.py {port}"

Never deploy it: it trusts its input, and a malformed request kills it.
"""

from __future__ import annotations

import argparse
import contextlib
import select
import socket
import struct
from typing import Any, Callable, Dict, Optional

GREETING, REQUEST, CONNECTING, RELAYING, DONE = range(5)


class Conn:
    """One socket of a tunnel and what the relay knows of it."""

    __slots__ = ("sock", "fd", "peer", "stage")

    def __init__(self, sock: socket.socket, stage: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer: Optional[Conn] = None
        self.stage = stage


class Relay:
    """The SOCKS5 state machine on raw sockets; ``watch`` is the event loop's."""

    def __init__(self, watch: Callable[[Conn, int], None]) -> None:
        #: watch(conn, mask): 0 = nothing, 1 = readable, 2 = writable.
        self.watch = watch
        self.forget: Callable[[Conn], None] = lambda conn: None

    def accepted(self, sock: socket.socket) -> Conn:
        sock.setblocking(False)
        conn = Conn(sock, GREETING)
        self.watch(conn, 1)
        return conn

    def writable(self, out: Conn) -> None:
        """The outbound connect finished."""
        client = out.peer
        assert client is not None
        if out.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self.close(out)
            self.close(client)
            return
        out.stage = client.stage = RELAYING
        host, port = out.sock.getsockname()[:2]
        reply = b"\x05\x00\x00\x01" + socket.inet_aton(host) + struct.pack("!H", port)
        client.sock.send(reply)
        self.watch(out, 1)
        self.watch(client, 1)

    def readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except ConnectionError:
            data = b""
        if conn.stage < CONNECTING and not data:
            self.close(conn)  # gone during the handshake (the bench's probes)
        elif conn.stage == GREETING:
            conn.sock.send(b"\x05\x00")
            conn.stage = REQUEST
        elif conn.stage == REQUEST:
            host = socket.inet_ntoa(data[4:8])
            (port,) = struct.unpack("!H", data[8:10])
            out = Conn(socket.socket(socket.AF_INET, socket.SOCK_STREAM), CONNECTING)
            out.sock.setblocking(False)
            out.sock.connect_ex((host, port))
            out.peer, conn.peer, conn.stage = conn, out, CONNECTING
            self.watch(conn, 0)
            self.watch(out, 2)
        elif data:
            assert conn.peer is not None
            conn.peer.sock.send(data)
        else:
            peer = conn.peer
            assert peer is not None
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_WR)
            self.watch(conn, 0)
            conn.stage = DONE
            if peer.stage == DONE:
                self.close(conn)
                self.close(peer)

    def close(self, conn: Conn) -> None:
        self.forget(conn)
        conn.sock.close()


def listener(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def run_epoll(port: int) -> None:
    poller = select.epoll()
    conns: Dict[int, Conn] = {}
    registered: Dict[int, int] = {}
    masks = {0: 0, 1: select.EPOLLIN, 2: select.EPOLLOUT}

    def watch(conn: Conn, mask: int) -> None:
        conns[conn.fd] = conn
        if conn.fd in registered:
            poller.modify(conn.fd, masks[mask])
        else:
            poller.register(conn.fd, masks[mask])
            registered[conn.fd] = 1

    def forget(conn: Conn) -> None:
        if registered.pop(conn.fd, None):
            poller.unregister(conn.fd)
        conns.pop(conn.fd, None)

    relay = Relay(watch)
    relay.forget = forget
    listening = listener(port)
    poller.register(listening.fileno(), select.EPOLLIN)
    while True:
        for fd, event in poller.poll():
            if fd == listening.fileno():
                while True:
                    try:
                        sock, _ = listening.accept()
                    except BlockingIOError:
                        break
                    relay.accepted(sock)
                continue
            conn = conns.get(fd)
            if conn is None:
                continue
            if conn.stage == CONNECTING and event & select.EPOLLOUT:
                relay.writable(conn)
            else:
                relay.readable(conn)


class _Descriptor:
    """A Conn as Twisted's IReadDescriptor/IWriteDescriptor."""

    def __init__(self, relay: Relay, conn: Conn) -> None:
        self.relay = relay
        self.conn = conn

    def fileno(self) -> int:
        return self.conn.fd

    def logPrefix(self) -> str:
        return "floor"

    def doRead(self) -> None:
        self.relay.readable(self.conn)

    def doWrite(self) -> None:
        self.relay.writable(self.conn)

    def connectionLost(self, reason: Any) -> None:
        pass


def run_twisted(port: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor

    descriptors: Dict[int, _Descriptor] = {}

    def watch(conn: Conn, mask: int) -> None:
        d = descriptors.get(conn.fd)
        if d is None or d.conn is not conn:
            d = descriptors[conn.fd] = _Descriptor(relay, conn)
        (reactor.addReader if mask == 1 else reactor.removeReader)(d)  # type: ignore[attr-defined]
        (reactor.addWriter if mask == 2 else reactor.removeWriter)(d)  # type: ignore[attr-defined]

    def forget(conn: Conn) -> None:
        d = descriptors.pop(conn.fd, None)
        if d is not None:
            reactor.removeReader(d)  # type: ignore[attr-defined]
            reactor.removeWriter(d)  # type: ignore[attr-defined]

    relay = Relay(watch)
    relay.forget = forget
    listening = listener(port)

    class Accept:
        def fileno(self) -> int:
            return listening.fileno()

        def logPrefix(self) -> str:
            return "floor"

        def doRead(self) -> None:
            for _ in range(64):
                try:
                    sock, _ = listening.accept()
                except BlockingIOError:
                    return
                relay.accepted(sock)

        def connectionLost(self, reason: Any) -> None:
            pass

    reactor.addReader(Accept())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def run_transports(port: int) -> None:
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.interfaces import IHalfCloseableProtocol
    from twisted.internet.protocol import Factory, Protocol
    from zope.interface import implementer

    from twisted_socks5.tcpconnect import connect_tcp
    from twisted_socks5.writenow import close_ended, shut_write_now, write_now

    @implementer(IHalfCloseableProtocol)
    class End(Protocol):
        """One side of a tunnel; ``peer`` is the other side's protocol."""

        peer: Any = None
        eof = False

        def dataReceived(self, data: bytes) -> None:
            write_now(self.peer.transport, data)

        def readConnectionLost(self) -> None:
            self.eof = True
            peer = self.peer
            if peer is None:  # gone during the handshake (the bench's probes)
                self.transport.loseConnection()
                return
            shut_write_now(peer.transport)
            if peer.eof:
                close_ended(self.transport)
                close_ended(peer.transport)

        def writeConnectionLost(self) -> None:
            pass

        def connectionLost(self, reason: Any = None) -> None:
            self.peer = None  # no cycle left for the collector

    class Client(End):
        stage = GREETING

        def dataReceived(self, data: bytes) -> None:
            if self.stage == RELAYING:
                write_now(self.peer.transport, data)
            elif self.stage == GREETING:
                write_now(self.transport, b"\x05\x00")
                self.stage = REQUEST
            elif self.stage == REQUEST:
                self.stage = CONNECTING
                host = socket.inet_ntoa(data[4:8])
                (port,) = struct.unpack("!H", data[8:10])
                d = connect_tcp(reactor, host, port, Factory.forProtocol(End), 10)
                d.addCallback(self.relay)

        def relay(self, out: End) -> None:
            self.peer, out.peer, self.stage = out, self, RELAYING
            bound = out.transport.getHost()
            reply = b"\x05\x00\x00\x01" + socket.inet_aton(bound.host)
            write_now(self.transport, reply + struct.pack("!H", bound.port))

    reactor.listenTCP(  # type: ignore[attr-defined]
        port, Factory.forProtocol(Client), backlog=1024, interface="127.0.0.1"
    )
    reactor.run()  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="port to listen on, 127.0.0.1")
    parser.add_argument(
        "--loop", choices=["epoll", "twisted", "transports"], default="epoll"
    )
    args = parser.parse_args()
    run = {"epoll": run_epoll, "twisted": run_twisted, "transports": run_transports}
    run[args.loop](args.port)


if __name__ == "__main__":
    main()
