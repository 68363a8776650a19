"""
The access log (``--access-log``) driven in memory: one JSON line per
connection for every outcome, escaping, buffering, rotation and reopening,
and a disk that refuses writes.  The files are real files.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List

import pytest
from helpers import CLIENT, SERVER, Harness, UDPReactor
from hypothesis import given
from hypothesis import strategies as st
from test_server import CONNECT, GREET_NOAUTH, GREET_USERPASS, TARGET
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile

from twisted_socks5 import _twisted
from twisted_socks5.accesslog import (
    BUFFER_BYTES,
    FLUSH_INTERVAL,
    AccessLog,
    Rotation,
)
from twisted_socks5.auth import NoAuthAuthenticator, UsernamePasswordAuthenticator
from twisted_socks5.codec import (
    Address,
    AddressType,
    Command,
    ReplyCode,
    Request,
    UserPassRequest,
)
from twisted_socks5.limits import ConnectionLimits
from twisted_socks5.limitstore import MemoryLimitStore
from twisted_socks5.rules import RuleSet
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.testing import HalfCloseTransport

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")

FIELDS = {
    "time",
    "listener",
    "protocol",
    "client",
    "user",
    "command",
    "destination",
    "resolved",
    "bound",
    "outgoing",
    "route",
    "bytes_up",
    "bytes_down",
    "udp",
    "duration",
    "outcome",
    "reply",
    "reply_text",
    "reason",
    "rule",
    "limit",
}


def read_records(path: Path) -> List[Dict[str, Any]]:
    """Every line of the file parsed: plain ASCII, one JSON object each."""
    data = path.read_bytes()
    assert data.endswith(b"\n") or not data
    records = []
    for line in data.split(b"\n")[:-1]:
        assert all(0x20 <= b < 0x7F for b in line), line  # no raw control, ASCII
        record = json.loads(line)
        assert set(record) == FIELDS
        assert STAMP.fullmatch(record["time"])
        records.append(record)
    return records


class Logged:
    """A harness whose server writes an access log to a real file."""

    def __init__(self, tmp_path: Path, **kw: Any) -> None:
        self.path = tmp_path / "access.log"
        self.log = AccessLog.open(str(self.path), Clock())
        self.kw = kw
        self.harnesses: List[Harness] = []

    def connection(self) -> Harness:
        h = Harness(access_log=self.log, **self.kw)
        self.log.reactor = h.reactor
        self.harnesses.append(h)
        return h

    def records(self) -> List[Dict[str, Any]]:
        self.log.flush()
        return read_records(self.path)

    def one(self, h: Harness) -> Dict[str, Any]:
        if not h.transport.disconnected:
            h.lose()
        (record,) = self.records()
        return record


def userpass(**users: bytes) -> UsernamePasswordAuthenticator:
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    checker.users = {k.encode(): v for k, v in users.items()}
    return UsernamePasswordAuthenticator.from_checkers(checker)


# --------------------------------------------------------------------------
# One record per outcome


def test_a_finished_connect_tunnel(tmp_path: Path) -> None:
    logged = Logged(tmp_path)
    h = logged.connection()
    h.send(GREET_NOAUTH + CONNECT + b"early")
    outbound, _ = h.connector.succeed()
    outbound.dataReceived(b"answer!")
    record = logged.one(h)
    assert record["outcome"] == "success"
    assert record["reply"] == 0 and record["reply_text"] == "succeeded"
    assert record["listener"] == "127.0.0.1:1080"
    assert record["protocol"] == "socks5"
    assert record["client"] == "127.0.0.1:40000"
    assert record["user"] is None
    assert record["command"] == "connect"
    assert record["destination"] == "127.0.0.1:8080"
    assert record["resolved"] == "127.0.0.1:8080"
    assert record["bound"] == "127.0.0.1:50000"
    assert record["route"] == "default"
    assert (record["bytes_up"], record["bytes_down"]) == (5, 7)
    assert record["rule"] is None and record["limit"] is None


def test_rules_denial_names_the_rule(tmp_path: Path) -> None:
    rules = RuleSet.parse("deny to 127.0.0.1/32 port 8080\ndefault allow\n", "t")
    logged = Logged(tmp_path, policy=rules)
    h = logged.connection()
    h.send(GREET_NOAUTH + CONNECT)
    record = logged.one(h)
    assert record["outcome"] == "refused"
    assert record["reply"] == ReplyCode.CONNECTION_NOT_ALLOWED
    assert record["rule"] == "t:1: deny to 127.0.0.1/32 port 8080"


def test_failed_login_and_no_acceptable_method_are_refusals(tmp_path: Path) -> None:
    logged = Logged(tmp_path, authenticators=[userpass(alice=b"pw")])
    h = logged.connection()
    h.send(GREET_USERPASS + UserPassRequest(b"alice", b"wrong").to_bytes())
    h.lose()
    h = logged.connection()
    h.send(GREET_NOAUTH)  # only 0x02 is offered
    h.lose()
    failed, no_method = logged.records()
    assert failed["outcome"] == "refused" and failed["reply"] is None
    assert failed["reason"] == "authentication failed"
    assert failed["user"] == "alice"
    assert no_method["outcome"] == "refused"
    assert no_method["reason"].startswith("no acceptable")


def test_command_not_served(tmp_path: Path) -> None:
    logged = Logged(tmp_path, commands=[Command.CONNECT])
    h = logged.connection()
    h.send(GREET_NOAUTH + Request(Command.BIND, TARGET).to_bytes())
    record = logged.one(h)
    assert (record["outcome"], record["reply"]) == ("refused", 7)
    assert record["command"] == "bind"


@pytest.mark.parametrize(
    "exception, code",
    [
        (error.ConnectionRefusedError(), ReplyCode.CONNECTION_REFUSED),
        (error.DNSLookupError("nowhere"), ReplyCode.HOST_UNREACHABLE),
        (error.TimeoutError(), ReplyCode.TTL_EXPIRED),
    ],
    ids=["refused", "unreachable", "timeout"],
)
def test_connect_errors(tmp_path: Path, exception: Exception, code: ReplyCode) -> None:
    logged = Logged(tmp_path)
    h = logged.connection()
    h.send(GREET_NOAUTH + CONNECT)
    h.connector.fail(exception)
    record = logged.one(h)
    assert (record["outcome"], record["reply"]) == ("error", code)
    assert record["reason"].startswith("connect failed")
    assert record["resolved"] is None


def test_timeouts_on_the_clock(tmp_path: Path) -> None:
    logged = Logged(tmp_path, handshake_timeout=5.0, bind_timeout=7.0)
    silent = logged.connection()
    silent.reactor.advance(5.0)
    silent.lose()
    binding = logged.connection()
    binding.send(GREET_NOAUTH + Request(Command.BIND, TARGET).to_bytes())
    binding.reactor.advance(7.0)
    binding.lose()
    handshake, bind = logged.records()
    assert handshake["outcome"] == "error" and handshake["reply"] is None
    assert handshake["reason"].startswith("handshake timeout")
    assert bind["outcome"] == "error" and bind["reply"] == ReplyCode.TTL_EXPIRED
    assert bind["duration"] == 7.0


def test_udp_association(tmp_path: Path) -> None:
    logged = Logged(tmp_path)
    h = logged.connection()
    h.send(GREET_NOAUTH + Request(Command.UDP_ASSOCIATE, TARGET).to_bytes())
    record = logged.one(h)
    assert record["outcome"] == "success" and record["command"] == "udp associate"
    assert record["udp"]["datagrams_up"] == 0


def test_another_protocol_is_named(tmp_path: Path) -> None:
    logged = Logged(tmp_path, protocols=("socks5", "socks4"))
    h = logged.connection()
    h.send(b"\x04\x01\x00\x50\x7f\x00\x00\x01bob\x00")
    h.connector.fail(error.ConnectionRefusedError())
    record = logged.one(h)
    assert record["protocol"] == "socks4"


def test_http_requests_are_recorded_as_http(tmp_path: Path) -> None:
    logged = Logged(tmp_path, protocols=("socks5", "http"), protect_host=None)
    h = logged.connection()
    h.send(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\nHost: x\r\n\r\n")
    h.connector.succeed()
    record = logged.one(h)
    assert record["protocol"] == "http"
    assert record["command"] == "connect" and record["outcome"] == "success"
    assert record["destination"] == "127.0.0.1:8080"


def test_a_limit_line_that_refused_is_named(tmp_path: Path) -> None:
    rules = RuleSet.parse("limit from 127.0.0.0/8 sessions 1\nallow")
    logged = Logged(tmp_path, policy=rules, protect_host=None)
    first = logged.connection()
    first.factory.enable_limits(MemoryLimitStore(first.reactor)).start()
    first.send(GREET_NOAUTH + CONNECT)
    second = first.factory.buildProtocol(CLIENT)
    transport = HalfCloseTransport(SERVER, CLIENT)
    second.makeConnection(transport)
    second.dataReceived(GREET_NOAUTH + CONNECT)
    transport.disconnected = True
    second.connectionLost(Failure(error.ConnectionDone()))
    (record,) = logged.records()
    assert record["outcome"] == "refused" and record["reply"] == 2
    assert record["rule"] is None
    assert "limit from 127.0.0.0/8 sessions 1 (1 open)" in record["limit"]


HOSTILE = [
    "evil\nname.test",
    'q"uote\\d.test',
    "esc\x1b[31m.test",
    "rtl\u202egnp.test",
    "caf\u00e9.test",
    "-",
]


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_and_users_stay_one_escaped_line(
    tmp_path: Path, name: str
) -> None:
    user = name.encode("utf-8")[:40] + b"\x00\xff\xfe"
    logged = Logged(
        tmp_path, authenticators=[userpass(**{"x": b"pw"}), NoAuthAuthenticator()]
    )
    h = logged.connection()
    h.send(GREET_USERPASS + UserPassRequest(user, b"pw").to_bytes())
    h.lose()
    h = logged.connection()
    request = Request(Command.CONNECT, Address(AddressType.DOMAIN, name, 80))
    h.send(GREET_NOAUTH + request.to_bytes())
    h.connector.fail(error.DNSLookupError(name))
    h.lose()
    login, connect = logged.records()  # each line parses (read_records checks)
    assert logged.path.read_bytes().count(b"\n") == 2
    assert login["user"] is not None and "\n" not in login["user"]
    destination = connect["destination"]
    for raw in ("\n", "\x1b", "\u202e"):
        assert raw not in destination
    assert "\x00" not in login["user"] and "\ufffd" not in login["user"]
    assert destination.endswith(":80")


# --------------------------------------------------------------------------
# Nothing when not enabled


def test_without_an_access_log_nothing_is_noted() -> None:
    h = Harness()
    h.send(GREET_NOAUTH + CONNECT)
    h.connector.succeed()
    assert h.protocol.listener is None
    assert h.protocol.resolved is None  # no getPeer per connection
    h.lose()


# --------------------------------------------------------------------------
# Buffering and write failures


class Lines:
    def __init__(self, path: Path, reactor: Any = None) -> None:
        self.path = path
        self.log = AccessLog.open(str(path), reactor)

    def add(self, n: int, size: int = 10) -> None:
        for i in range(n):
            self.log.write({"n": i, "pad": "x" * size})


def test_lines_wait_for_the_timer_or_a_full_buffer(tmp_path: Path) -> None:
    clock = Clock()
    lines = Lines(tmp_path / "a.log", clock)
    lines.add(3)
    assert lines.path.read_bytes() == b""
    clock.advance(FLUSH_INTERVAL)
    assert len(read_plain(lines.path)) == 3
    lines.add(BUFFER_BYTES // 100 + 1, size=100)  # past the buffer: at once
    assert len(read_plain(lines.path)) > 3
    assert not clock.getDelayedCalls() or len(clock.getDelayedCalls()) == 1


def read_plain(path: Path) -> List[Any]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_full_disk_is_said_once_and_never_raises(events: Any) -> None:
    log = AccessLog(LogFile.fromFullPath("/dev/full"), Clock())
    for _ in range(3):
        log.write({"x": 1})
        log.flush()  # ENOSPC every time
    failures = [e for e in events if e.get("event") == "socks5.access_log_failed"]
    assert len(failures) == 1
    assert "No space left" in failures[0]["error"]
    assert log.dropped == 3


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_a_failing_access_log_does_not_stop_the_server(events: Any) -> None:
    h = Harness(access_log=AccessLog(LogFile.fromFullPath("/dev/full"), None))
    h.factory.access_log.reactor = h.reactor  # type: ignore[union-attr]
    h.send(GREET_NOAUTH + CONNECT)
    h.connector.succeed()
    h.lose()
    h.factory.access_log.flush()  # type: ignore[union-attr]
    assert not h.factory.active
    assert [e for e in events if e.get("event") == "socks5.connection"]


# --------------------------------------------------------------------------
# Rotation and reopening


@given(st.text(max_size=30))
def test_rotation_specs_parse_or_say_why(spec: str) -> None:
    try:
        rotation = Rotation(spec)
    except ValueError:
        return
    assert rotation.kind in ("none", "daily", "size")
    assert (rotation.size is not None) == (rotation.kind == "size")


@given(st.integers(1, 1 << 20), st.sampled_from(["", "K", "M", "G"]))
def test_size_units(number: int, unit: str) -> None:
    factor = {"": 1, "K": 1024, "M": 1 << 20, "G": 1 << 30}[unit]
    assert Rotation(f"size:{number}{unit}").size == number * factor
    assert Rotation(f"size:{number}{unit.lower()}:3").keep == 3


@pytest.mark.parametrize("bad", ["size", "size:0", "size:1X", "weekly", "daily:2"])
def test_bad_rotation_specs(bad: str) -> None:
    with pytest.raises(ValueError):
        Rotation(bad)


def test_size_rotation_keeps_the_count_asked(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AccessLog.open(str(path), Clock(), Rotation("size:300:2"))
    for i in range(40):
        log.write({"n": i, "pad": "x" * 50})
        log.flush()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.log", "a.log.1", "a.log.2"]
    for name in ("a.log", "a.log.1", "a.log.2"):
        assert read_plain(tmp_path / name)


def test_moved_then_reopened_writes_a_new_file(tmp_path: Path) -> None:
    """logrotate's ``create`` mode: move the file, then SIGUSR1 (reopen)."""
    path = tmp_path / "a.log"
    log = AccessLog.open(str(path), Clock())
    log.write({"n": 1})
    log.flush()
    path.rename(tmp_path / "a.log.1")
    log.write({"n": 2})  # buffered when the signal comes
    log.reopen()
    assert path.exists()
    log.write({"n": 3})
    log.flush()
    assert read_plain(tmp_path / "a.log.1") == [{"n": 1}]
    assert read_plain(path) == [{"n": 2}, {"n": 3}]


def test_copytruncate_leaves_no_hole(tmp_path: Path) -> None:
    """logrotate's ``copytruncate``: copy, truncate in place, no signal."""
    path = tmp_path / "a.log"
    log = AccessLog.open(str(path), Clock(), Rotation("size:1M"))
    for i in range(5):
        log.write({"n": i})
    log.flush()
    shutil.copyfile(path, tmp_path / "a.log.1")
    os.truncate(path, 0)
    log.write({"n": 5})
    log.flush()
    assert path.read_bytes() == b'{"n":5}\n'  # no NULs where the old lines were
    assert len(read_plain(tmp_path / "a.log.1")) == 5
    log.close()


def test_log_files_are_append_only(tmp_path: Path) -> None:
    """Two writers (two --workers) on one file never overwrite each other."""
    path = tmp_path / "a.log"
    first = AccessLog.open(str(path), Clock())
    second = AccessLog.open(str(path), Clock())
    first.write({"w": 1})
    first.flush()
    second.write({"w": 2})
    second.flush()
    first.write({"w": 1})
    first.flush()
    assert read_plain(path) == [{"w": 1}, {"w": 2}, {"w": 1}]


def test_log_file_internals_are_there(tmp_path: Path) -> None:
    """The canary for the LogFile attributes ``_twisted.append_only`` uses."""
    logfile = LogFile.fromFullPath(str(tmp_path / "c.log"))
    for name in _twisted.LOGFILE_ATTRIBUTES:
        assert hasattr(logfile, name), (
            f"Twisted's LogFile lost {name!r}: update twisted_socks5/_twisted.py"
        )
    assert _twisted.append_only(logfile)
    logfile.close()


def test_closed_is_closed(tmp_path: Path) -> None:
    lines = Lines(tmp_path / "a.log", Clock())
    lines.add(2)
    lines.log.close()
    lines.log.close()
    lines.add(1)  # a connection that ends after shutdown: dropped, no error
    assert len(read_plain(lines.path)) == 2
    assert lines.log.dropped == 1


# --------------------------------------------------------------------------
# Clients refused at accept, before any SOCKS byte


def test_a_client_the_rules_refuse_at_accept(tmp_path: Path) -> None:
    rules = RuleSet.parse("deny from 127.0.0.0/8\ndefault allow\n", "t")
    logged = Logged(tmp_path, policy=rules)
    h = logged.connection()
    assert h.transport.disconnecting or h.transport.disconnected
    (record,) = logged.records()
    assert record["outcome"] == "refused" and record["reply"] is None
    assert record["client"] == "127.0.0.1"
    assert record["rule"] == "t:1: deny from 127.0.0.0/8"
    assert record["limit"] is None


def test_a_client_over_its_connection_limit(tmp_path: Path) -> None:
    log = AccessLog.open(str(tmp_path / "a.log"), Clock())
    reactor = UDPReactor()
    factory = SOCKS5ServerFactory(
        reactor=reactor,
        access_log=log,
        limits=ConnectionLimits(reactor.seconds, max_per_client=1),
    )
    for port in (40000, 40001):
        protocol = factory.buildProtocol(CLIENT)
        peer = IPv4Address("TCP", "127.0.0.1", port)
        protocol.makeConnection(HalfCloseTransport(SERVER, peer))
    log.flush()
    (record,) = read_records(tmp_path / "a.log")
    assert record["outcome"] == "refused" and record["limit"] == "client_limit"
    assert record["reason"] == "refused: 1 connections already"
