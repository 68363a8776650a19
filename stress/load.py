"""
Load: N tunnels open at once through ``twistd socks5``, data flowing on all
of them (echo exchanges checked by sha256), then all closed; several rounds,
so that a leak shows as growth from one round to the next.  Reports the
server's peak RSS, its RSS per open tunnel, and whether it went back to
idle: ``factory.active`` empty (from the metrics), descriptors back to the
baseline (/proc/PID/fd), RSS back to the idle footprint.

The idle footprint is the RSS after the first full-size round, not at
start: the allocator keeps the heap it grew for the first round (glibc does
not give freed small blocks back to the system), so the cold figure would
flag that as a leak.  A leak grows the RSS round after round; the checks
compare the later rounds with the first.  With ``server="stress"`` the
server is the same factory in ``stress_server.py``, which also counts live
objects by type after each round: the check then is exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import netload
import procstat
from procs import StressServer, Twistd, settle_fds, wait_until

#: Client source addresses (127.0.0.1 ... 127.0.0.N).
SOURCES = 8
#: RSS may end a round this much above where it started (allocator slack).
MARGIN_KIB = 8 * 1024
MARGIN_FRACTION = 0.05


@dataclass
class LoadConfig:
    tunnels: int = 5000
    rounds: int = 2
    exchanges: int = 2
    payload: int = 64 * 1024
    open_concurrency: int = 48
    timeout: float = 120.0
    #: "splice" (the default relay, os.splice through kernel pipes) or
    #: "copy" (--no-splice, the user-space relay).
    relay: str = "splice"
    #: Extra environment for the server (e.g. glibc malloc tunables).
    env: Optional[Dict[str, str]] = None
    #: "twistd" (twistd socks5) or "stress" (stress_server.py: live objects).
    server: str = "twistd"


class Sampler:
    """Samples a process's RSS in the background; keeps the maximum."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.task: Optional[asyncio.Task[None]] = None

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, procstat.rss_kib(self.pid))
            await asyncio.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self.peak = procstat.rss_kib(self.pid)
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.task is not None:
            self.task.cancel()
        self.peak = max(self.peak, procstat.rss_kib(self.pid))


class Tunnel:
    """One client of the load: open, echo exchanges, half-close."""

    def __init__(self, index: int, target: Tuple[str, int], source: str) -> None:
        self.index = index
        self.target = target
        self.source = source
        self.reader: Any = None
        self.writer: Any = None
        self.error: Optional[str] = None
        self.bytes = 0

    async def open(self, proxy_port: int) -> None:
        self.reader, self.writer = await netload.open_tunnel(
            proxy_port, self.target, self.source
        )

    async def exchange(self, payload: memoryview) -> None:
        self.writer.write(payload)
        sent = hashlib.sha256(payload).hexdigest()
        got = hashlib.sha256()
        left = len(payload)
        while left:
            data = await self.reader.read(min(left, netload.CHUNK))
            if not data:
                raise ConnectionError(f"EOF with {left} bytes still to come")
            got.update(data)
            left -= len(data)
        if got.hexdigest() != sent:
            raise ValueError("echoed bytes differ (sha256)")
        self.bytes += len(payload)

    async def close(self) -> None:
        self.writer.write_eof()
        rest = await self.reader.read()
        if rest:
            raise ValueError(f"{len(rest)} unexpected bytes before EOF")
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


async def _each(
    tunnels: List[Tunnel], step: Any, timeout: float, limit: int = 0
) -> Tuple[int, float]:
    """Run ``step(tunnel)`` on every live tunnel; (failures, seconds)."""
    start = time.monotonic()
    semaphore = asyncio.Semaphore(limit) if limit else None

    async def one(tunnel: Tunnel) -> None:
        if tunnel.error is not None:
            return
        try:
            if semaphore is None:
                await asyncio.wait_for(step(tunnel), timeout)
            else:
                async with semaphore:
                    await asyncio.wait_for(step(tunnel), timeout)
        except Exception as e:  # noqa: BLE001 - recorded, reported
            tunnel.error = f"{type(e).__name__}: {e}"
            if tunnel.writer is not None:
                netload.abort(tunnel.writer)

    before = sum(t.error is not None for t in tunnels)
    await asyncio.gather(*(one(t) for t in tunnels))
    after = sum(t.error is not None for t in tunnels)
    return after - before, time.monotonic() - start


Server = Any  # Twistd or StressServer


async def _idle(server: Server, baseline_fds: int, timeout: float) -> Dict[str, Any]:
    """Wait for the server to have no connection and its baseline fds."""
    active = [-1]

    async def empty() -> bool:
        active[0] = await server.active()
        return active[0] == 0

    await wait_until(empty, timeout, 0.2)
    fds = await settle_fds(server.pid, baseline_fds, timeout)
    result = {"active": active[0], "fds": fds, "rss_kib": procstat.rss_kib(server.pid)}
    if isinstance(server, StressServer):
        result["objects"] = (await server.command("gc"))["objects"]
    return result


async def run_round(
    server: Server,
    config: LoadConfig,
    targets: List[Tuple[str, int]],
    pattern: netload.Pattern,
    baseline_fds: int,
) -> Dict[str, Any]:
    """One round: open all, exchange on all, close all, back to idle."""
    sources = netload.sources(SOURCES)
    tunnels = [
        Tunnel(i, targets[i % len(targets)], sources[i % len(sources)])
        for i in range(config.tunnels)
    ]
    result: Dict[str, Any] = {"rss_before_kib": procstat.rss_kib(server.pid)}
    with Sampler(server.pid) as sampler:
        failed, seconds = await _each(
            tunnels,
            lambda t: t.open(server.port),
            config.timeout,
            config.open_concurrency,
        )
        result["open_failed"], result["open_s"] = failed, round(seconds, 2)
        result["opened"] = sum(t.error is None for t in tunnels)
        result["active_open"] = await server.active()
        result["fds_open"] = procstat.fd_count(server.pid)
        result["rss_open_kib"] = procstat.rss_kib(server.pid)
        for n in range(config.exchanges):

            async def exchange(t: Tunnel, n: int = n) -> None:
                await t.exchange(pattern.slice(t.index * 31 + n, config.payload))

            failed, seconds = await _each(tunnels, exchange, config.timeout)
            result[f"exchange{n}_failed"] = failed
            result[f"exchange{n}_s"] = round(seconds, 2)
        result["active_after_data"] = await server.active()
        result["rss_after_data_kib"] = procstat.rss_kib(server.pid)
        failed, seconds = await _each(tunnels, Tunnel.close, config.timeout)
        result["close_failed"], result["close_s"] = failed, round(seconds, 2)
    result["rss_peak_sampled_kib"] = sampler.peak
    result["bytes_echoed"] = sum(t.bytes for t in tunnels)
    result["failed"] = sum(t.error is not None for t in tunnels)
    result["errors"] = sorted({t.error for t in tunnels if t.error})[:5]
    idle = await _idle(server, baseline_fds, 60)
    result["active_after"] = idle["active"]
    result["fds_after"] = idle["fds"]
    result["rss_after_kib"] = idle["rss_kib"]
    result["objects_after"] = idle.get("objects")
    return result


async def run(config: LoadConfig, workdir: Path) -> Dict[str, Any]:
    """The load phase; returns its figures and checks."""
    echoes = max(1, config.tunnels // 1000)
    servers = await netload.start_servers([("echo", echoes)])
    targets = [(netload.HOST, port) for port in servers.ports.values()]
    server: Server = (
        Twistd(workdir, f"load-{config.relay}")
        if config.server == "twistd"
        else StressServer()
    )
    pattern = netload.Pattern()
    out: Dict[str, Any] = {"config": config.__dict__.copy()}
    try:
        options = ["--max-connections", "0"] if config.server == "twistd" else []
        if config.relay == "copy":
            options.append("--no-splice")
        await server.start(options, extra_env=config.env)
        out["server_pid"] = server.pid
        # A small warm-up round: imports, caches and the log file settle.
        warm = LoadConfig(
            tunnels=min(50, config.tunnels),
            rounds=1,
            exchanges=1,
            payload=4096,
            relay=config.relay,
        )
        baseline_fds = procstat.fd_count(server.pid)
        warm_result = await run_round(server, warm, targets, pattern, baseline_fds)
        out["warmup_failed"] = warm_result["failed"]
        baseline_fds = procstat.fd_count(server.pid)
        out["baseline_fds"] = baseline_fds
        out["baseline_rss_kib"] = procstat.rss_kib(server.pid)
        out["baseline_objects"] = warm_result["objects_after"]
        rounds = []
        for _ in range(config.rounds):
            rounds.append(
                await run_round(server, config, targets, pattern, baseline_fds)
            )
        out["rounds"] = rounds
        out["hwm_kib"] = procstat.hwm_kib(server.pid)
        out["alive"] = procstat.alive(server.pid)
        if isinstance(server, StressServer):
            await server.stats()
        out["log_errors"] = server.errors()[:10]
    finally:
        out["exit_status"] = await server.stop()
        servers.close()
    out.update(_verdict(out, config))
    return out


def _objects_back(out: Dict[str, Any]) -> Optional[bool]:
    """Live objects after the last round == after the warm-up (stress server)."""
    base = out.get("baseline_objects")
    last = out["rounds"][-1].get("objects_after")
    if not base or not last:
        return None
    # Cancelled DelayedCalls stay in the reactor's heap until it compacts
    # (Twisted's lazy deletion): the pending timers are what must be back.
    exact = [k for k in base if k not in ("gc_objects", "DelayedCall")]
    slack = max(1000, base["gc_objects"] // 100)
    return all(last[k] <= base[k] for k in exact) and (
        last["gc_objects"] - base["gc_objects"] <= slack
    )


def _verdict(out: Dict[str, Any], config: LoadConfig) -> Dict[str, Any]:
    """Summary figures and pass/fail checks from the rounds."""
    rounds = out["rounds"]
    base = out["baseline_rss_kib"]
    first = rounds[0]
    last = rounds[-1]
    per_tunnel_open = (first["rss_open_kib"] - first["rss_before_kib"]) / config.tunnels
    peak = max(r["rss_peak_sampled_kib"] for r in rounds)
    footprint = first["rss_after_kib"]
    margin = max(MARGIN_KIB, footprint * MARGIN_FRACTION)
    # A leak grows every round; the allocator's high-water mark may step up
    # once.  So the last round is compared with the highest before it.
    earlier = max((r["rss_after_kib"] for r in rounds[:-1]), default=footprint)
    growth = last["rss_after_kib"] - earlier
    checks: Dict[str, Any] = {
        "all_tunnels_opened": all(r["opened"] == config.tunnels for r in rounds),
        "all_open_at_once": all(r["active_open"] == config.tunnels for r in rounds),
        "data_intact": all(r["failed"] == 0 for r in rounds),
        "active_empty_after": all(r["active_after"] == 0 for r in rounds),
        "fds_back_to_baseline": all(
            r["fds_after"] <= out["baseline_fds"] for r in rounds
        ),
        "rss_back_to_idle_footprint": len(rounds) < 2 or growth <= margin,
        "server_alive": bool(out["alive"]),
        "no_errors_logged": not out["log_errors"],
    }
    objects = _objects_back(out)
    if objects is not None:
        checks["live_objects_back_to_baseline"] = objects
    return {
        "fds_per_tunnel": round(
            (first["fds_open"] - out["baseline_fds"]) / config.tunnels, 2
        ),
        "peak_rss_kib": max(peak, out["hwm_kib"]),
        "rss_per_tunnel_open_kib": round(per_tunnel_open, 2),
        "rss_per_tunnel_peak_kib": round(
            (max(peak, out["hwm_kib"]) - base) / config.tunnels, 2
        ),
        "first_round_retained_kib": footprint - base,
        "rss_after_rounds_kib": [r["rss_after_kib"] for r in rounds],
        "rss_growth_last_round_kib": growth if len(rounds) > 1 else None,
        "margin_kib": round(margin),
        "checks": checks,
        "ok": all(checks.values()),
    }
