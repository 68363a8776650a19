"""
Sans-IO SOCKS4 and SOCKS4a: the request, the reply, and the server's
one-step handshake (no Twisted here).

A SOCKS4 request is ``VN CD DSTPORT DSTIP USERID NUL``; SOCKS4a puts
``0.0.0.x`` (``x`` not 0) in DSTIP and the host name after the USERID,
NUL-terminated too.  Both lengths are bounded (:data:`MAX_USERID`,
:data:`MAX_HOSTNAME`): a request whose NUL has not come stays pending until
the bound, then raises :class:`~twisted_socks5.codec.ProtocolError`.  The
request becomes the :class:`~twisted_socks5.codec.Request` the SOCKS5
command handlers serve, so CONNECT and BIND are the same code for both.

Replies carry one code: :data:`GRANTED` for
:attr:`~twisted_socks5.codec.ReplyCode.SUCCEEDED`, :data:`REJECTED` for
every failure code of the one failure table.  :data:`NO_IDENTD` and
:data:`IDENTD_MISMATCH` are never sent: the server asks no identd, and the
USERID is never an identity.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Optional, Tuple

from .codec import (
    Address,
    AddressType,
    Buffer,
    Command,
    Parsed,
    ProtocolError,
    ReplyCode,
    Request,
    domain_name,
)
from .handshake import MAX_EARLY_DATA, BufferOverflow, RequestReceived

SOCKS4_VERSION = 4
#: VN of a reply.
REPLY_VERSION = 0

#: Most USERID bytes before its NUL (identd user names are short).
MAX_USERID = 255
#: Most SOCKS4a host name bytes before its NUL (as SOCKS5's DOMAINNAME).
MAX_HOSTNAME = 255
#: VN CD DSTPORT DSTIP, then the USERID and its NUL.
HEADER_SIZE = 8
#: The longest request: a 4a one with both strings at their bounds.
MAX_REQUEST_SIZE = HEADER_SIZE + MAX_USERID + 1 + MAX_HOSTNAME + 1

#: Request granted.
GRANTED = 0x5A
#: Request rejected or failed.
REJECTED = 0x5B
#: Not sent: the server runs no identd check.
NO_IDENTD = 0x5C
#: Not sent: the USERID is never checked against identd.
IDENTD_MISMATCH = 0x5D

_COMMANDS = {1: Command.CONNECT, 2: Command.BIND}


def reply_code(code: ReplyCode) -> int:
    """The SOCKS4 code of a SOCKS5 reply code: granted, or rejected."""
    return GRANTED if code == ReplyCode.SUCCEEDED else REJECTED


@dataclass(frozen=True, repr=False)
class Socks4Request:
    """A SOCKS4/4a request: the SOCKS5 request it means, and its USERID."""

    request: Request
    userid: bytes = b""

    def __repr__(self) -> str:
        return f"Socks4Request({self.request!r}, userid={self.userid!r})"

    def to_bytes(self) -> bytes:
        """The request on the wire (4a when the address is a name)."""
        address = self.request.address
        command = {v: k for k, v in _COMMANDS.items()}[self.request.command]
        if b"\x00" in self.userid or len(self.userid) > MAX_USERID:
            raise ValueError("a USERID has no NUL and at most 255 bytes")
        head = struct.pack("!BBH", SOCKS4_VERSION, command, address.port)
        if address.type is AddressType.IPV4:
            return head + _ip(address) + self.userid + b"\x00"
        if address.type is AddressType.IPV6:
            raise ValueError("SOCKS4 cannot carry an IPv6 address")
        name = address.host.encode("utf-8")
        return head + b"\x00\x00\x00\x01" + self.userid + b"\x00" + name + b"\x00"


def _ip(address: Address) -> bytes:
    return bytes(int(part) for part in address.host.split("."))


def _string(buf: Buffer, start: int, bound: int, what: str) -> Optional[int]:
    """Where the NUL ending a string at ``start`` is; None while it may come."""
    end = bytes(buf[start : start + bound + 1]).find(b"\x00")
    if end >= 0:
        return start + end
    if len(buf) > start + bound:
        raise ProtocolError(
            f"SOCKS4 {what} longer than {bound} bytes", ReplyCode.GENERAL_FAILURE
        )
    return None


def parse_request(buf: Buffer) -> Parsed[Socks4Request]:
    """
    Parse a SOCKS4 or SOCKS4a request.  Errors carry the reply code to send
    (every one becomes :data:`REJECTED` on the wire).  The command is judged
    once the whole request is in, as SOCKS5's.
    """
    if not buf:
        return None
    if buf[0] != SOCKS4_VERSION:
        raise ProtocolError(
            f"SOCKS4 request: version {buf[0]}, expected 4", ReplyCode.GENERAL_FAILURE
        )
    if len(buf) < HEADER_SIZE:
        return None
    nul = _string(buf, HEADER_SIZE, MAX_USERID, "USERID")
    if nul is None:
        return None
    userid = bytes(buf[HEADER_SIZE:nul])
    (port,) = struct.unpack_from("!H", buf, 2)
    ip = bytes(buf[4:8])
    end = nul + 1
    if ip[:3] == b"\x00\x00\x00" and ip[3] != 0:
        # SOCKS4a: the name follows the USERID.
        name_end = _string(buf, end, MAX_HOSTNAME, "host name")
        if name_end is None:
            return None
        if name_end == end:
            raise ProtocolError("SOCKS4a: empty host name", ReplyCode.HOST_UNREACHABLE)
        host = domain_name(bytes(buf[end:name_end]))
        address = Address(AddressType.DOMAIN, host, port)
        end = name_end + 1
    else:
        address = Address(AddressType.IPV4, ".".join(map(str, ip)), port)
    command = _COMMANDS.get(buf[1])
    if command is None:
        raise ProtocolError(
            f"SOCKS4: unknown command 0x{buf[1]:02x}", ReplyCode.COMMAND_NOT_SUPPORTED
        )
    return Socks4Request(Request(command, address), userid), end


def reply_bytes(code: ReplyCode, address: Optional[Address] = None) -> bytes:
    """
    The 8-byte reply: :func:`reply_code` of ``code``, and ``address`` when
    it is IPv4 (an IPv6 one, which SOCKS4 cannot carry, or none: zeros).
    """
    if address is None or address.type is not AddressType.IPV4:
        return bytes((REPLY_VERSION, reply_code(code))) + bytes(6)
    return struct.pack("!BBH", REPLY_VERSION, reply_code(code), address.port) + _ip(
        address
    )


def parse_reply(buf: Buffer) -> Parsed[Tuple[int, Address]]:
    """A reply (client side): its code (any byte) and address."""
    if len(buf) < 8:
        return None
    if buf[0] != REPLY_VERSION:
        raise ProtocolError(f"SOCKS4 reply: version {buf[0]}, expected 0")
    (port,) = struct.unpack_from("!H", buf, 2)
    host = ".".join(str(b) for b in bytes(buf[4:8]))
    return (buf[1], Address(AddressType.IPV4, host, port)), 8


class Socks4State(enum.Enum):
    __hash__ = object.__hash__

    REQUEST = "request"
    #: The request is in; anything after it is early data for the relay.
    DONE = "done"
    CLOSED = "closed"


class Socks4Handshake:
    """
    The server side of a SOCKS4 connection: one request, nothing before it.
    Emits the :class:`~twisted_socks5.handshake.RequestReceived` a SOCKS5
    request does; :attr:`userid` is the USERID it came with.
    """

    __slots__ = ("state", "buffer", "client", "userid")

    def __init__(self, client: object = None) -> None:
        self.state = Socks4State.REQUEST
        #: Bytes received and not yet parsed (after DONE: early data).
        self.buffer = bytearray()
        self.client = client
        #: The request's USERID, once it is in: the client's claim only.
        self.userid: Optional[bytes] = None

    def receive_data(self, data: bytes) -> None:
        """Buffer ``data``; :class:`BufferOverflow` past :data:`MAX_EARLY_DATA`."""
        self.buffer += data
        if len(self.buffer) > MAX_EARLY_DATA:
            self.state = Socks4State.CLOSED
            raise BufferOverflow("too much data before the relay started")

    def next_event(self) -> Optional[RequestReceived]:
        """The request once whole, else ``None``; bad input raises ProtocolError."""
        if self.state is not Socks4State.REQUEST:
            return None
        try:
            parsed = parse_request(self.buffer[:MAX_REQUEST_SIZE])
        except ProtocolError:
            self.state = Socks4State.CLOSED
            raise
        if parsed is None:
            return None
        request, used = parsed
        del self.buffer[:used]
        self.userid = request.userid
        self.state = Socks4State.DONE
        return RequestReceived(request.request)

    def close(self) -> None:
        self.state = Socks4State.CLOSED
