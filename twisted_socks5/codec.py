"""
Sans-IO codec for every RFC 1928 and RFC 1929 message.

Nothing here imports Twisted or touches a socket: each ``parse_*`` function
takes the bytes received so far and returns ``None`` when it needs more, or
``(message, consumed)`` when a whole message is there.  Malformed input raises
:class:`ProtocolError`, which carries the reply code a server should send
before closing (or ``None`` when the RFC gives no way to answer).  Every
message serializes back to bytes with ``to_bytes()``.

Every length is bounded by the wire format itself (a one-byte count can never
announce more than 255 items), so a parser never needs more than
:data:`MAX_REQUEST_SIZE` / :data:`MAX_GREETING_SIZE` / :data:`MAX_USERPASS_SIZE`
bytes to decide.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Optional, Tuple, TypeVar, Union

SOCKS_VERSION = 5
USERPASS_VERSION = 1

Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")
Parsed = Optional[Tuple[T, int]]

#: VER + NMETHODS + 255 methods.
MAX_GREETING_SIZE = 2 + 255
#: VER + ULEN + 255 + PLEN + 255 (RFC 1929).
MAX_USERPASS_SIZE = 3 + 255 + 255
#: VER CMD RSV ATYP + (1 + 255 domain) + PORT.
MAX_REQUEST_SIZE = 4 + 1 + 255 + 2
#: RSV RSV FRAG ATYP + (1 + 255 domain) + PORT.
MAX_UDP_HEADER_SIZE = MAX_REQUEST_SIZE
#: The largest UDP payload an IPv4 datagram can carry.
MAX_UDP_PAYLOAD = 65507


class Method(enum.IntEnum):
    """Authentication METHOD codes (RFC 1928 section 3)."""

    NO_AUTHENTICATION = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE_METHODS = 0xFF


class Command(enum.IntEnum):
    """Request CMD codes (RFC 1928 section 4)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03

    @property
    def phrase(self) -> str:
        return self.name.lower().replace("_", " ")


class AddressType(enum.IntEnum):
    """ATYP codes (RFC 1928 section 5)."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(enum.IntEnum):
    """REP codes (RFC 1928 section 6), with the RFC's phrase for logs."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    CONNECTION_NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08

    @property
    def phrase(self) -> str:
        return _REPLY_PHRASES[self]


_REPLY_PHRASES = {
    ReplyCode.SUCCEEDED: "succeeded",
    ReplyCode.GENERAL_FAILURE: "general SOCKS server failure",
    ReplyCode.CONNECTION_NOT_ALLOWED: "connection not allowed by ruleset",
    ReplyCode.NETWORK_UNREACHABLE: "network unreachable",
    ReplyCode.HOST_UNREACHABLE: "host unreachable",
    ReplyCode.CONNECTION_REFUSED: "connection refused",
    ReplyCode.TTL_EXPIRED: "TTL expired",
    ReplyCode.COMMAND_NOT_SUPPORTED: "command not supported",
    ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}


class ProtocolError(Exception):
    """
    The peer sent something the RFC does not allow.

    ``reply`` is the REP code a server should answer with before closing,
    or ``None`` when the message cannot be answered (a bad greeting, a bad
    RFC 1929 sub-negotiation): then the server just closes.
    """

    def __init__(self, message: str, reply: Optional[ReplyCode] = None) -> None:
        super().__init__(message)
        self.reply = reply


class EmptyCredentials(ProtocolError):
    """
    An RFC 1929 request with an empty username or password (ULEN or PLEN
    0, which the RFC does not allow).  Unlike other malformed input it is
    answered: a failure status, then a close, as RFC 1929 asks of a failed
    authentication, so that the client can tell the user why.
    """


# --------------------------------------------------------------------------
# Addresses

# The C library's inet_pton/inet_ntop: as strict as ``ipaddress`` (no
# leading zeros, no short forms) and an order of magnitude cheaper, which
# matters on the per-connection path.
_AF4, _AF6 = socket.AF_INET, socket.AF_INET6
_MAPPED_PREFIX = b"\x00" * 10 + b"\xff\xff"


def _pton(family: int, text: str) -> bytes:
    try:
        return socket.inet_pton(family, text)
    except (OSError, UnicodeError, ValueError):
        raise ValueError(f"not an IP address: {text!r}") from None


def _ntop(family: int, packed: bytes) -> str:
    return socket.inet_ntop(family, packed)


@dataclass(frozen=True)
class Address:
    """
    A SOCKS address: ATYP, host and port.

    ``host`` is the textual form: a dotted quad, a compressed IPv6 address or
    a domain name.  The ATYP is kept explicitly because ``"1.2.3.4"`` sent as a
    DOMAINNAME is not the same request as the IPv4 address.
    """

    type: AddressType
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 0xFFFF:
            raise ValueError(f"port out of range: {self.port}")
        # IP hosts are kept in canonical text, so equal addresses compare equal.
        if self.type is AddressType.IPV4:
            object.__setattr__(self, "host", _ntop(_AF4, _pton(_AF4, self.host)))
        elif self.type is AddressType.IPV6:
            object.__setattr__(self, "host", _ntop(_AF6, _pton(_AF6, self.host)))
        else:
            size = len(self.host.encode("utf-8"))
            if not 1 <= size <= 255:
                raise ValueError("domain name must be 1 to 255 bytes")

    @classmethod
    def from_host(cls, host: str, port: int) -> Address:
        """
        Build an address, choosing IPV4/IPV6 for IP literals and DOMAIN
        otherwise; IPv4-mapped IPv6 addresses become plain IPv4.
        """
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"port out of range: {port}")
        # inet_ntop's text is canonical: no need for __post_init__ to redo it
        # (the server builds two of these per connection).
        if ":" not in host:
            try:
                packed = _pton(_AF4, host)
            except ValueError:
                return cls(AddressType.DOMAIN, host, port)
            return _parsed_address(AddressType.IPV4, _ntop(_AF4, packed), port)
        try:
            packed = _pton(_AF6, host.split("%", 1)[0])
        except ValueError:
            return cls(AddressType.DOMAIN, host, port)
        if packed[:12] == _MAPPED_PREFIX:
            return _parsed_address(AddressType.IPV4, _ntop(_AF4, packed[12:]), port)
        return _parsed_address(AddressType.IPV6, _ntop(_AF6, packed), port)

    @property
    def is_unspecified(self) -> bool:
        """True for ``0.0.0.0`` and ``::`` (used by BIND and UDP ASSOCIATE)."""
        if self.type is AddressType.DOMAIN:
            return False
        return ipaddress.ip_address(self.host).is_unspecified

    def to_bytes(self) -> bytes:
        if self.type is AddressType.IPV4:
            raw = _pton(_AF4, self.host)
        elif self.type is AddressType.IPV6:
            raw = _pton(_AF6, self.host)
        else:
            name = self.host.encode("utf-8")
            raw = bytes((len(name),)) + name
        return bytes((self.type,)) + raw + struct.pack("!H", self.port)

    def __str__(self) -> str:
        if self.type is AddressType.IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _parse_address(buf: Buffer, offset: int) -> Parsed[Address]:
    """Parse ATYP DST.ADDR DST.PORT at ``offset``; consumed counts from ``offset``."""
    if len(buf) < offset + 1:
        return None
    atyp = buf[offset]
    start = offset + 1
    if atyp == AddressType.IPV4:
        end = start + 4
        if len(buf) < end + 2:
            return None
        host = _ntop(_AF4, bytes(buf[start:end]))
        kind = AddressType.IPV4
    elif atyp == AddressType.IPV6:
        end = start + 16
        if len(buf) < end + 2:
            return None
        host = _ntop(_AF6, bytes(buf[start:end]))
        kind = AddressType.IPV6
    elif atyp == AddressType.DOMAIN:
        if len(buf) < start + 1:
            return None
        size = buf[start]
        if size == 0:
            raise ProtocolError("empty domain name", ReplyCode.HOST_UNREACHABLE)
        end = start + 1 + size
        if len(buf) < end + 2:
            return None
        host = domain_name(bytes(buf[start + 1 : end]))
        kind = AddressType.DOMAIN
    else:
        raise ProtocolError(
            f"unknown address type 0x{atyp:02x}", ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED
        )
    (port,) = struct.unpack_from("!H", buf, end)
    return _parsed_address(kind, host, port), end + 2 - offset


def domain_name(raw: bytes) -> str:
    """A name from the wire: no NUL, UTF-8 (else 0x04, host unreachable)."""
    if b"\x00" in raw:
        raise ProtocolError("NUL byte in domain name", ReplyCode.HOST_UNREACHABLE)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError(
            "domain name is not valid UTF-8", ReplyCode.HOST_UNREACHABLE
        ) from None


def _parsed_address(kind: AddressType, host: str, port: int) -> Address:
    """
    An Address from parsed wire bytes, without ``__post_init__``'s checks:
    inet_ntop output is canonical and the domain was checked above.  Every
    request and UDP datagram passes here.
    """
    address = object.__new__(Address)
    object.__setattr__(address, "type", kind)
    object.__setattr__(address, "host", host)
    object.__setattr__(address, "port", port)
    return address


def _check_version(buf: Buffer, expected: int, what: str) -> None:
    if buf[0] != expected:
        raise ProtocolError(f"{what}: version {buf[0]}, expected {expected}")


# --------------------------------------------------------------------------
# Method negotiation (RFC 1928 section 3)


@dataclass(frozen=True)
class Greeting:
    """Client's first message: the METHODs it offers, in its order."""

    methods: Tuple[int, ...]

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.methods) <= 255:
            raise ValueError("a greeting offers 1 to 255 methods")
        return bytes((SOCKS_VERSION, len(self.methods), *self.methods))


def parse_greeting(buf: Buffer) -> Parsed[Greeting]:
    if len(buf) < 2:
        if buf and buf[0] != SOCKS_VERSION:
            _check_version(buf, SOCKS_VERSION, "greeting")
        return None
    _check_version(buf, SOCKS_VERSION, "greeting")
    count = buf[1]
    if count == 0:
        raise ProtocolError("greeting offers no methods")
    if len(buf) < 2 + count:
        return None
    return Greeting(tuple(buf[2 : 2 + count])), 2 + count


@dataclass(frozen=True)
class MethodSelection:
    """Server's answer to the greeting."""

    method: int

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.method))


def parse_method_selection(buf: Buffer) -> Parsed[MethodSelection]:
    if len(buf) < 2:
        return None
    _check_version(buf, SOCKS_VERSION, "method selection")
    return MethodSelection(buf[1]), 2


# --------------------------------------------------------------------------
# Username/password sub-negotiation (RFC 1929)


@dataclass(frozen=True, repr=False)
class UserPassRequest:
    """RFC 1929 request.  ``repr`` hides the password so it never reaches a log."""

    username: bytes
    password: bytes

    def __repr__(self) -> str:
        return f"UserPassRequest(username={self.username!r}, password=<hidden>)"

    def to_bytes(self) -> bytes:
        if not 1 <= len(self.username) <= 255 or not 1 <= len(self.password) <= 255:
            raise ValueError("username and password must be 1 to 255 bytes")
        return (
            bytes((USERPASS_VERSION, len(self.username)))
            + self.username
            + bytes((len(self.password),))
            + self.password
        )


def parse_userpass_request(buf: Buffer) -> Parsed[UserPassRequest]:
    """
    Parse an RFC 1929 request.

    The RFC gives ULEN and PLEN a range of 1 to 255; zero raises
    :class:`EmptyCredentials` as soon as it is read.
    """
    if not buf:
        return None
    _check_version(buf, USERPASS_VERSION, "username/password request")
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise EmptyCredentials("empty username")
    if len(buf) < 3 + ulen:
        return None
    plen = buf[2 + ulen]
    if plen == 0:
        raise EmptyCredentials("empty password")
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return UserPassRequest(bytes(buf[2 : 2 + ulen]), bytes(buf[3 + ulen : end])), end


@dataclass(frozen=True)
class UserPassStatus:
    """RFC 1929 status: 0 is success, anything else is failure."""

    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0

    def to_bytes(self) -> bytes:
        return bytes((USERPASS_VERSION, self.status))


def parse_userpass_status(buf: Buffer) -> Parsed[UserPassStatus]:
    if len(buf) < 2:
        return None
    _check_version(buf, USERPASS_VERSION, "username/password status")
    return UserPassStatus(buf[1]), 2


# --------------------------------------------------------------------------
# Requests and replies (RFC 1928 sections 4 and 6)


@dataclass(frozen=True)
class Request:
    command: Command
    address: Address

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.command, 0)) + self.address.to_bytes()


def parse_request(buf: Buffer) -> Parsed[Request]:
    """
    Parse a request.

    Errors carry the reply to send: 0x07 for an unknown CMD, 0x08 for an
    unknown ATYP, 0x01 for a bad version or a non-zero RSV.  The CMD is only
    judged once the whole request has arrived, so a server answering 0x07 has
    consumed exactly the request and knows where the stream stands.
    """
    if not buf:
        return None
    if buf[0] != SOCKS_VERSION:
        raise ProtocolError(
            f"request: version {buf[0]}, expected 5", ReplyCode.GENERAL_FAILURE
        )
    if len(buf) < 3:
        return None
    if buf[2] != 0:
        raise ProtocolError("request: RSV is not zero", ReplyCode.GENERAL_FAILURE)
    parsed = _parse_address(buf, 3)
    if parsed is None:
        return None
    address, used = parsed
    try:
        command = Command(buf[1])
    except ValueError:
        raise ProtocolError(
            f"unknown command 0x{buf[1]:02x}", ReplyCode.COMMAND_NOT_SUPPORTED
        ) from None
    return Request(command, address), 3 + used


#: The address a reply carries when there is none to give.
NULL_ADDRESS = Address(AddressType.IPV4, "0.0.0.0", 0)


@dataclass(frozen=True)
class Reply:
    reply: ReplyCode
    address: Address = NULL_ADDRESS

    def to_bytes(self) -> bytes:
        return bytes((SOCKS_VERSION, self.reply, 0)) + self.address.to_bytes()


def parse_reply(buf: Buffer) -> Parsed[Reply]:
    """Parse a server reply (client side).  Unknown REP codes are an error."""
    if not buf:
        return None
    _check_version(buf, SOCKS_VERSION, "reply")
    if len(buf) < 3:
        return None
    parsed = _parse_address(buf, 3)
    if parsed is None:
        return None
    address, used = parsed
    try:
        code = ReplyCode(buf[1])
    except ValueError:
        raise ProtocolError(f"unknown reply code 0x{buf[1]:02x}") from None
    return Reply(code, address), 3 + used


# --------------------------------------------------------------------------
# UDP request header (RFC 1928 section 7)


@dataclass(frozen=True)
class UDPDatagram:
    """One UDP ASSOCIATE datagram: header fields and payload."""

    address: Address
    data: bytes
    fragment: int = 0

    def to_bytes(self) -> bytes:
        if not 0 <= self.fragment <= 255:
            raise ValueError("FRAG is one byte")
        return (
            b"\x00\x00" + bytes((self.fragment,)) + self.address.to_bytes() + self.data
        )


def parse_udp_datagram(buf: Buffer) -> UDPDatagram:
    """
    Parse a whole datagram.  A datagram is never "incomplete": a short one is
    malformed and raises :class:`ProtocolError`.
    """
    if len(buf) < 4:
        raise ProtocolError("UDP datagram shorter than its header")
    if buf[0] != 0 or buf[1] != 0:
        raise ProtocolError("UDP datagram: RSV is not zero")
    parsed = _parse_address(buf, 3)
    if parsed is None:
        raise ProtocolError("UDP datagram shorter than its header")
    address, used = parsed
    return UDPDatagram(address, bytes(buf[3 + used :]), buf[2])
