#!/usr/bin/env python3
"""
Login flood: one address floods ``twistd socks5 --auth htpasswd:FILE`` with
wrong passwords while another client logs in and CONNECTs by name
(``localhost``) to an echo server; prints that client's latency.

    python stress/login_flood.py                    # 10 s, 100 flooders
    python stress/login_flood.py --seconds 3 --flood 50 --json out.json

bcrypt runs in the server's own hash pool, at most two checks at a time per
client address, and name resolution stays on the reactor's pool: the
legitimate client should see well under a second.  The flood comes from
127.0.0.1, the client from 127.0.0.2; ``--auth-failures 0`` by default so
that every bad login is checked (the worst case; ``--throttle`` keeps the
default throttle, which refuses the flood after five failures).  Loopback
only, no DNS beyond ``localhost``.  Also a phase for ``stress/run.py``:
:func:`run`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

STRESS = Path(__file__).resolve().parent
for path in (str(STRESS), str(STRESS.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import bcrypt  # noqa: E402
from procs import Twistd  # noqa: E402

FLOOD_FROM = "127.0.0.1"
CLIENT_FROM = "127.0.0.2"


@dataclass
class FloodConfig:
    seconds: float = 10.0
    flood: int = 100
    #: bcrypt cost of the file (htpasswd -B uses 5; 10 makes each check ~50 ms).
    cost: int = 10
    #: Logins+CONNECTs the measured client makes, one after the other.
    probes: int = 20
    throttle: bool = False


async def _echo_server() -> Any:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0)


async def _greet_and_login(
    port: int, source: str, user: bytes, password: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, local_addr=(source, 0)
    )
    writer.write(
        b"\x05\x01\x02\x01"
        + bytes((len(user),))
        + user
        + bytes((len(password),))
        + password
    )
    answer = await reader.readexactly(4)
    return reader, writer, answer


async def _flooder(port: int, stop: float, counts: Dict[str, int]) -> None:
    while time.monotonic() < stop:
        try:
            reader, writer, answer = await asyncio.wait_for(
                _greet_and_login(port, FLOOD_FROM, b"alice", b"wrong"), 30
            )
            counts["refused" if answer[2:] == b"\x01\x01" else "other"] += 1
            writer.close()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            counts["closed"] += 1  # throttled at accept, or dropped


async def _probe(port: int, echo_port: int) -> float:
    """One login and CONNECT localhost:echo_port, one byte echoed; seconds."""
    started = time.monotonic()
    reader, writer, answer = await _greet_and_login(
        port, CLIENT_FROM, b"alice", b"s3cret"
    )
    if answer != b"\x05\x02\x01\x00":
        raise RuntimeError(f"login refused: {answer!r}")
    name = b"localhost"
    writer.write(
        b"\x05\x01\x00\x03" + bytes((len(name),)) + name + echo_port.to_bytes(2, "big")
    )
    reply = await reader.readexactly(10)
    if reply[1] != 0:
        raise RuntimeError(f"CONNECT failed: {reply!r}")
    writer.write(b"x")
    await reader.readexactly(1)
    elapsed = time.monotonic() - started
    writer.close()
    return elapsed


async def _probes(port: int, echo_port: int, count: int) -> List[Optional[float]]:
    """Latencies in seconds; ``None`` for a probe that failed (a timeout)."""
    times: List[Optional[float]] = []
    for _ in range(count):
        try:
            times.append(await asyncio.wait_for(_probe(port, echo_port), 30))
        except (OSError, RuntimeError, asyncio.IncompleteReadError) as e:
            times.append(None)
            print(f"probe failed: {e!r}", file=sys.stderr)
        except asyncio.TimeoutError:
            times.append(None)
    return times


async def run(config: FloodConfig, workdir: Path) -> Dict[str, Any]:
    users = workdir / "flood.htpasswd"
    users.write_bytes(
        b"alice:" + bcrypt.hashpw(b"s3cret", bcrypt.gensalt(config.cost)) + b"\n"
    )
    echo = await _echo_server()
    echo_port = echo.sockets[0].getsockname()[1]
    server = Twistd(workdir, "login-flood")
    options = ["--auth", f"htpasswd:{users}", "--max-connections", "0"]
    if not config.throttle:
        options += ["--auth-failures", "0"]
    await server.start(options)
    try:
        baseline = await _probes(server.port, echo_port, 3)
        counts = {"refused": 0, "other": 0, "closed": 0}
        stop = time.monotonic() + config.seconds
        flood = [
            asyncio.ensure_future(_flooder(server.port, stop, counts))
            for _ in range(config.flood)
        ]
        await asyncio.sleep(min(1.0, config.seconds / 4))  # let the flood build
        measured = await _probes(server.port, echo_port, config.probes)
        await asyncio.gather(*flood)
    finally:
        await server.stop()
        echo.close()
    done = [t for t in measured if t is not None]
    return {
        "flood_connections": config.flood,
        "flood_seconds": config.seconds,
        "bcrypt_cost": config.cost,
        "throttle": config.throttle,
        "flood_logins": counts,
        "baseline_median_s": statistics.median(t for t in baseline if t is not None),
        "under_flood_probes_failed": len(measured) - len(done),
        "under_flood_median_s": statistics.median(done) if done else None,
        "under_flood_max_s": max(done) if done else None,
        "ok": len(done) == len(measured) and max(done) < 1.0,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=FloodConfig.seconds)
    parser.add_argument("--flood", type=int, default=FloodConfig.flood)
    parser.add_argument("--cost", type=int, default=FloodConfig.cost)
    parser.add_argument("--probes", type=int, default=FloodConfig.probes)
    parser.add_argument("--throttle", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = FloodConfig(
        args.seconds, args.flood, args.cost, args.probes, args.throttle
    )
    with tempfile.TemporaryDirectory(prefix="login-flood-") as tmp:
        result = asyncio.run(run(config, Path(tmp)))
    for key, value in result.items():
        if isinstance(value, float) and key != "flood_seconds":
            value = f"{value * 1000:.1f} ms"
        print(f"{key:>22}: {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
