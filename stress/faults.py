"""
Faults: misbehaving destinations and clients, all at once, while healthy
tunnels carry data that must arrive intact (sha256 both ways).

The server is ``stress_server.py``: the project's factory, a resolver that
answers only ``*.test`` and ``localhost`` (127.0.0.1) and fails every other
name without asking any DNS server, and short handshake and connect
timeouts so that the timeouts are part of the run.

Each healthy tunnel moves the first half of its data, then waits until every
fault has played out, then moves the second half: so every fault happens
while all healthy tunnels are open and mid-transfer.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Set, Tuple

import netload
import procstat
from load import Sampler
from netload import HOST, SocksError
from procs import StressServer, settle_fds, wait_until

from twisted_socks5.testing import pattern_sha256


@dataclass
class FaultConfig:
    healthy: int = 150
    healthy_bytes: int = 1 << 20
    each: int = 20
    slow_bytes: int = 1 << 20
    handshake_timeout: float = 2.0
    connect_timeout: float = 2.0
    relay: str = "splice"
    timeout: float = 60.0


#: Garbage a client may send, and what the server must answer before it
#: closes ("closed": nothing at all).
GARBAGE: List[Tuple[str, bytes, str]] = [
    ("http", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "closed"),
    ("no methods", b"\x05\x00", "closed"),
    ("rsv", b"\x05\x01\x00\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", "reply 0x01"),
    ("cmd", b"\x05\x01\x00\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", "reply 0x07"),
    ("atyp", b"\x05\x01\x00\x05\x01\x00\x07" + b"\x00" * 8, "reply 0x08"),
    ("empty name", b"\x05\x01\x00\x05\x01\x00\x03\x00\x00\x50", "reply 0x04"),
    ("only 0xff", b"\x05\x01\xff", "closed"),
]

EXPECTED: Dict[str, Set[str]] = {
    "reset": {"reset"},
    "silent": {"stalled"},
    "blackhole": {"reply 0x06"},
    "refused": {"reply 0x05"},
    "dns": {"reply 0x04"},
    "vanish": {"vanished"},
    "stall": {"closed by server"},
    "slow": {"intact"},
}


class Run:
    """One faults run: the servers, the clients, the gate between halves."""

    def __init__(
        self, config: FaultConfig, server: StressServer, ports: Dict[str, int]
    ):
        self.config = config
        self.server = server
        self.ports = ports
        self.faults_done = asyncio.Event()
        self.pattern = netload.Pattern()
        self.stall_seconds: List[float] = []

    def target(self, kind: str, index: int) -> Tuple[str, int]:
        """Alternately an IP literal and a name the stress resolver knows."""
        host = HOST if index % 2 else f"{kind}-{index}.test"
        return host, self.ports[kind]

    # ---------------------------------------------------------------- healthy

    async def healthy(self, index: int) -> str:
        kind = ("echo", "sink", "source")[index % 3]
        size = self.config.healthy_bytes
        reader, writer = await netload.open_tunnel(
            self.server.port, self.target(kind, index)
        )
        try:
            if kind == "echo":
                await self._echo(index, reader, writer, size)
            elif kind == "sink":
                await self._upload(index, reader, writer, size)
            else:
                await self._download(reader, writer, size)
        finally:
            writer.close()
        return "intact"

    async def _halves(self, first: Callable[[], Awaitable[None]], second: Any) -> None:
        await first()
        await self.faults_done.wait()
        await second()

    async def _echo(self, index: int, reader: Any, writer: Any, size: int) -> None:
        data = self.pattern.slice(index, size)
        half = size // 2
        got = hashlib.sha256()

        async def read(n: int) -> None:
            while n:
                chunk = await reader.read(min(n, netload.CHUNK))
                if not chunk:
                    raise ConnectionError("EOF in the middle of an echo")
                got.update(chunk)
                n -= len(chunk)

        async def part(start: int, end: int) -> None:
            writer.write(data[start:end])
            await asyncio.gather(writer.drain(), read(end - start))

        await self._halves(lambda: part(0, half), lambda: part(half, size))
        writer.write_eof()
        if await reader.read():
            raise ValueError("bytes after the echo")
        if got.digest() != hashlib.sha256(data).digest():
            raise ValueError("echo differs (sha256)")

    async def _upload(self, index: int, reader: Any, writer: Any, size: int) -> None:
        data = self.pattern.slice(index + 1, size)
        half = size // 2

        async def part(start: int, end: int) -> None:
            writer.write(data[start:end])
            await writer.drain()

        await self._halves(lambda: part(0, half), lambda: part(half, size))
        writer.write_eof()
        digest = await reader.read()
        if digest.decode() != hashlib.sha256(data).hexdigest():
            raise ValueError("upload differs (sha256 at the sink)")

    async def _download(self, reader: Any, writer: Any, size: int) -> None:
        writer.write(b"%d\n" % size)
        got = hashlib.sha256()
        half = size // 2

        async def first() -> None:
            left = half
            while left:
                chunk = await reader.read(min(left, netload.CHUNK))
                if not chunk:
                    raise ConnectionError("EOF in the first half")
                got.update(chunk)
                left -= len(chunk)

        async def rest() -> None:
            total = half + await netload.read_to_eof(reader, got)
            if total != size:
                raise ValueError(f"download of {total} bytes, not {size}")

        await self._halves(first, rest)
        if got.hexdigest() != pattern_sha256(size):
            raise ValueError("download differs (sha256)")

    # ----------------------------------------------------------------- faults

    async def reset(self, index: int) -> str:
        """The destination resets mid-transfer: the client must see a reset."""
        reader, writer = await netload.open_tunnel(
            self.server.port, self.target("reset", index)
        )
        chunk = bytes(netload.CHUNK)
        try:

            async def send() -> None:
                for _ in range(64):
                    writer.write(chunk)
                    await writer.drain()

            async def receive() -> int:
                return await netload.read_to_eof(reader)

            sent, received = await asyncio.gather(
                send(), receive(), return_exceptions=True
            )
        finally:
            writer.close()
        if isinstance(sent, (ConnectionResetError, BrokenPipeError)) or isinstance(
            received, ConnectionResetError
        ):
            return "reset"
        if isinstance(received, int):
            return "eof"  # a truncated transfer passed off as complete
        return f"other: {sent!r} {received!r}"

    async def silent(self, index: int) -> str:
        """The destination accepts and never reads: the writes must stall."""
        reader, writer = await netload.open_tunnel(
            self.server.port, self.target("silent", index)
        )
        chunk = bytes(netload.CHUNK)
        try:
            for _ in range(1024):  # 64 MiB: far more than all the buffers
                writer.write(chunk)
                try:
                    await asyncio.wait_for(writer.drain(), 0.5)
                except asyncio.TimeoutError:
                    break
            else:
                return "never stalled"
            if reader.at_eof() or len(reader._buffer):
                return "answered"
            return "stalled"
        finally:
            netload.abort(writer)

    async def _reply_of(self, target: Tuple[str, int]) -> str:
        try:
            _, writer = await netload.open_tunnel(self.server.port, target)
        except SocksError as e:
            return f"reply 0x{e.code:02x}"
        writer.close()
        return "reply 0x00"

    async def blackhole(self, index: int) -> str:
        return await self._reply_of((HOST, self.ports["blackhole"]))

    async def refused(self, index: int) -> str:
        return await self._reply_of((HOST, self.ports["refused"]))

    async def dns(self, index: int) -> str:
        # Fails in the stress resolver: no DNS server is ever asked.
        return await self._reply_of((f"nx{index}.example", 80))

    async def vanish(self, index: int) -> str:
        """Clients that go away in the middle of the handshake."""
        reader, writer = await netload.connect_from(self.server.port)
        variant = index % 4
        if variant == 0:
            writer.write(b"\x05")  # half a greeting, then FIN
            await writer.drain()
            writer.close()
        elif variant == 1:
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(b"\x05\x01\x00\x01\x7f")  # half a request, then RST
            await writer.drain()
            netload.abort(writer)
        elif variant == 2:
            netload.abort(writer)  # connect, then RST at once
        else:
            # A whole request to a destination that never answers the SYN,
            # then gone while the server is still connecting.
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(netload.request_bytes((HOST, self.ports["blackhole"])))
            await writer.drain()
            writer.close()
        return "vanished"

    async def stall(self, index: int) -> str:
        """A client that stops after its greeting: the timeout must close it."""
        start = time.monotonic()
        reader, writer = await netload.connect_from(self.server.port)
        writer.write(b"\x05\x01\x00")
        try:
            method = await reader.readexactly(2)
            rest = await asyncio.wait_for(
                reader.read(), self.config.handshake_timeout * 3
            )
        except asyncio.TimeoutError:
            return "not closed"
        except ConnectionResetError:
            rest = b""
            method = b"\x05\x00"
        finally:
            writer.close()
        self.stall_seconds.append(time.monotonic() - start)
        if method == b"\x05\x00" and rest == b"":
            return "closed by server"
        return f"unexpected {method!r} {rest!r}"

    async def slow(self, index: int) -> str:
        """A reader that takes its time, with a small receive buffer."""
        size = self.config.slow_bytes
        reader, writer = await netload.open_tunnel(
            self.server.port, self.target("source", index), rcvbuf=16384
        )
        try:
            writer.write(b"%d\n" % size)
            got = hashlib.sha256()
            total = 0
            while True:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                got.update(chunk)
                total += len(chunk)
                await asyncio.sleep(0.005)  # the slow reader's own pace
        finally:
            writer.close()
        if total == size and got.hexdigest() == pattern_sha256(size):
            return "intact"
        return f"broken: {total} bytes"

    async def garbage(self, index: int) -> str:
        """Not SOCKS5, or malformed SOCKS5: the documented answer, then close."""
        _, data, _ = GARBAGE[index % len(GARBAGE)]
        reader, writer = await netload.connect_from(self.server.port)
        try:
            writer.write(data)
            answer = await netload.read_to_eof_bytes(reader)
        except ConnectionResetError:
            answer = b""
        finally:
            writer.close()
        if answer.startswith(b"\x05\x00") and len(answer) >= 4:
            return f"reply 0x{answer[3]:02x}"
        if answer in (b"", b"\x05\xff"):
            return "closed"
        return f"unexpected {answer!r}"


async def _classify(coroutine: Awaitable[str], timeout: float) -> str:
    try:
        return await asyncio.wait_for(coroutine, timeout)
    except asyncio.TimeoutError:
        return "timeout"
    except Exception as e:  # noqa: BLE001 - the class is the result
        return f"error {type(e).__name__}: {e}"


async def run(config: FaultConfig) -> Dict[str, Any]:
    """The faults phase; returns outcomes by kind and the checks."""
    servers = await netload.start_servers(
        ["echo", "sink", "source", "reset", "silent", "blackhole"]
    )
    ports = dict(servers.ports)
    ports["refused"] = netload.closed_port()
    server = StressServer()
    options = [
        "--handshake-timeout",
        str(config.handshake_timeout),
        "--connect-timeout",
        str(config.connect_timeout),
    ]
    if config.relay == "copy":
        options.append("--no-splice")
    out: Dict[str, Any] = {"config": config.__dict__.copy()}
    try:
        await server.start(options)
        base = await server.command("gc")
        base_fds = procstat.fd_count(server.pid)
        base_cpu = procstat.cpu_seconds(server.pid)
        run_ = Run(config, server, ports)
        started = time.monotonic()
        with Sampler(server.pid) as sampler:
            healthy = [
                asyncio.ensure_future(_classify(run_.healthy(i), config.timeout))
                for i in range(config.healthy)
            ]
            kinds: Dict[str, Any] = {
                "reset": run_.reset,
                "silent": run_.silent,
                "blackhole": run_.blackhole,
                "refused": run_.refused,
                "dns": run_.dns,
                "vanish": run_.vanish,
                "stall": run_.stall,
                "slow": run_.slow,
                "garbage": run_.garbage,
            }
            count = dict.fromkeys(kinds, config.each)
            count["silent"] = max(1, config.each // 2)
            count["slow"] = max(1, config.each // 4)
            faults = {
                kind: [
                    asyncio.ensure_future(_classify(make(i), config.timeout))
                    for i in range(count[kind])
                ]
                for kind, make in kinds.items()
            }
            fault_results = {
                kind: await asyncio.gather(*tasks) for kind, tasks in faults.items()
            }
            run_.faults_done.set()
            healthy_results = await asyncio.gather(*healthy)
        out["seconds"] = round(time.monotonic() - started, 2)
        out["healthy"] = dict(collections.Counter(healthy_results))
        out["healthy_intact"] = healthy_results.count("intact")
        out["faults"] = {
            kind: dict(collections.Counter(results))
            for kind, results in fault_results.items()
        }
        garbage_expected = [
            GARBAGE[i % len(GARBAGE)][2] for i in range(count["garbage"])
        ]
        out["garbage_as_documented"] = fault_results["garbage"] == garbage_expected
        out["stall_closed_after_s"] = (
            [round(min(run_.stall_seconds), 2), round(max(run_.stall_seconds), 2)]
            if run_.stall_seconds
            else None
        )

        # Every client has gone.  The tunnels whose destination stopped
        # reading are the ones that may stay (see "held" in the docs): wait
        # until nothing else is open and that count has not moved for 1 s.
        silent_port = str(ports["silent"])
        seen: List[Any] = [None, time.monotonic()]

        async def settled() -> bool:
            stats = await server.stats()
            others = stats["active"] - stats["ports"].get(silent_port, 0)
            key = (stats["active"], others)
            if key != seen[0]:
                seen[0], seen[1] = key, time.monotonic()
            return others == 0 and (
                stats["active"] == 0 or time.monotonic() - seen[1] >= 1.0
            )

        await wait_until(settled, 30, 0.1)
        held = await server.stats()
        out["held_after_client_reset"] = held["active"]
        out["held_states"] = held["states"]
        # The silent destinations now reset their connections: then
        # everything must go.
        servers.close_silent()

        async def idle() -> bool:
            return await server.active() == 0

        await wait_until(idle, 30, 0.1)
        out["fds_after"] = await settle_fds(server.pid, base_fds, 30)
        out["fds_baseline"] = base_fds
        after = await server.command("gc")
        out["server_cpu_s"] = round(procstat.cpu_seconds(server.pid) - base_cpu, 2)
        out["server_peak_rss_kib"] = sampler.peak
        out["server_outcomes"] = after["outcomes"]
        out["server_replies"] = after["replies"]
        out["active_after"] = after["active"]
        out["errors_logged"] = after["errors"]
        out["error_texts"] = after["error_texts"]
        out["resolver"] = {
            "asked": after["resolver_asked"],
            "failed": after["resolver_failed"],
        }
        out["objects_before"] = base["objects"]
        out["objects_after"] = after["objects"]
        out["alive"] = procstat.alive(server.pid)
    finally:
        out["exit_status"] = await server.stop()
        servers.close()
    out.update(_verdict(out, config, count))
    return out


def _verdict(
    out: Dict[str, Any], config: FaultConfig, count: Dict[str, int]
) -> Dict[str, Any]:
    before, after = out["objects_before"], out["objects_after"]
    exact = [k for k in before if k not in ("gc_objects", "DelayedCall")]
    objects_back = all(after[k] <= before[k] for k in exact) and (
        after["gc_objects"] - before["gc_objects"]
        <= max(1000, before["gc_objects"] // 100)
    )
    unexpected = {
        kind: {k: v for k, v in results.items() if k not in EXPECTED[kind]}
        for kind, results in out["faults"].items()
        if kind in EXPECTED
    }
    unexpected = {k: v for k, v in unexpected.items() if v}
    checks = {
        "healthy_data_intact": out["healthy_intact"] == config.healthy,
        "faults_as_expected": not unexpected,
        "garbage_answered_as_documented": out["garbage_as_documented"],
        "dns_never_left_the_process": out["resolver"]["failed"] >= count["dns"],
        "active_empty_after": out["active_after"] == 0,
        "fds_back_to_baseline": out["fds_after"] <= out["fds_baseline"],
        "live_objects_back_to_baseline": objects_back,
        "no_errors_logged": out["errors_logged"] == 0,
        "server_alive": bool(out["alive"]),
    }
    return {"unexpected": unexpected, "checks": checks, "ok": all(checks.values())}
