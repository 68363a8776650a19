"""
Tests for the sans-IO codec: RFC 1928 / RFC 1929 examples and properties.

The example tables spell messages out in hex, field by field, so each row can
be checked against the RFC by eye.  The Hypothesis properties cover round
trips, trailing bytes, arbitrary input and arbitrary chunking.
"""

from __future__ import annotations

import ipaddress
import string
from typing import Any, Callable, List, Optional, Tuple

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from twisted_socks5 import codec
from twisted_socks5.codec import (
    NULL_ADDRESS,
    Address,
    AddressType,
    Command,
    EmptyCredentials,
    Greeting,
    Method,
    MethodSelection,
    ProtocolError,
    Reply,
    ReplyCode,
    Request,
    UDPDatagram,
    UserPassRequest,
    UserPassStatus,
    parse_greeting,
    parse_method_selection,
    parse_reply,
    parse_request,
    parse_udp_datagram,
    parse_userpass_request,
    parse_userpass_status,
)

h = bytes.fromhex

Parser = Callable[[Any], Optional[Tuple[Any, int]]]

IPV4 = AddressType.IPV4
IPV6 = AddressType.IPV6
DOMAIN = AddressType.DOMAIN

DOMAIN_255 = "a" * 255
#: 127 two-byte characters and one ASCII letter: 255 bytes, 128 characters.
UTF8_DOMAIN_255 = "é" * 127 + "a"

# --------------------------------------------------------------------------
# Method negotiation (RFC 1928 section 3)


@pytest.mark.parametrize(
    ("data", "expected", "consumed"),
    [
        # VER NMETHODS METHODS
        (h("05 01 00"), Greeting((0,)), 3),
        (
            h("05 02 00 02"),
            Greeting((Method.NO_AUTHENTICATION, Method.USERNAME_PASSWORD)),
            4,
        ),
        (h("05 01 02"), Greeting((2,)), 3),
        (h("05 03 02 01 00"), Greeting((2, 1, 0)), 5),
        (h("05 01 ff"), Greeting((0xFF,)), 3),
        # Duplicates are passed through, in the client's order.
        (h("05 03 00 00 02"), Greeting((0, 0, 2)), 5),
        # Bytes after the greeting (a pipelined request) are not consumed.
        (h("05 01 00 05 01 00 01"), Greeting((0,)), 3),
        (bytes((5, 255, *range(255))), Greeting(tuple(range(255))), 257),
    ],
)
def test_parse_greeting(data: bytes, expected: Greeting, consumed: int) -> None:
    assert parse_greeting(data) == (expected, consumed)


@pytest.mark.parametrize(
    "data",
    [
        h("05 00"),  # NMETHODS = 0
        h("05 00 00"),  # NMETHODS = 0, then a stray byte
        h("04 01 00"),  # SOCKS4
        h("04"),  # bad version is judged on the first byte
        h("00"),
        h("01 01 00"),  # an RFC 1929 version byte
        h("ff 01 00"),
    ],
)
def test_parse_greeting_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_greeting(data)
    # A greeting cannot be answered with a REP code: the server just closes.
    assert excinfo.value.reply is None


@pytest.mark.parametrize("methods", [(), tuple(range(256))])
def test_greeting_to_bytes_rejects_bad_method_count(methods: Tuple[int, ...]) -> None:
    with pytest.raises(ValueError):
        Greeting(methods).to_bytes()


def test_greeting_to_bytes() -> None:
    assert Greeting((0, 2)).to_bytes() == h("05 02 00 02")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (h("05 00"), MethodSelection(Method.NO_AUTHENTICATION)),
        (h("05 01"), MethodSelection(Method.GSSAPI)),
        (h("05 02"), MethodSelection(Method.USERNAME_PASSWORD)),
        (h("05 ff"), MethodSelection(Method.NO_ACCEPTABLE_METHODS)),
        (h("05 80"), MethodSelection(0x80)),  # private methods pass through
        (h("05 02 01 05"), MethodSelection(2)),  # trailing sub-negotiation
    ],
)
def test_parse_method_selection(data: bytes, expected: MethodSelection) -> None:
    assert parse_method_selection(data) == (expected, 2)


@pytest.mark.parametrize("data", [h("04 00"), h("01 00"), h("00 00")])
def test_parse_method_selection_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_method_selection(data)
    assert excinfo.value.reply is None


def test_method_selection_to_bytes() -> None:
    assert MethodSelection(Method.NO_ACCEPTABLE_METHODS).to_bytes() == h("05 ff")


# --------------------------------------------------------------------------
# Username/password sub-negotiation (RFC 1929)


@pytest.mark.parametrize(
    ("data", "expected", "consumed"),
    [
        # VER ULEN UNAME PLEN PASSWD
        (h("01 03") + b"foo" + h("03") + b"bar", UserPassRequest(b"foo", b"bar"), 9),
        (h("01 01 61 01 62"), UserPassRequest(b"a", b"b"), 5),
        # Arbitrary bytes, not only text: RFC 1929 says nothing of encodings.
        (h("01 02 00 ff 03 80 00 fe"), UserPassRequest(h("00 ff"), h("80 00 fe")), 8),
        (
            h("01 ff") + b"u" * 255 + h("ff") + b"p" * 255,
            UserPassRequest(b"u" * 255, b"p" * 255),
            codec.MAX_USERPASS_SIZE,
        ),
        (h("01 01 61 01 62 05 01"), UserPassRequest(b"a", b"b"), 5),  # trailing
    ],
)
def test_parse_userpass_request(
    data: bytes, expected: UserPassRequest, consumed: int
) -> None:
    assert parse_userpass_request(data) == (expected, consumed)


@pytest.mark.parametrize(
    "data",
    [
        h("01 00"),  # ULEN = 0
        h("01 00 03") + b"bar",  # ULEN = 0 with a password behind it
        h("01 03") + b"foo" + h("00"),  # PLEN = 0
        h("01 03") + b"foo" + h("00 00"),
        h("05 03") + b"foo" + h("03") + b"bar",  # VER 5 instead of 1
        h("00 03") + b"foo" + h("03") + b"bar",
        h("02"),  # bad version is judged on the first byte
    ],
)
def test_parse_userpass_request_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_userpass_request(data)
    assert excinfo.value.reply is None


@pytest.mark.parametrize(
    "data",
    [
        h("01 00"),  # ULEN = 0: known at once, without the rest
        h("01 00 03") + b"bar",
        h("01 03") + b"foo" + h("00"),  # PLEN = 0
        h("01 00 00"),
    ],
)
def test_empty_username_or_password_is_answerable(data: bytes) -> None:
    """Not "malformed": RFC 1929 wants a failure status before the close."""
    with pytest.raises(EmptyCredentials):
        parse_userpass_request(data)


@pytest.mark.parametrize(
    "data", [h("05 03") + b"foo" + h("03") + b"bar", h("02"), h("00 00 00")]
)
def test_bad_userpass_version_is_not_answerable(data: bytes) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_userpass_request(data)
    assert not isinstance(excinfo.value, EmptyCredentials)


@pytest.mark.parametrize(
    ("username", "password"),
    [(b"", b"x"), (b"x", b""), (b"x" * 256, b"x"), (b"x", b"x" * 256)],
)
def test_userpass_request_to_bytes_rejects_bad_lengths(
    username: bytes, password: bytes
) -> None:
    with pytest.raises(ValueError):
        UserPassRequest(username, password).to_bytes()


def test_userpass_request_repr_hides_password() -> None:
    request = UserPassRequest(b"alice", b"hunter2-s3cret")
    for text in (repr(request), str(request), f"{request!r}", f"{[request]}"):
        assert "hunter2" not in text
        assert "s3cret" not in text
        assert "alice" in text
        assert "<hidden>" in text


@pytest.mark.parametrize(
    ("data", "expected", "ok"),
    [
        (h("01 00"), UserPassStatus(0), True),
        (h("01 01"), UserPassStatus(1), False),
        (h("01 ff"), UserPassStatus(0xFF), False),
        (h("01 00 05 01"), UserPassStatus(0), True),  # trailing
    ],
)
def test_parse_userpass_status(data: bytes, expected: UserPassStatus, ok: bool) -> None:
    result = parse_userpass_status(data)
    assert result == (expected, 2)
    assert result is not None
    assert result[0].ok is ok


@pytest.mark.parametrize("data", [h("05 00"), h("00 00"), h("02 00")])
def test_parse_userpass_status_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_userpass_status(data)
    assert excinfo.value.reply is None


# --------------------------------------------------------------------------
# Requests (RFC 1928 section 4)


@pytest.mark.parametrize(
    ("data", "expected", "consumed"),
    [
        # VER CMD RSV ATYP DST.ADDR DST.PORT
        (
            h("05 01 00 01 7f 00 00 01 00 50"),
            Request(Command.CONNECT, Address(IPV4, "127.0.0.1", 80)),
            10,
        ),
        (
            h("05 01 00 01 c0 00 02 01 ff ff"),
            Request(Command.CONNECT, Address(IPV4, "192.0.2.1", 65535)),
            10,
        ),
        (
            h("05 01 00 04 00000000000000000000000000000001 01 bb"),
            Request(Command.CONNECT, Address(IPV6, "::1", 443)),
            22,
        ),
        (
            h("05 01 00 04 20010db8000000000000000000000001 00 16"),
            Request(Command.CONNECT, Address(IPV6, "2001:db8::1", 22)),
            22,
        ),
        (
            h("05 01 00 03 0b") + b"example.com" + h("00 50"),
            Request(Command.CONNECT, Address(DOMAIN, "example.com", 80)),
            18,
        ),
        # A dotted quad sent as DOMAINNAME stays a domain.
        (
            h("05 01 00 03 07") + b"1.2.3.4" + h("00 50"),
            Request(Command.CONNECT, Address(DOMAIN, "1.2.3.4", 80)),
            14,
        ),
        # A UTF-8 domain name.
        (
            h("05 01 00 03 0a") + "bücher.de".encode() + h("00 50"),
            Request(Command.CONNECT, Address(DOMAIN, "bücher.de", 80)),
            17,
        ),
        # The longest request there is: a 255-byte domain.
        (
            h("05 01 00 03 ff") + DOMAIN_255.encode() + h("00 50"),
            Request(Command.CONNECT, Address(DOMAIN, DOMAIN_255, 80)),
            codec.MAX_REQUEST_SIZE,
        ),
        (
            h("05 01 00 03 ff") + UTF8_DOMAIN_255.encode() + h("00 50"),
            Request(Command.CONNECT, Address(DOMAIN, UTF8_DOMAIN_255, 80)),
            codec.MAX_REQUEST_SIZE,
        ),
        (
            h("05 02 00 01 00 00 00 00 00 00"),
            Request(Command.BIND, Address(IPV4, "0.0.0.0", 0)),
            10,
        ),
        (
            h("05 03 00 04 00000000000000000000000000000000 00 00"),
            Request(Command.UDP_ASSOCIATE, Address(IPV6, "::", 0)),
            22,
        ),
        # Pipelined data after the request is not consumed.
        (
            h("05 01 00 01 7f 00 00 01 00 50") + b"GET / HTTP/1.0\r\n",
            Request(Command.CONNECT, Address(IPV4, "127.0.0.1", 80)),
            10,
        ),
    ],
)
def test_parse_request(data: bytes, expected: Request, consumed: int) -> None:
    result = parse_request(data)
    assert result == (expected, consumed)
    assert result is not None
    assert type(result[0].command) is Command
    assert type(result[0].address.type) is AddressType
    # Requests have a single encoding, so they serialize back to the same bytes.
    assert result[0].to_bytes() == data[:consumed]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        # Zero-length domain: nothing to resolve.
        (h("05 01 00 03 00 00 50"), ReplyCode.HOST_UNREACHABLE),
        (h("05 01 00 03 00"), ReplyCode.HOST_UNREACHABLE),  # known before the port
        # NUL byte, and bytes that are not UTF-8, in a domain name.
        (h("05 01 00 03 03 61 00 62 00 50"), ReplyCode.HOST_UNREACHABLE),
        (h("05 01 00 03 02 c3 28 00 50"), ReplyCode.HOST_UNREACHABLE),
        (h("05 01 00 03 01 ff 00 50"), ReplyCode.HOST_UNREACHABLE),
        # Unknown ATYP.
        (h("05 01 00 05 7f 00 00 01 00 50"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (h("05 01 00 05"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (h("05 01 00 00 7f 00 00 01 00 50"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (h("05 01 00 02 7f 00 00 01 00 50"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (h("05 01 00 ff"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        # Unknown CMD, judged once the whole request is there.
        (h("05 09 00 01 7f 00 00 01 00 50"), ReplyCode.COMMAND_NOT_SUPPORTED),
        (h("05 00 00 01 7f 00 00 01 00 50"), ReplyCode.COMMAND_NOT_SUPPORTED),
        (h("05 04 00 03 01 61 00 50"), ReplyCode.COMMAND_NOT_SUPPORTED),
        (h("05 ff 00 04") + bytes(18), ReplyCode.COMMAND_NOT_SUPPORTED),
        # RSV != 0.
        (h("05 01 01 01 7f 00 00 01 00 50"), ReplyCode.GENERAL_FAILURE),
        (h("05 01 ff"), ReplyCode.GENERAL_FAILURE),
        # Bad VER.
        (h("04 01 00 01 7f 00 00 01 00 50"), ReplyCode.GENERAL_FAILURE),
        (h("04"), ReplyCode.GENERAL_FAILURE),
        (h("01 01 00 01 7f 00 00 01 00 50"), ReplyCode.GENERAL_FAILURE),
    ],
)
def test_parse_request_errors(data: bytes, reply: ReplyCode) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_request(data)
    assert excinfo.value.reply is reply


def test_unknown_command_waits_for_the_whole_request() -> None:
    # So the server consumes exactly the request before answering 0x07.
    data = h("05 09 00 01 7f 00 00 01 00 50")
    for size in range(len(data)):
        assert parse_request(data[:size]) is None
    with pytest.raises(ProtocolError):
        parse_request(data)


def test_unknown_atyp_beats_unknown_command() -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_request(h("05 09 00 05"))
    assert excinfo.value.reply is ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


@pytest.mark.parametrize("buffer_type", [bytes, bytearray, memoryview])
def test_parsers_accept_any_buffer(buffer_type: Callable[[bytes], Any]) -> None:
    request = h("05 01 00 03 0b") + b"example.com" + h("00 50")
    assert parse_request(buffer_type(request)) == (
        Request(Command.CONNECT, Address(DOMAIN, "example.com", 80)),
        18,
    )
    assert parse_greeting(buffer_type(h("05 02 00 02"))) == (Greeting((0, 2)), 4)
    assert parse_userpass_request(buffer_type(h("01 01 61 01 62"))) == (
        UserPassRequest(b"a", b"b"),
        5,
    )
    assert parse_udp_datagram(buffer_type(h("00 00 00 01 7f 00 00 01 00 35 aa"))) == (
        UDPDatagram(Address(IPV4, "127.0.0.1", 53), h("aa"))
    )


# --------------------------------------------------------------------------
# Replies (RFC 1928 section 6)


@pytest.mark.parametrize(
    ("data", "expected", "consumed"),
    [
        (
            h("05 00 00 01 0a 00 00 01 04 38"),
            Reply(ReplyCode.SUCCEEDED, Address(IPV4, "10.0.0.1", 1080)),
            10,
        ),
        (
            h("05 00 00 04 20010db8000000000000000000000002 c3 50"),
            Reply(ReplyCode.SUCCEEDED, Address(IPV6, "2001:db8::2", 50000)),
            22,
        ),
        (
            h("05 00 00 03 09") + b"localhost" + h("1f 90"),
            Reply(ReplyCode.SUCCEEDED, Address(DOMAIN, "localhost", 8080)),
            16,
        ),
        (h("05 01 00 01 00 00 00 00 00 00"), Reply(ReplyCode.GENERAL_FAILURE), 10),
        (h("05 05 00 01 00 00 00 00 00 00"), Reply(ReplyCode.CONNECTION_REFUSED), 10),
        (
            h("05 08 00 01 00 00 00 00 00 00 ff"),
            Reply(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
            10,
        ),
    ]
    + [
        (bytes((5, code, 0, 1, 0, 0, 0, 0, 0, 0)), Reply(code, NULL_ADDRESS), 10)
        for code in ReplyCode
    ],
)
def test_parse_reply(data: bytes, expected: Reply, consumed: int) -> None:
    result = parse_reply(data)
    assert result == (expected, consumed)
    assert result is not None
    assert type(result[0].reply) is ReplyCode


@pytest.mark.parametrize(
    "data",
    [
        h("05 09 00 01 00 00 00 00 00 00"),  # unknown REP code
        h("05 ff 00 01 00 00 00 00 00 00"),
        h("04 00 00 01 00 00 00 00 00 00"),  # bad VER
        h("04"),
        h("05 00 00 05"),  # unknown ATYP
        h("05 00 00 03 00"),  # empty domain
    ],
)
def test_parse_reply_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_reply(data)


def test_parse_reply_unknown_code_has_no_reply() -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_reply(h("05 09 00 01 00 00 00 00 00 00"))
    assert excinfo.value.reply is None


@pytest.mark.parametrize(
    ("reply", "data"),
    [
        (Reply(ReplyCode.GENERAL_FAILURE), h("05 01 00 01 00 00 00 00 00 00")),
        (
            Reply(ReplyCode.SUCCEEDED, Address(IPV6, "::1", 1)),
            h("05 00 00 04 00000000000000000000000000000001 00 01"),
        ),
        (
            Reply(ReplyCode.HOST_UNREACHABLE, Address(DOMAIN, "a.b", 258)),
            h("05 04 00 03 03 61 2e 62 01 02"),
        ),
    ],
)
def test_reply_to_bytes(reply: Reply, data: bytes) -> None:
    assert reply.to_bytes() == data


@pytest.mark.parametrize(
    ("code", "value", "phrase"),
    [
        (ReplyCode.SUCCEEDED, 0x00, "succeeded"),
        (ReplyCode.GENERAL_FAILURE, 0x01, "general SOCKS server failure"),
        (ReplyCode.CONNECTION_NOT_ALLOWED, 0x02, "connection not allowed by ruleset"),
        (ReplyCode.NETWORK_UNREACHABLE, 0x03, "network unreachable"),
        (ReplyCode.HOST_UNREACHABLE, 0x04, "host unreachable"),
        (ReplyCode.CONNECTION_REFUSED, 0x05, "connection refused"),
        (ReplyCode.TTL_EXPIRED, 0x06, "TTL expired"),
        (ReplyCode.COMMAND_NOT_SUPPORTED, 0x07, "command not supported"),
        (ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED, 0x08, "address type not supported"),
    ],
)
def test_reply_code_phrase(code: ReplyCode, value: int, phrase: str) -> None:
    assert code == value
    assert code.phrase == phrase


def test_reply_code_phrase_table_covers_every_code() -> None:
    # The table above lists RFC 1928's nine codes; the enum must have no more.
    assert [int(code) for code in ReplyCode] == list(range(9))
    assert all(code.phrase for code in ReplyCode)


@pytest.mark.parametrize(
    ("command", "value", "phrase"),
    [
        (Command.CONNECT, 1, "connect"),
        (Command.BIND, 2, "bind"),
        (Command.UDP_ASSOCIATE, 3, "udp associate"),
    ],
)
def test_command_phrase(command: Command, value: int, phrase: str) -> None:
    assert command == value
    assert command.phrase == phrase


# --------------------------------------------------------------------------
# UDP request header (RFC 1928 section 7)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        # RSV(2) FRAG ATYP DST.ADDR DST.PORT DATA
        (
            h("00 00 00 01 7f 00 00 01 00 35") + b"payload",
            UDPDatagram(Address(IPV4, "127.0.0.1", 53), b"payload", 0),
        ),
        (
            h("00 00 00 01 7f 00 00 01 00 35"),
            UDPDatagram(Address(IPV4, "127.0.0.1", 53), b"", 0),
        ),
        (
            h("00 00 01 01 08 08 08 08 00 35 aa bb"),
            UDPDatagram(Address(IPV4, "8.8.8.8", 53), h("aa bb"), 1),
        ),
        (
            h("00 00 7f 01 08 08 08 08 00 35 aa"),
            UDPDatagram(Address(IPV4, "8.8.8.8", 53), h("aa"), 0x7F),
        ),
        # High-order bit of FRAG: end of a fragment sequence.
        (
            h("00 00 81 01 08 08 08 08 00 35 aa"),
            UDPDatagram(Address(IPV4, "8.8.8.8", 53), h("aa"), 0x81),
        ),
        (
            h("00 00 ff 01 08 08 08 08 00 35 aa"),
            UDPDatagram(Address(IPV4, "8.8.8.8", 53), h("aa"), 0xFF),
        ),
        (
            h("00 00 00 04 20010db8000000000000000000000001 00 35 00"),
            UDPDatagram(Address(IPV6, "2001:db8::1", 53), h("00"), 0),
        ),
        (
            h("00 00 00 03 0b") + b"example.com" + h("00 35") + b"query",
            UDPDatagram(Address(DOMAIN, "example.com", 53), b"query", 0),
        ),
    ],
)
def test_parse_udp_datagram(data: bytes, expected: UDPDatagram) -> None:
    parsed = parse_udp_datagram(data)
    assert parsed == expected
    assert parsed.to_bytes() == data


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"", None),
        (h("00"), None),
        (h("00 00 00"), None),  # shorter than RSV RSV FRAG ATYP
        (h("00 00 00 01"), None),  # no address
        (h("00 00 00 01 7f 00 00 01 00"), None),  # half a port
        (h("00 00 00 04") + bytes(17), None),  # short IPv6 address
        (h("00 00 00 03"), None),  # no domain length
        (h("00 00 00 03 05 61 62"), None),  # short domain
        (h("00 00 00 03 01 61 00"), None),  # domain but half a port
        # RSV != 0.
        (h("00 01 00 01 7f 00 00 01 00 35"), None),
        (h("01 00 00 01 7f 00 00 01 00 35"), None),
        (h("ff ff 00 01 7f 00 00 01 00 35"), None),
        (h("00 01 00"), None),  # short *and* bad RSV
        # Address errors carry their usual codes.
        (h("00 00 00 05 7f 00 00 01 00 35"), ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        (h("00 00 00 03 00 00 35"), ReplyCode.HOST_UNREACHABLE),
    ],
)
def test_parse_udp_datagram_errors(data: bytes, reply: Optional[ReplyCode]) -> None:
    with pytest.raises(ProtocolError) as excinfo:
        parse_udp_datagram(data)
    assert excinfo.value.reply is reply


@pytest.mark.parametrize(
    "data",
    [
        h("00 00 00 01 7f 00 00 01 00 35"),
        h("00 00 00 04 20010db8000000000000000000000001 00 35"),
        h("00 00 00 03 0b") + b"example.com" + h("00 35"),
    ],
)
def test_udp_datagram_shorter_than_header_is_an_error(data: bytes) -> None:
    # A datagram is never "incomplete": every truncated header is malformed.
    for size in range(len(data)):
        with pytest.raises(ProtocolError):
            parse_udp_datagram(data[:size])


@pytest.mark.parametrize("fragment", [-1, 256])
def test_udp_datagram_to_bytes_rejects_bad_fragment(fragment: int) -> None:
    with pytest.raises(ValueError):
        UDPDatagram(NULL_ADDRESS, b"", fragment).to_bytes()


# --------------------------------------------------------------------------
# Addresses


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", Address(IPV4, "127.0.0.1", 80)),
        ("0.0.0.0", Address(IPV4, "0.0.0.0", 80)),
        ("::1", Address(IPV6, "::1", 80)),
        ("::", Address(IPV6, "::", 80)),
        ("2001:DB8:0:0::0:1", Address(IPV6, "2001:db8::1", 80)),  # normalized
        ("fe80::1%eth0", Address(IPV6, "fe80::1", 80)),  # scope id dropped
        # IPv4-mapped IPv6 becomes plain IPv4.
        ("::ffff:192.0.2.1", Address(IPV4, "192.0.2.1", 80)),
        ("::ffff:c000:201", Address(IPV4, "192.0.2.1", 80)),
        ("::ffff:0.0.0.0", Address(IPV4, "0.0.0.0", 80)),
        # ...but an IPv4-compatible (deprecated) address stays IPv6.
        ("::192.0.2.1", Address(IPV6, "::c000:201", 80)),
        ("example.com", Address(DOMAIN, "example.com", 80)),
        ("localhost", Address(DOMAIN, "localhost", 80)),
        ("bücher.de", Address(DOMAIN, "bücher.de", 80)),
        ("1.2.3", Address(DOMAIN, "1.2.3", 80)),  # not a dotted quad
        ("256.1.1.1", Address(DOMAIN, "256.1.1.1", 80)),
        (DOMAIN_255, Address(DOMAIN, DOMAIN_255, 80)),
    ],
)
def test_address_from_host(host: str, expected: Address) -> None:
    address = Address.from_host(host, 80)
    assert address == expected
    assert address.type is expected.type


@pytest.mark.parametrize(
    ("kind", "host", "port"),
    [
        (IPV4, "127.0.0.1", -1),
        (IPV4, "127.0.0.1", 65536),
        (DOMAIN, "example.com", 70000),
        (IPV4, "256.0.0.1", 80),
        (IPV4, "::1", 80),
        (IPV4, "example.com", 80),
        (IPV6, "127.0.0.1", 80),
        (IPV6, "::g", 80),
        (DOMAIN, "", 80),
        (DOMAIN, "a" * 256, 80),
        (DOMAIN, "é" * 128, 80),  # 128 characters but 256 bytes
    ],
)
def test_address_validation(kind: AddressType, host: str, port: int) -> None:
    with pytest.raises(ValueError):
        Address(kind, host, port)


@pytest.mark.parametrize(
    ("host", "port"), [("a", 0), ("a", 65535), (DOMAIN_255, 1), (UTF8_DOMAIN_255, 1)]
)
def test_address_validation_limits_are_inclusive(host: str, port: int) -> None:
    address = Address(DOMAIN, host, port)
    assert address.port == port


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::ffff:1.2.3.4", "example.com"])
@pytest.mark.parametrize("port", [-1, 65536])
def test_address_from_host_rejects_ports_out_of_range(host: str, port: int) -> None:
    with pytest.raises(ValueError, match="port out of range"):
        Address.from_host(host, port)


def test_address_from_host_rejects_overlong_domain() -> None:
    with pytest.raises(ValueError):
        Address.from_host("a" * 256, 80)


@pytest.mark.parametrize(
    ("address", "unspecified"),
    [
        (Address(IPV4, "0.0.0.0", 0), True),
        (Address(IPV4, "0.0.0.0", 1080), True),
        (Address(IPV6, "::", 0), True),
        (Address(IPV4, "127.0.0.1", 0), False),
        (Address(IPV4, "0.0.0.1", 0), False),
        (Address(IPV6, "::1", 0), False),
        (Address(DOMAIN, "0.0.0.0", 0), False),
        (Address(DOMAIN, "::", 0), False),
        (NULL_ADDRESS, True),
    ],
)
def test_address_is_unspecified(address: Address, unspecified: bool) -> None:
    assert address.is_unspecified is unspecified


@pytest.mark.parametrize(
    ("address", "text", "data"),
    [
        (Address(IPV4, "192.0.2.1", 80), "192.0.2.1:80", h("01 c0 00 02 01 00 50")),
        (
            Address(IPV6, "::1", 443),
            "[::1]:443",
            h("04 00000000000000000000000000000001 01 bb"),
        ),
        (Address(DOMAIN, "a.b", 1), "a.b:1", h("03 03 61 2e 62 00 01")),
    ],
)
def test_address_str_and_to_bytes(address: Address, text: str, data: bytes) -> None:
    assert str(address) == text
    assert address.to_bytes() == data


def test_size_limits_match_the_wire_format() -> None:
    greeting = Greeting(tuple(range(255))).to_bytes()
    userpass = UserPassRequest(b"u" * 255, b"p" * 255).to_bytes()
    request = Request(Command.CONNECT, Address(DOMAIN, DOMAIN_255, 80)).to_bytes()
    assert len(greeting) == codec.MAX_GREETING_SIZE
    assert len(userpass) == codec.MAX_USERPASS_SIZE
    assert len(request) == codec.MAX_REQUEST_SIZE
    assert parse_greeting(greeting) is not None
    assert parse_userpass_request(userpass) is not None
    assert parse_request(request) is not None


# --------------------------------------------------------------------------
# "Need more": every proper prefix of a valid message returns None


NEED_MORE_CASES: List[Tuple[str, Parser, bytes]] = [
    ("greeting-1", parse_greeting, h("05 01 00")),
    ("greeting-2", parse_greeting, h("05 02 00 02")),
    ("greeting-255", parse_greeting, bytes((5, 255, *range(255)))),
    ("method-selection", parse_method_selection, h("05 02")),
    ("userpass", parse_userpass_request, h("01 03") + b"foo" + h("03") + b"bar"),
    (
        "userpass-max",
        parse_userpass_request,
        h("01 ff") + b"u" * 255 + h("ff") + b"p" * 255,
    ),
    ("userpass-status", parse_userpass_status, h("01 00")),
    ("request-ipv4", parse_request, h("05 01 00 01 7f 00 00 01 00 50")),
    (
        "request-ipv6",
        parse_request,
        h("05 01 00 04 20010db8000000000000000000000001 00 50"),
    ),
    (
        "request-domain",
        parse_request,
        h("05 01 00 03 0b") + b"example.com" + h("00 50"),
    ),
    (
        "request-domain-255",
        parse_request,
        h("05 01 00 03 ff") + DOMAIN_255.encode() + h("00 50"),
    ),
    (
        "request-utf8",
        parse_request,
        h("05 01 00 03 ff") + UTF8_DOMAIN_255.encode() + h("00 50"),
    ),
    ("reply-ipv4", parse_reply, h("05 00 00 01 0a 00 00 01 04 38")),
    ("reply-ipv6", parse_reply, h("05 00 00 04") + bytes(16) + h("00 50")),
    ("reply-domain", parse_reply, h("05 00 00 03 09") + b"localhost" + h("1f 90")),
]


@pytest.mark.parametrize(
    ("parser", "data"),
    [pytest.param(parser, data, id=name) for name, parser, data in NEED_MORE_CASES],
)
def test_every_proper_prefix_needs_more(parser: Parser, data: bytes) -> None:
    for size in range(len(data)):
        assert parser(data[:size]) is None, size
    result = parser(data)
    assert result is not None
    assert result[1] == len(data)


# --------------------------------------------------------------------------
# Hypothesis strategies

ports = st.integers(min_value=0, max_value=0xFFFF)

domain_names = st.one_of(
    st.text(
        st.characters(codec="utf-8", exclude_characters="\x00"),
        min_size=1,
        max_size=255,
    ).filter(lambda name: 1 <= len(name.encode("utf-8")) <= 255),
    # Long plain names, which the general strategy rarely reaches.
    st.text(string.ascii_lowercase + string.digits + ".-", min_size=200, max_size=255),
)

addresses = st.one_of(
    st.builds(
        lambda ip, port: Address(IPV4, str(ip), port), st.ip_addresses(v=4), ports
    ),
    st.builds(
        lambda ip, port: Address(IPV6, str(ip), port), st.ip_addresses(v=6), ports
    ),
    st.builds(lambda name, port: Address(DOMAIN, name, port), domain_names, ports),
)

octets = st.integers(min_value=0, max_value=255)
short_bytes = st.binary(min_size=1, max_size=255)

greetings = st.builds(Greeting, st.lists(octets, min_size=1, max_size=255).map(tuple))
method_selections = st.builds(MethodSelection, octets)
userpass_requests = st.builds(UserPassRequest, short_bytes, short_bytes)
userpass_statuses = st.builds(UserPassStatus, octets)
requests = st.builds(Request, st.sampled_from(Command), addresses)
replies = st.builds(Reply, st.sampled_from(ReplyCode), addresses)
datagrams = st.builds(
    UDPDatagram, addresses, st.binary(max_size=1024), st.integers(0, 255)
)

#: Arbitrary input, plus arbitrary input behind a plausible first few bytes
#: (random bytes alone almost never get past the version check).
fuzz_input = st.one_of(
    st.binary(max_size=600),
    st.builds(
        bytes.__add__,
        st.sampled_from(
            [
                h("05"),
                h("01"),
                h("05 01"),
                h("05 01 00"),
                h("05 00 00"),
                h("05 01 00 01"),
                h("05 01 00 03"),
                h("05 01 00 04"),
                h("01 03") + b"foo",
            ]
        ),
        st.binary(max_size=300),
    ),
)

udp_fuzz_input = st.one_of(
    st.binary(max_size=600),
    st.builds(
        bytes.__add__,
        st.sampled_from([h("00"), h("00 00 00"), h("00 00 00 01"), h("00 00 00 03")]),
        st.binary(max_size=300),
    ),
)

# Why factories and not ``pytest.mark.parametrize`` on ``@given`` tests:
# pytest-twisted's ``pytest_pyfunc_call`` replaces ``f.hypothesis.inner_test``
# with a wrapper that runs it in the reactor greenlet.  Every parametrized item
# shares the one function object, so the second item wraps the first item's
# wrapper and fails with "blockon cannot be called from the twisted greenlet".
# Each factory call below builds a distinct function, so each is wrapped once.


def _named(test: Callable[..., None], name: str) -> Callable[..., None]:
    test.__name__ = test.__qualname__ = name
    return test


# --------------------------------------------------------------------------
# (a) Round trips


def _round_trip(parser: Parser, messages: st.SearchStrategy[Any], name: str) -> Any:
    @settings(deadline=None)
    @given(messages)
    def test(message: Any) -> None:
        wire = message.to_bytes()
        assert parser(wire) == (message, len(wire))

    return _named(test, name)


test_round_trip_greeting = _round_trip(
    parse_greeting, greetings, "test_round_trip_greeting"
)
test_round_trip_method_selection = _round_trip(
    parse_method_selection, method_selections, "test_round_trip_method_selection"
)
test_round_trip_userpass_request = _round_trip(
    parse_userpass_request, userpass_requests, "test_round_trip_userpass_request"
)
test_round_trip_userpass_status = _round_trip(
    parse_userpass_status, userpass_statuses, "test_round_trip_userpass_status"
)
test_round_trip_request = _round_trip(
    parse_request, requests, "test_round_trip_request"
)
test_round_trip_reply = _round_trip(parse_reply, replies, "test_round_trip_reply")


@settings(deadline=None)
@given(requests)
@example(Request(Command.CONNECT, Address(DOMAIN, DOMAIN_255, 80)))
@example(Request(Command.CONNECT, Address(DOMAIN, UTF8_DOMAIN_255, 80)))
# An IPv4-mapped address sent as IPV6 stays IPV6 (only from_host maps it).
@example(Request(Command.BIND, Address(IPV6, "::ffff:102:304", 0)))
def test_request_round_trip_examples(request: Request) -> None:
    wire = request.to_bytes()
    assert parse_request(wire) == (request, len(wire))


@settings(deadline=None)
@given(datagrams)
@example(UDPDatagram(Address(DOMAIN, DOMAIN_255, 53), b"", 0xFF))
def test_round_trip_udp_datagram(datagram: UDPDatagram) -> None:
    assert parse_udp_datagram(datagram.to_bytes()) == datagram


@settings(deadline=None)
@given(addresses)
def test_address_from_host_agrees_with_the_address_type(address: Address) -> None:
    rebuilt = Address.from_host(address.host, address.port)
    if address.type is IPV4:
        assert rebuilt == address
    elif address.type is IPV6:
        mapped = ipaddress.IPv6Address(address.host).ipv4_mapped
        if mapped is None:
            assert rebuilt == address
        else:
            assert rebuilt == Address(IPV4, str(mapped), address.port)
    else:
        # A generated domain may happen to spell an IP address.
        assert rebuilt == address or rebuilt.type is not DOMAIN


# --------------------------------------------------------------------------
# (b) Trailing bytes are not consumed


def _trailing(parser: Parser, messages: st.SearchStrategy[Any], name: str) -> Any:
    @settings(deadline=None)
    @given(messages, st.binary(min_size=1, max_size=300))
    def test(message: Any, extra: bytes) -> None:
        wire = message.to_bytes()
        assert parser(wire + extra) == (message, len(wire))

    return _named(test, name)


test_trailing_bytes_greeting = _trailing(
    parse_greeting, greetings, "test_trailing_bytes_greeting"
)
test_trailing_bytes_method_selection = _trailing(
    parse_method_selection, method_selections, "test_trailing_bytes_method_selection"
)
test_trailing_bytes_userpass_request = _trailing(
    parse_userpass_request, userpass_requests, "test_trailing_bytes_userpass_request"
)
test_trailing_bytes_userpass_status = _trailing(
    parse_userpass_status, userpass_statuses, "test_trailing_bytes_userpass_status"
)
test_trailing_bytes_request = _trailing(
    parse_request, requests, "test_trailing_bytes_request"
)
test_trailing_bytes_reply = _trailing(parse_reply, replies, "test_trailing_bytes_reply")


@settings(deadline=None)
@given(datagrams, st.binary(min_size=1, max_size=100))
def test_trailing_bytes_udp_datagram_are_payload(
    datagram: UDPDatagram, extra: bytes
) -> None:
    parsed = parse_udp_datagram(datagram.to_bytes() + extra)
    assert parsed.address == datagram.address
    assert parsed.fragment == datagram.fragment
    assert parsed.data == datagram.data + extra


# --------------------------------------------------------------------------
# (c) Arbitrary input: None, a sane (message, consumed), or ProtocolError


def _outcome(parser: Parser, buf: Any) -> Any:
    """Return the parser's result, or ``("error", reply)`` for a ProtocolError."""
    try:
        result = parser(buf)
    except ProtocolError as e:
        assert e.reply is None or type(e.reply) is ReplyCode
        return ("error", e.reply)
    assert result is None or type(result) is tuple
    return result


def _arbitrary(parser: Parser, name: str) -> Any:
    @settings(deadline=None)
    @given(fuzz_input)
    def test(buf: bytes) -> None:
        outcome = _outcome(parser, buf)
        if outcome is None or outcome[0] == "error":
            return
        message, consumed = outcome
        assert type(consumed) is int
        assert 0 < consumed <= len(buf)
        # Whatever was parsed serializes back to the bytes it was parsed
        # from, except that a reply's RSV byte is not checked.
        wire = message.to_bytes()
        if parser is parse_reply:
            assert wire[:2] + wire[3:] == buf[:2] + buf[3:consumed]
        else:
            assert wire == buf[:consumed]
        # The same bytes in a bytearray or memoryview give the same answer.
        assert _outcome(parser, bytearray(buf)) == outcome
        assert _outcome(parser, memoryview(buf)) == outcome

    return _named(test, name)


test_arbitrary_input_greeting = _arbitrary(
    parse_greeting, "test_arbitrary_input_greeting"
)
test_arbitrary_input_method_selection = _arbitrary(
    parse_method_selection, "test_arbitrary_input_method_selection"
)
test_arbitrary_input_userpass_request = _arbitrary(
    parse_userpass_request, "test_arbitrary_input_userpass_request"
)
test_arbitrary_input_userpass_status = _arbitrary(
    parse_userpass_status, "test_arbitrary_input_userpass_status"
)
test_arbitrary_input_request = _arbitrary(parse_request, "test_arbitrary_input_request")
test_arbitrary_input_reply = _arbitrary(parse_reply, "test_arbitrary_input_reply")


def _prefixes(parser: Parser, name: str) -> Any:
    @settings(deadline=None)
    @given(fuzz_input)
    def test(buf: bytes) -> None:
        """
        Outcomes over growing prefixes go: None... then one fixed message or
        one fixed error for good.  So "need more" never turns into a different
        answer once more bytes arrive, and a message completes exactly at its
        last byte.
        """
        outcomes = [_outcome(parser, buf[:size]) for size in range(len(buf) + 1)]
        decided = [size for size, o in enumerate(outcomes) if o is not None]
        if not decided:
            return
        first = decided[0]
        final = outcomes[first]
        assert all(o is None for o in outcomes[:first])
        assert all(o == final for o in outcomes[first:])
        if final[0] != "error":
            assert final[1] == first

    return _named(test, name)


test_prefixes_consistent_greeting = _prefixes(
    parse_greeting, "test_prefixes_consistent_greeting"
)
test_prefixes_consistent_method_selection = _prefixes(
    parse_method_selection, "test_prefixes_consistent_method_selection"
)
test_prefixes_consistent_userpass_request = _prefixes(
    parse_userpass_request, "test_prefixes_consistent_userpass_request"
)
test_prefixes_consistent_userpass_status = _prefixes(
    parse_userpass_status, "test_prefixes_consistent_userpass_status"
)
test_prefixes_consistent_request = _prefixes(
    parse_request, "test_prefixes_consistent_request"
)
test_prefixes_consistent_reply = _prefixes(
    parse_reply, "test_prefixes_consistent_reply"
)


@settings(deadline=None)
@given(udp_fuzz_input)
def test_arbitrary_input_udp_datagram(buf: bytes) -> None:
    try:
        datagram = parse_udp_datagram(buf)
    except ProtocolError as e:
        assert e.reply is None or type(e.reply) is ReplyCode
        return
    assert type(datagram) is UDPDatagram
    assert datagram.to_bytes() == buf


# --------------------------------------------------------------------------
# (d) Chunking invariance


def _chunking(parser: Parser, messages: st.SearchStrategy[Any], name: str) -> Any:
    @settings(deadline=None)
    @given(messages, st.data())
    def test(message: Any, data: Any) -> None:
        wire = message.to_bytes()
        cuts = data.draw(
            st.lists(st.integers(1, len(wire) - 1), unique=True).map(sorted)
            if len(wire) > 1
            else st.just([]),
            label="cuts",
        )
        received = bytearray()
        start = 0
        for cut in [*cuts, len(wire)]:
            received += wire[start:cut]
            start = cut
            result = parser(received)
            if len(received) < len(wire):
                assert result is None, len(received)
            else:
                assert result == (message, len(wire))
        assert start == len(wire)

    return _named(test, name)


test_chunking_greeting = _chunking(parse_greeting, greetings, "test_chunking_greeting")
test_chunking_method_selection = _chunking(
    parse_method_selection, method_selections, "test_chunking_method_selection"
)
test_chunking_userpass_request = _chunking(
    parse_userpass_request, userpass_requests, "test_chunking_userpass_request"
)
test_chunking_userpass_status = _chunking(
    parse_userpass_status, userpass_statuses, "test_chunking_userpass_status"
)
test_chunking_request = _chunking(parse_request, requests, "test_chunking_request")
test_chunking_reply = _chunking(parse_reply, replies, "test_chunking_reply")
