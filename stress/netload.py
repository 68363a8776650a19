"""
The load generator's network side: a SOCKS5 client and the target servers
(echo, hash sink, source, and the misbehaving ones), on asyncio.

Loopback only: every socket here binds or connects to 127.0.0.0/8 and
nothing else; names are only ever sent to the proxy (whose resolver, in the
stress server, never asks real DNS).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

from twisted_socks5.testing import pattern_chunk

HOST = "127.0.0.1"
#: Not in Python's socket module before 3.12; the Linux value.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CHUNK = 64 * 1024


def loopback(address: str) -> str:
    """Refuse, loudly, any address outside 127.0.0.0/8."""
    if not ipaddress.ip_address(address).is_loopback:
        raise ValueError(f"not a loopback address: {address}")
    return address


def sources(count: int) -> List[str]:
    """
    ``count`` client source addresses 127.0.0.1, 127.0.0.2, ...: each has
    its own ephemeral port range, so thousands of clients never run short.
    """
    return [loopback(f"127.0.0.{i}") for i in range(1, count + 1)]


# --------------------------------------------------------------------------
# SOCKS5 client


class SocksError(Exception):
    """The proxy answered a request with a non-zero REP (``code``)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"SOCKS reply 0x{code:02x}")
        self.code = code


class HandshakeClosed(Exception):
    """The proxy closed before it answered."""


Target = Tuple[str, int]


def request_bytes(target: Target) -> bytes:
    """A CONNECT request for an IPv4 literal or a domain name."""
    host, port = target
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        name = host.encode("ascii")
        address = b"\x03" + bytes((len(name),)) + name
    else:
        address = b"\x01" + ip.packed
    return b"\x05\x01\x00" + address + struct.pack("!H", port)


async def read_reply(reader: asyncio.StreamReader) -> Tuple[int, bytes]:
    """Read a whole server reply: (REP, the raw bytes)."""
    try:
        head = await reader.readexactly(4)
        if head[3] == 1:
            rest = await reader.readexactly(4 + 2)
        elif head[3] == 4:
            rest = await reader.readexactly(16 + 2)
        elif head[3] == 3:
            size = await reader.readexactly(1)
            rest = size + await reader.readexactly(size[0] + 2)
        else:
            raise ValueError(f"reply with ATYP {head[3]}")
    except asyncio.IncompleteReadError as e:
        raise HandshakeClosed(f"closed after {e.partial!r}") from None
    if head[0] != 5 or head[2] != 0:
        raise ValueError(f"malformed reply {head!r}")
    return head[1], head + rest


async def connect_from(
    port: int, source: Optional[str] = None, rcvbuf: int = 0
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    A TCP connection to 127.0.0.1:port from ``source`` (127.0.0.x).  The
    port is chosen at connect time (IP_BIND_ADDRESS_NO_PORT), so it is
    unique per 4-tuple rather than per source address.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((loopback(source), 0))
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=4 * CHUNK)


async def open_tunnel(
    proxy_port: int,
    target: Target,
    source: Optional[str] = None,
    rcvbuf: int = 0,
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """
    A strict client: greeting, wait for the method, CONNECT, wait for the
    reply.  Raises :class:`SocksError` for a refusal (the socket closed).
    """
    reader, writer = await connect_from(proxy_port, source, rcvbuf)
    try:
        writer.write(b"\x05\x01\x00")
        try:
            method = await reader.readexactly(2)
        except asyncio.IncompleteReadError as e:
            raise HandshakeClosed(f"closed after {e.partial!r}") from None
        if method != b"\x05\x00":
            raise ValueError(f"method selection {method!r}")
        writer.write(request_bytes(target))
        code, _ = await read_reply(reader)
        if code != 0:
            raise SocksError(code)
    except BaseException:
        abort(writer)
        raise
    return reader, writer


def abort(writer: asyncio.StreamWriter) -> None:
    """Close at once with a reset (SO_LINGER 0), not a FIN."""
    transport: Any = writer.transport
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
    transport.abort()


async def read_to_eof(reader: asyncio.StreamReader, hasher: Any = None) -> int:
    """Read until EOF, hashing; the byte count."""
    total = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return total
        total += len(data)
        if hasher is not None:
            hasher.update(data)


async def read_to_eof_bytes(
    reader: asyncio.StreamReader, limit: int = 1 << 20
) -> bytes:
    """Everything until EOF (at most ``limit`` bytes kept)."""
    data = bytearray()
    while True:
        chunk = await reader.read(CHUNK)
        if not chunk:
            return bytes(data)
        if len(data) < limit:
            data += chunk


# --------------------------------------------------------------------------
# Deterministic data


class Pattern:
    """
    Random bytes shared by every client; tunnel ``i`` sends the slice at
    an offset of its own, so bytes crossed between tunnels would not match.
    """

    def __init__(self, size: int = 1 << 20) -> None:
        self.blob = os.urandom(size) * 2

    def slice(self, index: int, size: int) -> memoryview:
        half = len(self.blob) // 2
        if size > half:
            raise ValueError("slice larger than the pattern")
        offset = (index * 7919) % half
        return memoryview(self.blob)[offset : offset + size]


# --------------------------------------------------------------------------
# Target servers


class _FlowControlled(asyncio.Protocol):
    """Stops reading while its own writes are backed up."""

    transport: Any

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()


class Echo(_FlowControlled):
    """Writes back what it reads; closes after EOF once all is written."""

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> bool:
        return False


class HashSink(asyncio.Protocol):
    """Reads to EOF, then answers the sha256 (hex) of what it read, closes."""

    transport: Any

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.hash = hashlib.sha256()

    def data_received(self, data: bytes) -> None:
        self.hash.update(data)

    def eof_received(self) -> bool:
        self.transport.write(self.hash.hexdigest().encode())
        return False


class Source(_FlowControlled):
    """On a line ``N\\n``, sends the first N bytes of the source stream, closes."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.line = b""
        self.left = -1
        self.index = 0

    def data_received(self, data: bytes) -> None:
        if self.left >= 0:
            return
        self.line += data
        if b"\n" in self.line:
            self.left = int(self.line.split(b"\n", 1)[0])
            self.transport.pause_reading()
            self._more()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._more()

    def _more(self) -> None:
        self.paused = False
        while self.left > 0 and not self.paused:
            chunk = pattern_chunk(self.index)[: self.left]
            self.index += 1
            self.left -= len(chunk)
            self.transport.write(chunk)
        if self.left == 0:
            self.left = -2
            self.transport.close()


class ResetAfter(asyncio.Protocol):
    """
    Answers a little, then resets (SO_LINGER 0 close) once ``limit`` bytes
    have come in: a destination that dies mid-transfer.
    """

    limit = 64 * 1024
    transport: Any

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.received = 0

    def data_received(self, data: bytes) -> None:
        if self.received < 0:
            return
        self.received += len(data)
        if self.received >= self.limit:
            self.received = -1
            self.transport.write(b"partial answer " * 100)
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            self.transport.abort()


class Silent(asyncio.Protocol):
    """Accepts, never reads, never writes: a destination that hangs."""

    transports: List[Any] = []

    def connection_made(self, transport: Any) -> None:
        transport.pause_reading()
        Silent.transports.append(transport)


ProtocolFactory = Callable[[], asyncio.Protocol]


@dataclass
class Servers:
    """The running target servers, by kind: kind -> port."""

    ports: dict[str, int]
    handles: List[Any]

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        self.close_silent()

    @staticmethod
    def close_silent() -> None:
        """Reset every connection the silent servers hold."""
        for transport in Silent.transports:
            sock = transport.get_extra_info("socket")
            if sock is not None and sock.fileno() >= 0:
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            transport.abort()
        Silent.transports.clear()


async def start_servers(kinds: Sequence[Union[str, Tuple[str, int]]]) -> Servers:
    """
    Start target servers on 127.0.0.1 (ephemeral ports).  A kind may be
    given as ``(kind, n)`` for n listeners of that kind (``kind``,
    ``kind.1``...): spreading a load over several ports spreads the
    proxy's outbound 4-tuples.
    """
    factories: dict[str, ProtocolFactory] = {
        "echo": Echo,
        "sink": HashSink,
        "source": Source,
        "reset": ResetAfter,
        "silent": Silent,
    }
    loop = asyncio.get_running_loop()
    ports: dict[str, int] = {}
    handles: List[Any] = []
    for item in kinds:
        kind, count = (item, 1) if isinstance(item, str) else item
        for n in range(count):
            name = kind if n == 0 else f"{kind}.{n}"
            if kind == "blackhole":
                sock = blackhole()
                handles.append(sock)
                ports[name] = sock.getsockname()[1]
                continue
            server = await loop.create_server(
                factories[kind], HOST, 0, backlog=4096, reuse_address=True
            )
            handles.append(server)
            ports[name] = server.sockets[0].getsockname()[1]
    return Servers(ports, handles)


class _Blackhole:
    """A listener whose accept queue is full: new SYNs go unanswered."""

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.fillers: List[socket.socket] = []
        # Linux queues backlog + 1 connections; a few more to be sure.
        for _ in range(4):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(self.listener.getsockname())
            self.fillers.append(s)

    def getsockname(self) -> Any:
        return self.listener.getsockname()

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()


def blackhole() -> Any:
    """A port on 127.0.0.1 where connects hang (until the caller's timeout)."""
    return _Blackhole()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (connects are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def bounded(
    coroutines: Sequence[Any], limit: int, return_exceptions: bool = True
) -> List[Any]:
    """Run coroutines with at most ``limit`` at a time; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def run(coroutine: Any) -> Any:
        async with semaphore:
            return await coroutine

    return await asyncio.gather(
        *(run(c) for c in coroutines), return_exceptions=return_exceptions
    )
