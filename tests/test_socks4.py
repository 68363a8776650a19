"""
The protocol front (--protocols, the first-byte sniff) and SOCKS4/4a on
the server, driven in memory: exact bytes in, exact bytes out.
"""

from __future__ import annotations

from typing import Any, List, Tuple

import pytest
from helpers import SERVER, Harness
from hypothesis import given
from hypothesis import strategies as st
from test_bind_udp_unit import first_listener, incoming
from test_server import userpass_harness
from twisted.internet.address import IPv6Address

from twisted_socks5.codec import Address, AddressType, Command, ReplyCode, Request
from twisted_socks5.connection import SOCKS4ServerProtocol, SOCKS5ServerProtocol
from twisted_socks5.rules import RuleSet
from twisted_socks5.server import State
from twisted_socks5.socks4 import (
    MAX_USERID,
    Socks4Handshake,
    Socks4Request,
    parse_reply,
    parse_request,
    reply_bytes,
)

BOTH = ("socks5", "socks4")
TARGET = Address(AddressType.IPV4, "127.0.0.1", 8080)


def socks4(
    address: Address = TARGET, userid: bytes = b"", command: Command = Command.CONNECT
) -> bytes:
    return Socks4Request(Request(command, address), userid).to_bytes()


def _connection_events(events: Any) -> List[dict[str, Any]]:
    return [e for e in events if e.get("event") == "socks5.connection"]


# --------------------------------------------------------------------------
# The front


def test_socks5_stays_socks5_and_costs_no_other_class() -> None:
    h = Harness(protocols=BOTH)
    h.send(b"\x05\x01\x00")
    assert h.take() == b"\x05\x00"
    assert type(h.protocol) is SOCKS5ServerProtocol
    assert h.protocol.protocol == "socks5"


@pytest.mark.parametrize("first", [b"\x00", b"\x01", b"G", b"\x16\x03\x01", b"\xff"])
def test_a_garbage_first_byte_closes_unanswered(first: bytes, events: Any) -> None:
    h = Harness(protocols=BOTH)
    h.send(first)
    assert h.take() == b""
    assert h.closing
    h.lose()
    (event,) = _connection_events(events)
    assert event["outcome"] == (
        f"first byte 0x{first[0]:02x}: no protocol enabled speaks it "
        "(--protocols socks5,socks4)"
    )


def test_socks4_is_refused_when_not_enabled(events: Any) -> None:
    h = Harness()
    h.send(socks4())
    assert h.take() == b""
    assert h.closing
    assert h.connector.calls == []
    h.lose()
    (event,) = _connection_events(events)
    assert "first byte 0x04" in event["outcome"]


def test_socks5_is_refused_when_not_enabled() -> None:
    h = Harness(protocols=("socks4",))
    h.send(b"\x05\x01\x00")
    assert h.take() == b""
    assert h.closing
    h = Harness(protocols=("socks4",))
    h.send(socks4())
    assert [c[0] for c in h.connector.calls] == [TARGET]


@pytest.mark.parametrize("bad", [(), ("socks6",), ("SOCKS5", "nope")])
def test_the_factory_checks_its_protocols(bad: Tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Harness(protocols=bad)


def test_http_is_handed_the_connection_and_the_bytes(monkeypatch: Any) -> None:
    taken: List[Tuple[Any, bytes]] = []
    # The front reaches the HTTP proxy through the factory (no import circle).
    monkeypatch.setattr(
        "twisted_socks5.server.http_take_over", lambda c, d: taken.append((c, d))
    )
    h = Harness(protocols=("socks5", "http"))
    h.send(b"CONNECT localhost:80 HTTP/1.1\r\n")
    assert taken == [(h.protocol, b"CONNECT localhost:80 HTTP/1.1\r\n")]
    assert h.protocol.protocol == "http"
    assert not h.closing
    # 0x04 is no HTTP method's first byte: without socks4, closed.
    h = Harness(protocols=("socks5", "http"))
    h.send(socks4())
    assert h.closing and len(taken) == 1


# --------------------------------------------------------------------------
# SOCKS4 and 4a


def test_socks4_connect_granted_with_the_bound_address(events: Any) -> None:
    h = Harness(protocols=BOTH)
    h.send(socks4(userid=b"alice"))
    assert type(h.protocol) is SOCKS4ServerProtocol
    assert [c[0] for c in h.connector.calls] == [TARGET]
    assert h.take() == b""
    h.connector.succeed()
    # VN 0, 0x5A, the outbound connection's local port and address.
    assert h.take() == b"\x00\x5a\xc3\x50\x7f\x00\x00\x01"
    assert h.protocol.state is State.RELAYING
    assert h.protocol.user is None  # the USERID is no identity
    h.lose()
    (event,) = _connection_events(events)
    assert event["protocol"] == "socks4"
    assert event["userid"] == "alice"
    assert event["user"] is None
    assert event["summary"].endswith(" over socks4 (userid alice)")


def test_socks4a_sends_the_name() -> None:
    h = Harness(protocols=BOTH)
    name = Address(AddressType.DOMAIN, "localhost", 80)
    h.send(socks4(name))
    assert [c[0] for c in h.connector.calls] == [name]


def test_the_userid_is_logged_escaped(events: Any) -> None:
    h = Harness(protocols=BOTH)
    h.send(socks4(userid=b"ev il\n\x1b[31m\xff"))
    h.lose()
    (event,) = _connection_events(events)
    assert event["userid"] == "ev\\x20il\\n\\x1b[31m\\\\xff"
    assert "\n" not in event["summary"] and "\x1b" not in event["summary"]


def test_a_request_without_its_nul_waits_until_the_bound_then_is_refused() -> None:
    h = Harness(protocols=BOTH)
    h.send(socks4()[:-1] + b"u" * MAX_USERID)
    assert h.take() == b"" and not h.closing  # 255 bytes: a NUL may still come
    h.send(b"u")
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.closing
    assert h.connector.calls == []


def test_a_4a_name_without_its_nul_is_refused_at_the_bound() -> None:
    h = Harness(protocols=BOTH)
    head = socks4(Address(AddressType.DOMAIN, "x", 80))[:-2]
    h.send(head + b"n" * 255)
    assert h.take() == b"" and not h.closing
    h.send(b"n")
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.closing


def test_pipelined_data_is_early_data_for_the_relay() -> None:
    h = Harness(protocols=BOTH)
    h.send(socks4() + b"GET / HTTP/1.0\r\n\r\n")
    _, out = h.connector.succeed()
    assert out.value() == b"GET / HTTP/1.0\r\n\r\n"


def test_byte_by_byte() -> None:
    h = Harness(protocols=BOTH)
    for byte in socks4(Address(AddressType.DOMAIN, "localhost", 80), b"me") + b"x":
        h.send(bytes((byte,)))
    _, out = h.connector.succeed()
    assert out.value() == b"x"


def test_a_failed_connect_is_rejected() -> None:
    from twisted.internet.error import ConnectionRefusedError

    h = Harness(protocols=BOTH)
    h.send(socks4())
    h.connector.fail(ConnectionRefusedError())
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.protocol.reply is ReplyCode.CONNECTION_REFUSED
    assert h.closing


def test_an_unknown_command_is_rejected() -> None:
    h = Harness(protocols=BOTH)
    h.send(b"\x04\x03\x00\x50\x7f\x00\x00\x01\x00")
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.closing


def test_bind_two_replies_with_addresses() -> None:
    h = Harness(protocols=BOTH)
    h.send(socks4(Address(AddressType.IPV4, "127.0.0.9", 2121), command=Command.BIND))
    factory, interface = first_listener(h)
    assert interface == "127.0.0.1"
    # The port MemoryReactor's listenTCP "bound" (0: its first), 127.0.0.1.
    first = h.take()
    assert first[:2] == b"\x00\x5a" and first[4:] == b"\x00\x00\x00\x00"
    peer, peer_transport = incoming(factory, "127.0.0.9", 2000)
    assert h.take() == b"\x00\x5a\x07\xd0\x7f\x00\x00\x09"
    h.send(b"to peer")
    assert peer_transport.value() == b"to peer"


def test_bind_over_ipv6_is_refused() -> None:
    h = Harness(local=IPv6Address("TCP", "::1", 1080), protocols=BOTH)
    h.send(socks4(Address(AddressType.IPV4, "127.0.0.9", 2121), command=Command.BIND))
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.reactor.tcpServers == []


# --------------------------------------------------------------------------
# No password in SOCKS4


def test_socks4_is_refused_when_a_password_is_required(events: Any) -> None:
    h = userpass_harness(protocols=BOTH)
    h.protocol.factory.authenticators = h.protocol.factory.authenticators[:1]
    h.send(socks4())
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.connector.calls == []
    h.lose()
    (event,) = _connection_events(events)
    assert "SOCKS4 cannot send" in event["rule"]


def test_socks4_is_served_when_no_password_is_required() -> None:
    h = userpass_harness(protocols=BOTH)  # offers 0x02 and 0x00
    h.send(socks4())
    assert [c[0] for c in h.connector.calls] == [TARGET]
    assert SERVER.port == 1080


# --------------------------------------------------------------------------
# --protocols


@pytest.mark.parametrize(
    "value, why",
    [
        ("", "empty protocol name"),
        ("socks5,", "empty protocol name"),
        ("socks5,socks6", "unknown protocol(s) ['socks6']"),
        ("socks4,http,socks4", "socks4 named twice"),
    ],
)
def test_protocols_option_usage_errors(value: str, why: str) -> None:
    from twisted.python import usage

    from twisted_socks5.options import Options

    with pytest.raises(usage.UsageError) as caught:
        Options().parseOptions([f"--protocols={value}"])
    assert str(caught.value).startswith("--protocols: ")
    assert why in str(caught.value)


def test_protocols_option_reaches_the_factory() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from twisted_socks5.options import Options
    from twisted_socks5.tap import build_factory

    options = Options()
    options.parseOptions([])
    assert build_factory(options, MemoryReactorClock()).protocols == {"socks5"}
    options = Options()
    options.parseOptions(["--protocols", "HTTP, socks4,socks5"])
    assert options["protocols"] == ("http", "socks4", "socks5")
    factory = build_factory(options, MemoryReactorClock())
    assert factory.protocols == {"socks5", "socks4", "http"}


# --------------------------------------------------------------------------
# The rules: `protocol`, and the explicit permission SOCKS4 needs


def password_only(**kw: Any) -> Harness:
    h = userpass_harness(**kw)
    h.factory.authenticators = h.factory.authenticators[:1]
    return h


def test_an_explicit_rule_lets_socks4_in_when_a_password_is_required() -> None:
    rules = RuleSet.parse("allow from 127.0.0.0/8 protocol socks4\ndefault deny\n")
    h = password_only(protocols=BOTH, policy=rules)
    h.send(socks4())
    assert [c[0] for c in h.connector.calls] == [TARGET]
    assert h.protocol.user is None


@pytest.mark.parametrize(
    "text",
    [
        "allow from 127.0.0.0/8\n",  # no protocol named
        "allow protocol socks4\n",  # no client networks named
        "default allow\n",
        "allow from 127.0.0.0/8 protocol socks5, http\n",
        "allow user -\n",
    ],
)
def test_only_an_explicit_rule_lets_socks4_in(text: str, events: Any) -> None:
    h = password_only(protocols=BOTH, policy=RuleSet.parse(text))
    h.send(socks4())
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.connector.calls == []
    h.lose()
    (event,) = _connection_events(events)
    assert event["reply"] == ReplyCode.CONNECTION_NOT_ALLOWED


def test_the_explicit_rule_holds_for_every_address_of_a_name() -> None:
    rules = RuleSet.parse(
        "allow from 127.0.0.0/8 protocol socks4 to 10.0.0.0/8\n"
        "allow from 127.0.0.0/8 to 192.0.2.0/24\n"
    )
    h = password_only(protocols=BOTH, policy=rules)
    h.send(socks4(Address(AddressType.DOMAIN, "www.example", 80)))
    ((name, lookup),) = h.connector.lookups
    lookup.callback(["192.0.2.1"])  # allowed, but not for SOCKS4 without a password
    assert h.take() == b"\x00\x5b" + bytes(6)
    assert h.connector.calls == []


def test_protocol_condition_on_the_server() -> None:
    rules = RuleSet.parse("deny protocol socks4\nallow\n")
    h = Harness(protocols=BOTH, policy=rules)
    h.send(socks4())
    assert h.take() == b"\x00\x5b" + bytes(6)
    h = Harness(protocols=BOTH, policy=rules)
    h.send(b"\x05\x01\x00" + Request(Command.CONNECT, TARGET).to_bytes())
    assert [c[0] for c in h.connector.calls] == [TARGET]


# --------------------------------------------------------------------------
# The codec, property-based (the fuzz targets in stress/fuzz_targets.py
# take arbitrary bytes)

ipv4s = st.ip_addresses(v=4).map(str).filter(lambda ip: not ip.startswith("0.0.0."))
hostnames = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=60,
).filter(lambda n: len(n.encode()) <= 255)
ipv4_addresses = st.builds(
    Address, st.just(AddressType.IPV4), ipv4s, st.integers(0, 65535)
)
socks4_messages = st.builds(
    lambda command, address, userid: Socks4Request(Request(command, address), userid),
    st.sampled_from([Command.CONNECT, Command.BIND]),
    st.one_of(
        ipv4_addresses,
        st.builds(
            Address, st.just(AddressType.DOMAIN), hostnames, st.integers(0, 65535)
        ),
    ),
    st.binary(max_size=MAX_USERID).map(lambda b: b.replace(b"\x00", b"")),
)


@given(socks4_messages, st.binary(max_size=20), st.lists(st.integers(0, 600)))
def test_requests_round_trip_and_wait_for_their_last_byte(
    message: Socks4Request, after: bytes, cuts: List[int]
) -> None:
    wire = message.to_bytes()
    assert parse_request(wire + after) == (message, len(wire))
    for size in range(len(wire)):
        assert parse_request(wire[:size]) is None
    # The machine, fed in any pieces: the request, then early data.
    machine = Socks4Handshake()
    stream = wire + after
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(stream)}), len(stream)]
    events = []
    for a, b in zip(bounds, bounds[1:]):
        machine.receive_data(stream[a:b])
        event = machine.next_event()
        if event is not None:
            events.append(event)
    assert [e.request for e in events] == [message.request]
    assert machine.userid == message.userid
    assert bytes(machine.buffer) == after


@given(
    st.sampled_from(ReplyCode),
    st.builds(Address, st.just(AddressType.IPV4), ipv4s, st.integers(0, 65535)),
)
def test_replies_say_granted_or_rejected(code: ReplyCode, address: Address) -> None:
    wire = reply_bytes(code, address)
    ((sent, back), used) = parse_reply(wire)  # type: ignore[misc]
    assert used == 8 == len(wire)
    assert sent == (0x5A if code is ReplyCode.SUCCEEDED else 0x5B)
    assert back == address
    assert reply_bytes(code, Address.from_host("::1", 80)) == wire[:2] + bytes(6)


def test_metrics_are_labelled_by_protocol() -> None:
    pytest.importorskip("prometheus_client")
    h = Harness(protocols=BOTH)
    metrics = h.factory.enable_metrics()
    h.send(socks4())
    h.connector.succeed()
    h.lose()
    h5 = Harness(protocols=BOTH, connector=h.connector)
    h5.factory.metrics = metrics
    h5.send(b"\x05\x01\x00" + Request(Command.CONNECT, TARGET).to_bytes())
    h.connector.succeed()
    h5.lose()
    text = metrics.render().decode()
    for protocol in ("socks4", "socks5"):
        assert (
            'socks5_connections_total{command="connect",'
            f'protocol="{protocol}",reply="succeeded"}} 1.0'
        ) in text
        assert (
            f'socks5_handshake_seconds_count{{command="connect",protocol="{protocol}"}}'
            " 1.0"
        ) in text


def test_a_policy_that_cannot_be_told_the_protocol_serves_socks5_only() -> None:
    from twisted_socks5.rules import Decision

    class Old:
        """A policy written before --protocols."""

        yes = Decision(True, "old")

        def check_client(self, client: Any) -> Any:
            return self.yes

        def check_request(self, ip: Any, user: Any, command: Any, dest: Any) -> Any:
            return self.yes

        def check_resolved(
            self, ip: Any, user: Any, command: Any, dest: Any, resolved: Any
        ) -> Any:
            return self.yes

    Harness(policy=Old())  # SOCKS5 only: as before
    with pytest.raises(ValueError, match="can serve SOCKS5 only"):
        Harness(policy=Old(), protocols=BOTH)
