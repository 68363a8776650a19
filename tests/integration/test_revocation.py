"""
Revocation on loopback: a reload closes exactly the tunnels, UDP
associations and BIND waits the new password file or rules no longer allow,
and says so in the access log.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any, Dict, List, Optional

import bcrypt
import pytest_twisted
from conftest import Echo, until
from test_bind_udp import associate, control, udp_ports  # noqa: F401 - fixture
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

from twisted_socks5.accesslog import AccessLog
from twisted_socks5.auth import UsernamePasswordAuthenticator
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UserPassRequest,
    parse_reply,
)
from twisted_socks5.htpasswd import HashPool, HtpasswdChecker
from twisted_socks5.revocation import revoke
from twisted_socks5.rules import RulesFile
from twisted_socks5.tap import install_reload_signal


class Client(protocol.Protocol):
    """A SOCKS5 client that opens one tunnel and keeps it."""

    def __init__(self, user: Optional[bytes], request: Request) -> None:
        self.user = user
        self.request = request
        self.buffer = b""
        self.data = b""
        self.reply: defer.Deferred[Any] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        if self.user is None:
            self.transport.write(b"\x05\x01\x00" + self.request.to_bytes())
        else:
            login = UserPassRequest(self.user, b"pw-" + self.user).to_bytes()
            self.transport.write(b"\x05\x01\x02" + login + self.request.to_bytes())

    def dataReceived(self, data: bytes) -> None:
        if self.reply.called:
            self.data += data
            return
        self.buffer += data
        skip = 2 if self.user is None else 4
        parsed = parse_reply(self.buffer[skip:])
        if parsed is not None:
            reply, used = parsed
            self.data = self.buffer[skip + used :]
            self.reply.callback(reply)

    def connectionLost(self, reason: Any) -> None:
        if not self.reply.called:
            self.reply.errback(reason)
        self.closed.callback(None)

    @property
    def open(self) -> bool:
        return not self.closed.called

    async def echoes(self) -> bool:
        self.data = b""
        self.transport.write(b"ping")
        await until(lambda: self.data == b"ping" or not self.open, "an echo")
        return self.data == b"ping"


async def tunnel(
    port: int,
    target: int,
    user: Optional[bytes] = None,
    host: str = "127.0.0.1",
    atyp: AddressType = AddressType.IPV4,
) -> Client:
    client = Client(user, Request(Command.CONNECT, Address(atyp, host, target)))
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    reply = await client.reply.addTimeout(20, reactor)
    assert reply.reply is ReplyCode.SUCCEEDED
    return client


def htpasswd(path: Path, **users: bytes) -> None:
    path.write_bytes(
        b"".join(
            name.encode() + b":" + bcrypt.hashpw(pw, bcrypt.gensalt(4)) + b"\n"
            for name, pw in users.items()
        )
    )


def records(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest_twisted.ensureDeferred
async def test_sighup_closes_only_the_removed_users_tunnels(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.htpasswd"
    htpasswd(users, alice=b"pw-alice", bob=b"pw-bob")
    alice_line = users.read_bytes().splitlines()[0]
    pool = HashPool(reactor)
    checker = HtpasswdChecker(str(users), pool=pool)
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    access = AccessLog.open(str(tmp_path / "access.log"), reactor)
    factory, port = make_proxy(authenticators=[auth], access_log=access)
    target = tcp_target(Echo)
    previous = signal.getsignal(signal.SIGHUP)
    try:
        alices = [await tunnel(port, target, b"alice") for _ in range(2)]
        bobs = [await tunnel(port, target, b"bob") for _ in range(2)]
        users.write_bytes(alice_line + b"\n")  # bob removed, alice as she was
        install_reload_signal(factory)
        os.kill(os.getpid(), signal.SIGHUP)
        await defer.gatherResults([b.closed for b in bobs]).addTimeout(30, reactor)
        assert all([await a.echoes() for a in alices])
    finally:
        signal.signal(signal.SIGHUP, previous)
        pool.stop()
    access.flush()
    revoked = [r for r in records(tmp_path / "access.log") if r["outcome"] == "revoked"]
    assert [r["user"] for r in revoked] == ["bob", "bob"]
    assert {r["reason"] for r in revoked} == {
        "revoked: user removed from the password file"
    }


@pytest_twisted.ensureDeferred
async def test_a_changed_password_entry_closes_that_users_tunnels(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.htpasswd"
    htpasswd(users, alice=b"pw-alice", bob=b"pw-bob")
    bob_line = users.read_bytes().splitlines()[1]
    pool = HashPool(reactor)
    checker = HtpasswdChecker(str(users), pool=pool)
    auth = UsernamePasswordAuthenticator.from_checkers(checker)
    factory, port = make_proxy(authenticators=[auth])
    target = tcp_target(Echo)
    try:
        alices = [await tunnel(port, target, b"alice") for _ in range(2)]
        bobs = [await tunnel(port, target, b"bob") for _ in range(2)]
        # alice's password changed (here: the same one, newly salted).
        htpasswd(users, alice=b"pw-alice")
        users.write_bytes(users.read_bytes() + bob_line + b"\n")
        assert await factory.reload() == 2
        await defer.gatherResults([a.closed for a in alices]).addTimeout(30, reactor)
        assert all([await b.echoes() for b in bobs])
        # Her new login works, and is kept by the next reload.
        again = await tunnel(port, target, b"alice")
        assert await factory.reload() == 0
        assert await again.echoes()
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_new_rules_close_only_the_tunnels_they_deny(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.write_text("default allow\n")
    access = AccessLog.open(str(tmp_path / "access.log"), reactor)
    factory, port = make_proxy(policy=RulesFile(str(rules)), access_log=access)
    denied, kept = tcp_target(Echo), tcp_target(Echo)
    by_ip = await tunnel(port, denied)
    by_name = await tunnel(port, denied, host="localhost", atyp=AddressType.DOMAIN)
    others = [
        await tunnel(port, kept),
        await tunnel(port, kept, host="localhost", atyp=AddressType.DOMAIN),
    ]
    rules.write_text(f"deny to 127.0.0.1/32, ::1/128 port {denied}\ndefault allow\n")
    assert await factory.reload() == 2
    await defer.gatherResults([by_ip.closed, by_name.closed]).addTimeout(30, reactor)
    assert all([await t.echoes() for t in others])
    access.flush()
    revoked = [r for r in records(tmp_path / "access.log") if r["outcome"] == "revoked"]
    assert len(revoked) == 2
    assert {r["destination"] for r in revoked} == {
        f"127.0.0.1:{denied}",
        f"localhost:{denied}",
    }
    assert all(r["reason"].startswith("revoked: denied by ") for r in revoked)


@pytest_twisted.ensureDeferred
async def test_keep_tunnels_on_reload_keeps_them_all(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    users = tmp_path / "users.htpasswd"
    htpasswd(users, alice=b"pw-alice", bob=b"pw-bob")
    rules = tmp_path / "rules"
    rules.write_text("default allow\n")
    pool = HashPool(reactor)
    auth = UsernamePasswordAuthenticator.from_checkers(
        HtpasswdChecker(str(users), pool=pool)
    )
    factory, port = make_proxy(
        authenticators=[auth], policy=RulesFile(str(rules)), revoke_on_reload=False
    )
    target = tcp_target(Echo)
    try:
        tunnels = [await tunnel(port, target, name) for name in (b"alice", b"bob")]
        htpasswd(users, carol=b"pw-carol")
        rules.write_text("default deny\n")
        assert await factory.reload() == 0
        assert all([await t.echoes() for t in tunnels])
    finally:
        pool.stop()


@pytest_twisted.ensureDeferred
async def test_udp_associations_and_bind_waits_are_revoked_too(
    make_proxy: Any,
    tcp_target: Any,
    tmp_path: Path,
    udp_ports: Any,  # noqa: F811
) -> None:
    rules = tmp_path / "rules"
    rules.write_text("default allow\n")
    factory, port = make_proxy(policy=RulesFile(str(rules)))
    association, _, _ = await associate(port, udp_ports)
    waiting = await control(
        port, "127.0.0.1", Request(Command.BIND, Address.from_host("127.0.0.1", 0))
    )
    first = await waiting.reply(1)
    kept = await tunnel(port, tcp_target(Echo))
    rules.write_text("deny command udp\ndeny command bind\ndefault allow\n")
    assert await factory.reload() == 2
    await defer.gatherResults([association.closed, waiting.closed]).addTimeout(
        30, reactor
    )
    assert await kept.echoes()
    # The BIND port is closed with its wait.
    failed = connectProtocol(
        TCP4ClientEndpoint(reactor, "127.0.0.1", first.address.port),
        protocol.Protocol(),
    )
    try:
        await failed
    except error.ConnectionRefusedError:
        pass
    else:  # pragma: no cover
        raise AssertionError("the revoked BIND still listens")


@pytest_twisted.ensureDeferred
async def test_revoke_closes_one_connection(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    """What the console's close button calls."""
    access = AccessLog.open(str(tmp_path / "access.log"), reactor)
    factory, port = make_proxy(access_log=access)
    target = tcp_target(Echo)
    first, second = await tunnel(port, target), await tunnel(port, target)
    await until(lambda: len(factory.active) == 2, "both tunnels counted")
    (one,) = [
        c for c in factory.active if c.client.port == first.transport.getHost().port
    ]
    assert revoke(one, "closed from the console")
    assert not revoke(one, "twice")
    await first.closed.addTimeout(30, reactor)
    assert await second.echoes()
    access.flush()
    (record,) = records(tmp_path / "access.log")
    assert record["outcome"] == "revoked"
    assert record["reason"] == "revoked: closed from the console"
