"""
The factory's default host protection: a factory built without
``protect_host`` refuses the proxy host as a destination to clients that
came in on a non-loopback address of it (an embedder who listens on every
interface is protected without being told), and keeps the host reachable
for clients that came in on loopback (they are on this host already).
In memory: no traffic leaves the test.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Harness
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    Reply,
    ReplyCode,
    Request,
)
from twisted_socks5.commands.base import reached_from_outside_of
from twisted_socks5.rules import RuleSet
from twisted_socks5.selfnet import HostAddresses, local_literal, reached_from_outside
from twisted_socks5.server import PROTECT_WHEN_EXPOSED, SOCKS5ServerFactory

GREET = b"\x05\x01\x00"
OUTSIDE = IPv4Address("TCP", "192.0.2.10", 1080)  # documentation address
OUTSIDE6 = IPv6Address("TCP", "2001:db8::10", 1080)
LOOPBACK = IPv4Address("TCP", "127.0.0.1", 1080)
DENIED = Reply(ReplyCode.CONNECTION_NOT_ALLOWED).to_bytes()


def _connect(host: str, port: int = 8080) -> bytes:
    kind = AddressType.IPV6 if ":" in host else AddressType.IPV4
    return Request(Command.CONNECT, Address(kind, host, port)).to_bytes()


def _host() -> HostAddresses:
    return HostAddresses(read=lambda: [])


@pytest.mark.parametrize("local", [OUTSIDE, OUTSIDE6])
@pytest.mark.parametrize("destination", ["127.0.0.1", "127.3.4.5", "::1"])
def test_default_refuses_the_host_to_clients_from_outside(
    local: Any, destination: str
) -> None:
    h = Harness(local=local)
    h.send(GREET + _connect(destination))
    assert h.take() == b"\x05\x00" + DENIED
    assert h.connector.calls == []
    assert h.closing


@pytest.mark.parametrize("local", [LOOPBACK, IPv6Address("TCP", "::1", 1080)])
def test_default_keeps_the_host_for_clients_on_loopback(local: Any) -> None:
    h = Harness(local=local)
    h.send(GREET + _connect("127.0.0.1"))
    assert [c[0].host for c in h.connector.calls] == ["127.0.0.1"]


def test_default_lets_other_destinations_through_from_outside() -> None:
    h = Harness(local=OUTSIDE)
    h.send(GREET + _connect("192.0.2.99"))
    assert [c[0].host for c in h.connector.calls] == ["192.0.2.99"]


def test_a_rule_naming_self_opens_the_host_from_outside() -> None:
    host = _host()
    rules = RuleSet.parse("allow to self\ndefault deny\n", host=host)
    h = Harness(local=OUTSIDE, policy=rules)
    h.send(GREET + _connect("127.0.0.1"))
    assert [c[0].host for c in h.connector.calls] == ["127.0.0.1"]


def test_none_turns_the_protection_off() -> None:
    h = Harness(local=OUTSIDE, protect_host=None)
    h.send(GREET + _connect("127.0.0.1"))
    assert [c[0].host for c in h.connector.calls] == ["127.0.0.1"]


def test_explicit_host_protects_loopback_clients_too() -> None:
    h = Harness(local=LOOPBACK, protect_host=_host())
    h.send(GREET + _connect("127.0.0.1"))
    assert h.take() == b"\x05\x00" + DENIED


def test_the_default_is_when_exposed_and_unknown_modes_are_refused() -> None:
    factory = SOCKS5ServerFactory()
    assert factory.protect_when_exposed and factory.protect_host is not None
    assert PROTECT_WHEN_EXPOSED == "when-exposed"
    with pytest.raises(ValueError, match="unknown mode"):
        SOCKS5ServerFactory(protect_host="always")


@pytest.mark.parametrize(
    ("local", "outside"),
    [
        ("127.0.0.1", False),
        ("127.9.9.9", False),
        ("::1", False),
        ("::ffff:127.0.0.1", False),
        ("192.0.2.1", True),
        ("0.0.0.0", True),
        ("2001:db8::1", True),
        ("fe80::1%eth0", True),
        ("not an address", True),
        (None, False),
    ],
)
def test_reached_from_outside(local: Any, outside: bool) -> None:
    assert reached_from_outside(local) is outside


def test_a_unix_socket_client_is_local() -> None:
    h = Harness(local=UNIXAddress(b"/run/socks5.sock"))
    assert not reached_from_outside_of(h.protocol)


def _name_request(name: str, port: int = 8080) -> bytes:
    return Request(Command.CONNECT, Address(AddressType.DOMAIN, name, port)).to_bytes()


@pytest.mark.parametrize(
    "name",
    ["localhost", "LOCALHOST.", "a.localhost", "ip6-localhost", "127.1", "0x7f.1",
     "2130706433", "0177.0.0.1", "::1", "0", "0x0"],
)  # fmt: skip
def test_names_an_upstream_would_read_as_this_host_are_refused(name: str) -> None:
    """A route that resolves remotely (not a DirectConnector) still refuses
    names that need no resolver to mean this host."""
    h = Harness(protect_host=_host())  # FakeConnector: not a DirectConnector
    h.send(GREET + _name_request(name))
    assert h.take() == b"\x05\x00" + DENIED
    assert h.connector.calls == []


def test_other_names_go_to_an_upstream_as_names() -> None:
    h = Harness(protect_host=_host())
    h.send(GREET + _name_request("example.com"))
    assert [c[0].host for c in h.connector.calls] == ["example.com"]


@pytest.mark.parametrize(
    ("name", "ip"),
    [("localhost", "127.0.0.1"), ("x.localhost.", "127.0.0.1"), ("127.1", "127.0.0.1"),
     ("2130706433", "127.0.0.1"), ("::1", "::1"), ("example.com", None),
     ("localhost.example.com", None), ("", None)],
)  # fmt: skip
def test_local_literal(name: str, ip: Any) -> None:
    assert local_literal(name) == ip
