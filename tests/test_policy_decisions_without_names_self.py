"""
A policy of the embedder's own (any object with the IPolicy methods) whose
decisions do not say ``names_self`` never opens the proxy host to clients
from outside: only a decision that says it names ``self`` does.  In memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import pytest
from helpers import Harness
from twisted.internet.address import IPv4Address

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
)

OUTSIDE = IPv4Address("TCP", "192.0.2.10", 1080)  # documentation address
DENIED = Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes()


@dataclass
class Verdict:
    """A decision of the embedder's own: no ``names_self`` unless given."""

    allowed: bool = True
    rule: str = "my policy"
    final: bool = True
    via: Optional[str] = None


@dataclass
class VerdictNamingSelf(Verdict):
    names_self: bool = True


class AllowAllMine:
    def __init__(self, verdict: Any) -> None:
        self.verdict = verdict

    def check_client(self, client: Any) -> Any:
        return self.verdict

    def check_request(self, *args: Any) -> Any:
        return self.verdict

    def check_resolved(self, *args: Any) -> Any:
        return self.verdict


def _connect_to(host: str) -> bytes:
    return Request(Command.CONNECT, Address(AddressType.IPV4, host, 8080)).to_bytes()


def test_an_allow_that_does_not_name_self_keeps_the_host_closed() -> None:
    h = Harness(local=OUTSIDE, policy=AllowAllMine(Verdict()))
    h.send(b"\x05\x01\x00" + _connect_to("127.0.0.1"))
    assert h.take() == b"\x05\x00" + DENIED
    assert h.connector.calls == []
    assert h.closing


@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.20"])
def test_an_allow_that_names_self_opens_the_host(host: str) -> None:
    h = Harness(local=OUTSIDE, policy=AllowAllMine(VerdictNamingSelf()))
    h.send(b"\x05\x01\x00" + _connect_to(host))
    assert len(h.connector.calls) == 1
