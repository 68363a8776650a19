"""
The attack phase of the stress run: what a hostile client tries against
``twistd socks5``, each played against the real process on loopback.

- ``flood``: one address floods bad logins at a bcrypt htpasswd file while
  another logs in and CONNECTs by name (``login_flood.py``); the other
  client's latency is the figure, its success the check.
- ``throttle``: one address opens many connections first, then sends wrong
  passwords on all of them at once, then the right password on one more
  connection it already holds: that login must be refused (the throttle
  counts failures as they happen, not only at accept); a fresh connection
  from that address is closed at accept; another address still logs in.
- ``self``: a server listening beyond loopback (on 0.0.0.0, reached here
  through its 127.0.0.1 listener) refuses every spelling of the proxy host
  as a destination (loopback, unspecified, IPv4-mapped, numeric names)
  with REP 0x02, while the same CONNECT through a loopback-only server
  reaches the echo server (so the refusal is the protection, not a dead
  destination).

Loopback only; names are numeric or ``localhost`` (no DNS).  Durations and
latencies are reported, never checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import login_flood
from procs import Twistd

USER, PASSWORD = b"alice", b"s3cret"
THROTTLER = "127.0.0.3"
BYSTANDER = "127.0.0.4"

#: Spellings of the proxy host as a destination: (label, ATYP + address).
SELF_DESTINATIONS: List[Tuple[str, bytes]] = [
    ("127.0.0.1", b"\x01\x7f\x00\x00\x01"),
    ("127.0.0.2", b"\x01\x7f\x00\x00\x02"),
    ("0.0.0.0", b"\x01\x00\x00\x00\x00"),
    ("0.1.2.3", b"\x01\x00\x01\x02\x03"),
    ("::1", b"\x04" + bytes(15) + b"\x01"),
    ("::", b"\x04" + bytes(16)),
    ("::ffff:127.0.0.1", b"\x04" + bytes(10) + b"\xff\xff\x7f\x00\x00\x01"),
    ("::ffff:0.0.0.0", b"\x04" + bytes(10) + b"\xff\xff" + bytes(4)),
    *(
        (f"name {name}", b"\x03" + bytes((len(name),)) + name.encode())
        for name in ("localhost", "0", "0x0", "0.0.0.0", "127.1")
    ),
]


@dataclass
class AttackConfig:
    flood_seconds: float = 10.0
    flood: int = 100
    flood_cost: int = 10
    probes: int = 20
    #: Connections the throttle attacker holds open before it sends passwords.
    held: int = 60
    auth_failures: int = 5


async def _connect(
    port: int, source: str = "127.0.0.1"
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 30
    )


async def _greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(b"\x05\x01\x02")
    return await asyncio.wait_for(reader.readexactly(2), 30)


def _userpass(user: bytes, password: bytes) -> bytes:
    return b"\x01" + bytes((len(user),)) + user + bytes((len(password),)) + password


async def _status(reader: asyncio.StreamReader) -> str:
    """The RFC 1929 status, or ``closed`` when the server closed instead."""
    try:
        answer = await asyncio.wait_for(reader.readexactly(2), 30)
    except (asyncio.IncompleteReadError, ConnectionError):
        return "closed"
    return "granted" if answer == b"\x01\x00" else f"refused {answer.hex()}"


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def throttle(workdir: Path, config: AttackConfig) -> Dict[str, Any]:
    server = Twistd(workdir, "attack-throttle")
    await server.start(
        [
            "--auth",
            f"memory:{USER.decode()}:{PASSWORD.decode()}",
            "--auth-failures",
            str(config.auth_failures),
            "--max-connections",
            "0",
            "--max-connections-per-client",
            "0",
        ]
    )
    held: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for _ in range(config.held + 1):
            reader, writer = await _connect(server.port, THROTTLER)
            if await _greet(reader, writer) != b"\x05\x02":
                raise RuntimeError("the server did not select username/password")
            held.append((reader, writer))
        last = held.pop()
        for _, writer in held:
            writer.write(_userpass(USER, b"wrong"))
        wrong = await asyncio.gather(*(_status(reader) for reader, _ in held))
        last[1].write(_userpass(USER, PASSWORD))
        right_after = await _status(last[0])
        fresh = "closed"
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            reader, writer = await _connect(server.port, THROTTLER)
            writer.write(b"\x05\x01\x02")
            try:
                got = await asyncio.wait_for(reader.read(2), 30)
                fresh = "closed" if not got else f"answered {got.hex()}"
            except ConnectionError:
                fresh = "closed"
            _close(writer)
        reader, writer = await _connect(server.port, BYSTANDER)
        await _greet(reader, writer)
        writer.write(_userpass(USER, PASSWORD))
        bystander = await _status(reader)
        _close(writer)
    finally:
        for _, writer in held:
            _close(writer)
        await server.stop()
    outcomes: Dict[str, int] = {}
    for status in wrong:
        outcomes[status] = outcomes.get(status, 0) + 1
    checks = {
        "no wrong password granted": "granted" not in outcomes,
        "right password on a held connection refused": right_after != "granted",
        "fresh connection from the address closed": fresh == "closed",
        "another address still logs in": bystander == "granted",
    }
    return {
        "held": config.held,
        "auth_failures": config.auth_failures,
        "wrong_password_outcomes": outcomes,
        "right_password_after": right_after,
        "fresh_connection": fresh,
        "bystander": bystander,
        "checks": checks,
        "ok": all(checks.values()),
    }


async def _connect_status(
    port: int, destination: bytes, echo_port: int
) -> Tuple[str, Optional[float]]:
    """Log in and CONNECT; the reply code (or ``closed``) and its latency."""
    started = time.monotonic()
    reader, writer = await _connect(port)
    try:
        await _greet(reader, writer)
        writer.write(_userpass(USER, PASSWORD))
        if await _status(reader) != "granted":
            return "login refused", None
        writer.write(b"\x05\x01\x00" + destination + echo_port.to_bytes(2, "big"))
        try:
            head = await asyncio.wait_for(reader.readexactly(2), 30)
        except (asyncio.IncompleteReadError, ConnectionError):
            return "closed", None
        return f"0x{head[1]:02x}", time.monotonic() - started
    finally:
        _close(writer)


async def self_destinations(workdir: Path) -> Dict[str, Any]:
    echo = await login_flood._echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    credentials = ["--auth", f"memory:{USER.decode()}:{PASSWORD.decode()}"]
    exposed = Twistd(workdir, "attack-self-exposed")
    loopback = Twistd(workdir, "attack-self-loopback")
    try:
        await exposed.start(["--listen", "tcp:0:interface=0.0.0.0", *credentials])
        await loopback.start(credentials)
        replies = {}
        for label, destination in SELF_DESTINATIONS:
            replies[label], _ = await _connect_status(
                exposed.port, destination, echo_port
            )
        control, _ = await _connect_status(
            loopback.port, SELF_DESTINATIONS[0][1], echo_port
        )
    finally:
        await exposed.stop()
        await loopback.stop()
        echo.close()
    refused = sum(1 for reply in replies.values() if reply == "0x02")
    checks = {
        "every spelling of the host refused with 0x02": refused == len(replies),
        "the same destination reachable without exposure": control == "0x00",
    }
    return {
        "destinations": replies,
        "refused": refused,
        "tried": len(replies),
        "loopback_only_control": control,
        "checks": checks,
        "ok": all(checks.values()),
    }


async def flood(workdir: Path, config: AttackConfig) -> Dict[str, Any]:
    result = await login_flood.run(
        login_flood.FloodConfig(
            seconds=config.flood_seconds,
            flood=config.flood,
            cost=config.flood_cost,
            probes=config.probes,
        ),
        workdir,
    )
    # The latency is the figure; the check is that every probe got through.
    result["latency_under_1s"] = result.pop("ok")
    result["ok"] = result["under_flood_probes_failed"] == 0
    return result


async def run(config: AttackConfig, workdir: Path) -> Dict[str, Any]:
    """All three attacks, one after the other."""
    results: Dict[str, Any] = {}
    results["flood"] = await flood(workdir, config)
    results["throttle"] = await throttle(workdir, config)
    results["self"] = await self_destinations(workdir)
    results["ok"] = all(r["ok"] for r in results.values() if isinstance(r, dict))
    return results
