"""
The Tunnel's states and the command registry, driven through the server
protocol in memory (see test_server.py for the relay's bytes).
"""

from __future__ import annotations

from typing import Any, List

from helpers import Harness
from twisted.internet import error
from twisted.python.failure import Failure

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
)
from twisted_socks5.commands import HANDLERS, RequestContext
from twisted_socks5.tunnel import Tunnel, TunnelState

GREET = b"\x05\x01\x00"
TARGET = Address(AddressType.IPV4, "127.0.0.1", 8080)
CONNECT = Request(Command.CONNECT, TARGET).to_bytes()


def relaying(h: Harness) -> Any:
    h.send(GREET + CONNECT)
    outbound, out_transport = h.connector.succeed()
    tunnel = h.protocol.tunnel
    assert isinstance(tunnel, Tunnel) and tunnel.outbound is outbound
    return tunnel, outbound, out_transport


def test_eof_one_way_half_closes_then_both_ways_closes() -> None:
    h = Harness()
    tunnel, outbound, out = relaying(h)
    assert tunnel.state is TunnelState.RELAYING
    assert h.protocol.outcome == "relaying"
    h.protocol.readConnectionLost()
    assert tunnel.state is TunnelState.HALF_CLOSED and out.write_closed
    assert h.protocol.outcome == "relaying"
    outbound.readConnectionLost()
    assert tunnel.state is TunnelState.CLOSED
    assert tunnel.outbound is None and outbound.tunnel is None
    h.lose()
    assert h.protocol.outcome == "closed"


def test_a_reset_target_ends_the_tunnel_and_says_why() -> None:
    h = Harness()
    tunnel, outbound, _ = relaying(h)
    outbound.connectionLost(Failure(error.ConnectionLost()))
    assert tunnel.state is TunnelState.CLOSED and h.transport.aborted
    h.lose(error.ConnectionLost())
    assert h.protocol.outcome.startswith("target connection lost: ")


def test_the_client_leaving_closes_the_tunnel_and_its_target() -> None:
    h = Harness()
    tunnel, outbound, out = relaying(h)
    h.lose()
    assert tunnel.state is TunnelState.CLOSED and out.disconnecting
    assert tunnel.outbound is None and outbound.tunnel is None
    assert h.protocol.outcome == "closed"


def test_the_watch_gives_up_on_a_silent_tunnel() -> None:
    h = Harness(idle_timeout=10)
    tunnel, _, _ = relaying(h)
    assert tunnel in h.factory.watch.watching
    h.reactor.advance(10)
    assert h.transport.aborted and tunnel not in h.factory.watch.watching
    assert h.protocol.outcome == "idle timeout"


class _Refusing:
    """A command that answers 0x02 itself: one more handler, no new branch."""

    phase = "connecting"

    def __init__(self) -> None:
        self.seen: List[Request] = []

    def rules_destination(self, request: Request) -> Address:
        return request.address

    def handle(self, ctx: RequestContext, request: Request) -> None:
        self.seen.append(request)
        ctx.fail(ReplyCode.CONNECTION_NOT_ALLOWED, "refused by the test")


def test_the_protocol_dispatches_through_the_factory_s_handlers() -> None:
    h = Harness()
    handler = _Refusing()
    h.factory.handlers[Command.CONNECT] = handler
    h.send(GREET + CONNECT)
    assert [r.command for r in handler.seen] == [Command.CONNECT]
    assert h.take().endswith(Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes())
    assert h.protocol.outcome == "refused by the test"
    assert h.connector.calls == []
    # The module registry is untouched: each factory has its own copy.
    assert HANDLERS[Command.CONNECT] is not handler


def test_a_command_without_a_handler_answers_07() -> None:
    h = Harness()
    del h.factory.handlers[Command.CONNECT]
    h.send(GREET + CONNECT)
    assert h.take().endswith(Reply(ReplyCode.COMMAND_NOT_SUPPORTED).to_bytes())


def test_a_tunnel_closed_before_it_starts_relays_nothing() -> None:
    h = Harness()
    tunnel, outbound, out = relaying(h)
    h.lose()
    assert tunnel.start(b"early", 0.0) is False
    assert out.value() == b"" and tunnel.state is TunnelState.CLOSED
