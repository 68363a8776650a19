"""
The reload-time sweep driven in memory: slices on the clock, which
connections it looks at, and fingerprints that never hold a password.
"""

from __future__ import annotations

from typing import Any, List, Tuple

from helpers import CLIENT, SERVER, FakeConnector, UDPReactor
from test_server import CONNECT, GREET_NOAUTH
from twisted.cred.checkers import (
    FilePasswordDB,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.internet.address import IPv4Address

from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import Address, AddressType, Command, Request
from twisted_socks5.revocation import Credentials, sweep
from twisted_socks5.rules import RuleSet
from twisted_socks5.server import SOCKS5ServerFactory, State
from twisted_socks5.testing import HalfCloseTransport


def server(**kw: Any) -> Tuple[SOCKS5ServerFactory, FakeConnector]:
    connector = FakeConnector()
    factory = SOCKS5ServerFactory(reactor=UDPReactor(), connector=connector, **kw)
    return factory, connector


def tunnels(
    factory: Any, connector: FakeConnector, count: int, data: bytes
) -> List[Any]:
    opened = []
    for i in range(count):
        protocol = factory.buildProtocol(CLIENT)
        peer = IPv4Address("TCP", "127.0.0.1", 40000 + i)
        protocol.makeConnection(HalfCloseTransport(SERVER, peer))
        protocol.dataReceived(GREET_NOAUTH + data)
        connector.succeed()
        opened.append(protocol)
    return opened


def next_slice(reactor: Any) -> None:
    """Run the sweep's next slice, scheduled for the next reactor turn."""
    (call,) = [
        c
        for c in reactor.getDelayedCalls()
        if c.func.__module__ == "twisted_socks5.revocation"
    ]
    assert call.getTime() == reactor.seconds()
    func, args = call.func, call.args
    call.cancel()  # (which forgets them)
    func(*args)


def test_the_sweep_runs_in_slices_on_later_turns() -> None:
    factory, connector = server(policy=RuleSet.parse("default allow\n"))
    opened = tunnels(factory, connector, 5, CONNECT)
    assert all(p.state is State.RELAYING for p in opened)
    factory.policy = RuleSet.parse("default deny\n", "new")
    done = sweep(factory, slice_size=2, slice_seconds=float("inf"))
    assert sum(p.transport.aborted for p in opened) == 2 and not done.called
    next_slice(factory.reactor)
    assert sum(p.transport.aborted for p in opened) == 4 and not done.called
    next_slice(factory.reactor)
    assert all(p.transport.aborted for p in opened)
    assert done.result == 5
    assert {p.revoked for p in opened} == {"denied by new:1: default deny"}


def test_connections_still_in_the_handshake_or_connecting_are_left() -> None:
    factory, connector = server(policy=RuleSet.parse("default allow\n"))
    greeting = factory.buildProtocol(CLIENT)
    greeting.makeConnection(HalfCloseTransport(SERVER, CLIENT))
    connecting = factory.buildProtocol(CLIENT)
    connecting.makeConnection(HalfCloseTransport(SERVER, CLIENT))
    connecting.dataReceived(GREET_NOAUTH + CONNECT)
    factory.policy = RuleSet.parse("default deny\n")
    assert sweep(factory).result == 0
    assert not greeting.transport.aborted and not connecting.transport.aborted


def test_a_name_is_judged_by_the_address_it_reached_without_a_lookup() -> None:
    factory, connector = server()  # no rules yet: the connector resolves
    name = Request(Command.CONNECT, Address(AddressType.DOMAIN, "db.test", 5432))
    (by_name,) = tunnels(factory, connector, 1, name.to_bytes())
    assert connector.lookups == []  # the connector resolved it (FakeConnector)
    # Its peer, the address the tunnel reached, is 127.0.0.1:8080 (helpers.TARGET).
    factory.policy = RuleSet.parse("deny to 127.0.0.1/32\ndefault allow\n", "r")
    assert sweep(factory).result == 1
    assert by_name.revoked == "denied by r:1: deny to 127.0.0.1/32"
    assert connector.lookups == []  # and no look-up now either


def test_fingerprints_are_keyed_and_follow_the_entries(tmp_path: Any) -> None:
    memory = InMemoryUsernamePasswordDatabaseDontUse()
    memory.users = {b"alice": b"secret"}
    passwd = tmp_path / "passwd"
    passwd.write_bytes(b"Bob:hunter2\nbob:second-line-ignored\n")
    file_db = FilePasswordDB(str(passwd), caseSensitive=False)
    auths = [
        UsernamePasswordAuthenticator.from_checkers(memory),
        UsernamePasswordAuthenticator.from_checkers(file_db),
    ]
    credentials = Credentials.of(auths)
    assert credentials is not None
    alice = credentials.fingerprint("alice")
    assert alice is not None and b"secret" not in alice
    assert alice != credentials.fingerprint("BOB") == credentials.fingerprint("bob")
    assert credentials.fingerprint("mallory") is None
    assert credentials.current()("alice") == alice
    bob = credentials.current()("Bob")
    memory.users[b"alice"] = b"changed"
    passwd.write_bytes(b"bob:hunter3\n")
    now = credentials.current()
    assert now("alice") not in (None, alice)
    assert now("bob") not in (None, bob)


def test_credentials_of_a_server_without_password_files() -> None:
    assert Credentials.of([]) is None
    factory, _ = server()
    assert factory.credentials is None  # nothing per login


def test_socks4_and_http_tunnels_are_judged_as_they_asked() -> None:
    # Allowed only by rules that name their protocol (and, for SOCKS4 on a
    # server that wants passwords, its networks): a reload with the same
    # rules must keep them, one naming only SOCKS5 must close them.
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
    rules = "allow from 127.0.0.0/8 protocol socks4, http\ndefault deny\n"
    factory, connector = server(
        policy=RuleSet.parse(rules),
        protocols=("socks5", "socks4", "http"),
        authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)],
        protect_host=None,
    )
    opened = []
    for i, data in enumerate(
        (
            b"\x04\x01\x1f\x90\x7f\x00\x00\x01bob\x00",
            b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\n"
            b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n",
        )
    ):
        protocol = factory.buildProtocol(CLIENT)
        peer = IPv4Address("TCP", "127.0.0.1", 41000 + i)
        protocol.makeConnection(HalfCloseTransport(SERVER, peer))
        protocol.dataReceived(data)
        connector.succeed()
        assert protocol.state is State.RELAYING, protocol.outcome
        opened.append(protocol)
    factory.policy = RuleSet.parse(rules, "same")
    assert sweep(factory).result == 0
    factory.policy = RuleSet.parse(
        "allow from 127.0.0.0/8 protocol socks5\ndefault deny\n", "socks5-only"
    )
    assert sweep(factory).result == 2
    assert all(p.transport.aborted for p in opened)


def test_http_logins_are_revoked_when_the_user_is_removed() -> None:
    # A CONNECT tunnel and an idle keep-alive connection that logged in with
    # Proxy-Authorization: both held alice's login past her removal, and the
    # keep-alive one served her next request without checking it again.
    checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"pw")
    factory, connector = server(
        protocols=("socks5", "http"),
        authenticators=[UsernamePasswordAuthenticator.from_checkers(checker)],
        protect_host=None,
    )
    auth = b"Proxy-Authorization: Basic YWxpY2U6cHc=\r\n\r\n"
    opened = []
    for i, head in enumerate(
        (
            b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\n",
            b"GET http://127.0.0.1:8080/ HTTP/1.1\r\nHost: a\r\n",
        )
    ):
        protocol = factory.buildProtocol(CLIENT)
        peer = IPv4Address("TCP", "127.0.0.1", 42000 + i)
        protocol.makeConnection(HalfCloseTransport(SERVER, peer))
        protocol.dataReceived(head + auth)
        origin, _ = connector.succeed()
        opened.append(protocol)
    origin.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    tunnel, idle = opened
    assert tunnel.state is State.RELAYING and idle.state is State.REQUEST
    assert b" 204 " in idle.transport.value()
    del checker.users[b"alice"]
    assert sweep(factory).result == 2
    assert all(p.transport.aborted for p in opened)
    assert idle.revoked == "user removed from the password file"
