"""Every error path, with a raw client on real sockets: exact bytes back."""

from __future__ import annotations

from typing import Any, List

import pytest
import pytest_twisted
from conftest import LOOPBACKS, Echo, LoopbackResolver, all_closed, closed_port, until
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHostnameResolver
from zope.interface import implementer

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
    parse_reply,
)
from twisted_socks5.outbound import DirectConnector


class RawClient(protocol.Protocol):
    """Sends bytes, records everything received, fires ``done`` on close."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.received: List[bytes] = []
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(b"".join(self.received))


async def exchange(port: int, payload: bytes) -> bytes:
    """Send ``payload`` to the proxy and return all it says until it closes."""
    client = RawClient(payload)
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    await connectProtocol(endpoint, client)
    return await client.done.addTimeout(20, reactor)


def connect_request(
    host: str, port: int, atyp: AddressType = AddressType.IPV4
) -> bytes:
    return Request(Command.CONNECT, Address(atyp, host, port)).to_bytes()


def failure(code: ReplyCode) -> bytes:
    return Reply(code).to_bytes()


@pytest_twisted.ensureDeferred
async def test_refused(make_proxy: Any) -> None:
    _, port = make_proxy()
    out = await exchange(
        port, b"\x05\x01\x00" + connect_request("127.0.0.1", closed_port())
    )
    assert out == b"\x05\x00" + failure(ReplyCode.CONNECTION_REFUSED)


@pytest_twisted.ensureDeferred
async def test_unresolvable_name(make_proxy: Any) -> None:
    _, port = make_proxy()
    request = connect_request("nowhere.invalid", 80, AddressType.DOMAIN)
    out = await exchange(port, b"\x05\x01\x00" + request)
    assert out == b"\x05\x00" + failure(ReplyCode.HOST_UNREACHABLE)


@implementer(IHostnameResolver)
class SilentResolver:
    """A resolver that never answers: only the connect timeout can end it."""

    def __init__(self) -> None:
        self.receivers: List[Any] = []
        #: Fires when the first look-up is asked for.
        self.asked: defer.Deferred[None] = defer.Deferred()

    def resolveHostName(self, receiver: Any, hostName: str, *a: Any, **kw: Any) -> Any:
        self.receivers.append(receiver)
        if not self.asked.called:
            self.asked.callback(None)
        return receiver


@pytest_twisted.ensureDeferred
async def test_connect_timeout_answers_ttl_expired(make_proxy: Any) -> None:
    connector = DirectConnector(reactor, timeout=0.2, resolver=SilentResolver())
    _, port = make_proxy(connector=connector)
    request = connect_request("slow.test", 80, AddressType.DOMAIN)
    out = await exchange(port, b"\x05\x01\x00" + request)
    assert out == b"\x05\x00" + failure(ReplyCode.TTL_EXPIRED)


@pytest_twisted.ensureDeferred
async def test_a_client_that_resets_while_connecting_is_noticed_at_once(
    make_proxy: Any,
) -> None:
    """
    The client is still watched while its CONNECT is pending, so its reset
    ends the attempt at once, not when the connect times out (60 s here).
    """
    resolver = SilentResolver()
    connector = DirectConnector(reactor, timeout=60, resolver=resolver)
    factory, port = make_proxy(connector=connector, handshake_timeout=120)
    client = RawClient(
        b"\x05\x01\x00" + connect_request("slow.test", 80, AddressType.DOMAIN)
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await resolver.asked.addTimeout(10, reactor)  # the attempt is under way
    (server,) = factory.active
    client.transport.abortConnection()
    await all_closed(factory, 10)
    assert server.outcome == "client went away while connecting"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"\x05\x01\x02", b"\x05\xff"),  # only user/pass offered, we have none
        (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", b""),  # SOCKS4
        (b"\x05\x00", b""),  # NMETHODS = 0
        (
            b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00" + failure(ReplyCode.COMMAND_NOT_SUPPORTED),
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x07\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00" + failure(ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED),
        ),
        (
            b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50",
            b"\x05\x00" + failure(ReplyCode.HOST_UNREACHABLE),
        ),
        (
            b"\x05\x01\x00\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50",
            b"\x05\x00" + failure(ReplyCode.GENERAL_FAILURE),
        ),
    ],
    ids=[
        "no-method",
        "socks4",
        "nmethods-0",
        "cmd",
        "atyp",
        "empty-name",
        "rsv",
    ],
)
@pytest_twisted.ensureDeferred
async def test_protocol_errors(
    make_proxy: Any, payload: bytes, expected: bytes
) -> None:
    _, port = make_proxy()
    assert await exchange(port, payload) == expected


@pytest_twisted.ensureDeferred
async def test_wrong_password(make_proxy: Any) -> None:
    from test_clients import userpass

    _, port = make_proxy(authenticators=[userpass(alice="s3cret")])
    out = await exchange(port, b"\x05\x01\x02\x01\x05alice\x05wrong")
    assert out == b"\x05\x02\x01\x01"


@pytest_twisted.ensureDeferred
async def test_handshake_timeout_closes_a_stalled_client(make_proxy: Any) -> None:
    _, port = make_proxy(handshake_timeout=0.2)
    assert await exchange(port, b"\x05\x02\x00") == b""
    assert await exchange(port, b"") == b""


@pytest.mark.parametrize("target_host", LOOPBACKS)
@pytest_twisted.ensureDeferred
async def test_success_reply_names_the_outbound_socket(
    make_proxy: Any, tcp_target: Any, target_host: str
) -> None:
    factory, port = make_proxy()
    target = tcp_target(Echo, target_host)
    client = RawClient(
        b"\x05\x01\x00"
        + connect_request(
            target_host,
            target,
            AddressType.IPV6 if ":" in target_host else AddressType.IPV4,
        )
        + b"ping"
    )
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await until(lambda: b"ping" in b"".join(client.received), "the echo")
    data = b"".join(client.received)
    parsed = parse_reply(data[2:])
    assert parsed is not None
    reply, used = parsed
    assert reply.reply is ReplyCode.SUCCEEDED
    assert reply.address.host == target_host
    (server_protocol,) = factory.active
    assert reply.address.port == server_protocol.bound.port != 0
    assert data[2 + used :] == b"ping"
    client.transport.loseConnection()
    await client.done


@pytest_twisted.ensureDeferred
async def test_happy_eyeballs_falls_back_to_the_family_that_answers(
    make_proxy: Any, tcp_target: Any
) -> None:
    """The name resolves to ::1 and 127.0.0.1; only IPv4 listens."""
    connector = DirectConnector(reactor, 5, resolver=LoopbackResolver(v4=True, v6=True))
    _, port = make_proxy(connector=connector)
    target = tcp_target(Echo, "127.0.0.1")
    request = connect_request("both.test", target, AddressType.DOMAIN)
    client = RawClient(b"\x05\x01\x00" + request + b"hi")
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await until(lambda: b"".join(client.received).endswith(b"hi"), "the echo")
    assert b"".join(client.received)[:4] == b"\x05\x00\x05\x00"
    client.transport.loseConnection()
    await client.done
