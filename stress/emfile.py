"""
EMFILE: ``twistd socks5`` with a low descriptor limit (RLIMIT_NOFILE set in
the child) and ``--max-connections 0``, flooded with more clients than it
has descriptors.  It must not spin (its CPU time over a window is measured
from /proc/PID/stat: a reactor spinning on a listening socket it cannot
accept from burns a whole core), must not die, must keep its existing
tunnels working, and must serve new clients once the flood has gone.

Also: :func:`default_cap_probe`, whether the default ``--max-connections``
(derived from the same limit) keeps the server out of EMFILE.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Tuple

import netload
import procstat
from load import Tunnel
from procs import Twistd, settle_fds, wait_until


@dataclass
class EmfileConfig:
    nofile: int = 128
    existing: int = 5
    flood: int = 400
    window: float = 3.0
    trickle_per_s: float = 20.0
    fresh: int = 20
    relay: str = "splice"


async def _flood_client(
    port: int, target: Tuple[str, int], source: str, ask: bool, settle: float
) -> Tuple[str, Any]:
    """
    One flood client: connects, sends a CONNECT (``ask``) or nothing, and
    says what became of it within ``settle`` seconds: ``closed`` (the
    server accepted and closed it: EMFILE recovery), ``reply 0xNN``, or
    ``held`` (accepted, waiting for more).
    """
    try:
        reader, writer = await netload.connect_from(port, source)
    except OSError as e:
        return f"connect error {e.errno}", None
    if ask:
        writer.write(b"\x05\x01\x00" + netload.request_bytes(target))
    try:
        first = await asyncio.wait_for(reader.read(2), settle)
    except asyncio.TimeoutError:
        return "held", writer
    except ConnectionResetError:
        return "closed", writer
    if not first:
        return "closed", writer
    try:
        code, _ = await asyncio.wait_for(netload.read_reply(reader), settle)
    except (asyncio.TimeoutError, netload.HandshakeClosed, ConnectionResetError):
        return "closed after method", writer
    return f"reply 0x{code:02x}", writer


async def run(config: EmfileConfig, workdir: Path) -> Dict[str, Any]:
    """The EMFILE phase; returns its figures and checks."""
    servers = await netload.start_servers(["echo"])
    target = (netload.HOST, servers.ports["echo"])
    server = Twistd(workdir, "emfile")
    pattern = netload.Pattern()
    sources = netload.sources(8)
    out: Dict[str, Any] = {"config": config.__dict__.copy()}
    writers: List[Any] = []
    existing: List[Tunnel] = []
    try:
        options = ["--max-connections", "0", "--handshake-timeout", "120"]
        if config.relay == "copy":
            options.append("--no-splice")
        await server.start(options, nofile=config.nofile)
        pid = server.pid
        out["baseline_fds"] = base_fds = procstat.fd_count(pid)

        # Tunnels that exist before the flood, and must work through it.
        for i in range(config.existing):
            tunnel = Tunnel(i, target, sources[0])
            await tunnel.open(server.port)
            await tunnel.exchange(pattern.slice(i, 16384))
            existing.append(tunnel)
        out["fds_with_existing"] = procstat.fd_count(pid)

        # The flood: more clients than descriptors, half asking for a tunnel.
        started = time.monotonic()
        semaphore = asyncio.Semaphore(40)

        async def flood_one(i: int) -> Tuple[str, Any]:
            async with semaphore:
                return await _flood_client(
                    server.port, target, sources[i % len(sources)], i % 2 == 0, 1.5
                )

        results = await asyncio.gather(*(flood_one(i) for i in range(config.flood)))
        writers.extend(w for _, w in results if w is not None)
        out["flood"] = dict(collections.Counter(kind for kind, _ in results))
        out["flood_s"] = round(time.monotonic() - started, 2)
        out["fds_at_limit"] = procstat.fd_count(pid)

        # The window: server CPU while it sits at the limit, clients still
        # arriving (a trickle) and the existing tunnels moving data.
        trickle: List[str] = []

        async def trickle_clients(deadline: float) -> None:
            i = 0
            while time.monotonic() < deadline:
                kind, writer = await _flood_client(
                    server.port, target, sources[i % len(sources)], True, 1.0
                )
                trickle.append(kind)
                if writer is not None:
                    writers.append(writer)
                i += 1
                await asyncio.sleep(1.0 / config.trickle_per_s)

        async def keep_exchanging(deadline: float) -> int:
            rounds = 0
            while time.monotonic() < deadline:
                for n, tunnel in enumerate(existing):
                    await tunnel.exchange(pattern.slice(rounds * 7 + n, 16384))
                rounds += 1
                await asyncio.sleep(0.05)
            return rounds

        cpu0, t0 = procstat.cpu_seconds(pid), time.monotonic()
        deadline = t0 + config.window
        exchanged, _ = await asyncio.gather(
            keep_exchanging(deadline), trickle_clients(deadline)
        )
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        cpu = procstat.cpu_seconds(pid) - cpu0
        elapsed = time.monotonic() - t0
        out["window_s"] = round(elapsed, 2)
        out["window_cpu_s"] = round(cpu, 3)
        out["window_cpu_percent"] = round(100 * cpu / elapsed, 1)
        out["window_exchanges_ok"] = exchanged * len(existing)
        out["trickle"] = dict(collections.Counter(trickle))
        out["alive_at_limit"] = procstat.alive(pid)

        # The flood goes away; the server must serve again.
        for writer in writers:
            netload.abort(writer)
        writers.clear()
        await settle_fds(pid, out["fds_with_existing"], 30)
        fresh = [
            Tunnel(100 + i, target, sources[i % len(sources)])
            for i in range(config.fresh)
        ]
        fresh_ok = 0
        for tunnel in fresh:
            try:
                await asyncio.wait_for(tunnel.open(server.port), 30)
                await asyncio.wait_for(
                    tunnel.exchange(pattern.slice(tunnel.index, 16384)), 30
                )
                await asyncio.wait_for(tunnel.close(), 30)
                fresh_ok += 1
            except Exception as e:  # noqa: BLE001 - counted, reported
                out.setdefault("fresh_errors", []).append(f"{type(e).__name__}: {e}")
        out["fresh_ok"] = fresh_ok
        existing_ok = 0
        for tunnel in existing:
            await tunnel.exchange(pattern.slice(tunnel.index + 3, 16384))
            await tunnel.close()
            existing_ok += 1
        out["existing_ok_after"] = existing_ok

        async def idle() -> bool:
            return await server.active() == 0

        out["active_empty_after"] = await wait_until(idle, 30, 0.1)
        out["fds_after"] = await settle_fds(pid, base_fds, 30)
        out["alive"] = procstat.alive(pid)
        out["log_errors"] = server.errors()[:10]
        out["emfile_recoveries_logged"] = server.log_text().count("EMFILE encountered")
    finally:
        for writer in writers:
            netload.abort(writer)
        out["exit_status"] = await server.stop()
        servers.close()
    checks = {
        "hit_the_limit": out["fds_at_limit"] >= config.nofile - 2,
        "no_spin": out["window_cpu_percent"] < 50,
        "alive": bool(out["alive_at_limit"] and out["alive"]),
        "existing_tunnels_kept_working": out["existing_ok_after"] == config.existing
        and out["window_exchanges_ok"] > 0,
        "serves_again_after": out["fresh_ok"] == config.fresh,
        "active_empty_after": bool(out["active_empty_after"]),
        "fds_back_to_baseline": out["fds_after"] <= out["baseline_fds"],
        "no_errors_logged": not out["log_errors"],
    }
    out["checks"] = checks
    out["ok"] = all(checks.values())
    return out


async def default_cap_probe(
    workdir: Path, nofile: int = 256, relay: str = "splice"
) -> Dict[str, Any]:
    """
    Start twistd with ``nofile`` descriptors and the DEFAULT
    ``--max-connections``, then open as many tunnels as that cap admits,
    one after the other: does every admitted client get a working tunnel,
    or does the server run out of descriptors first?
    """
    servers = await netload.start_servers(["echo"])
    target = (netload.HOST, servers.ports["echo"])
    server = Twistd(workdir, f"cap-{relay}")
    pattern = netload.Pattern()
    # limits.default_max_connections(): 3 descriptors a connection, and room
    # for the last one to be a UDP association's 4 (a busy tunnel's splice
    # pipes only use descriptors no connection needs).
    cap = (nofile - 64 - 1) // 3
    out: Dict[str, Any] = {"nofile": nofile, "relay": relay, "default_cap": cap}
    tunnels: List[Tunnel] = []
    outcomes: List[str] = []
    try:
        # All from 127.0.0.1: without the per-client limit (a quarter).
        options = ["--max-connections-per-client", "0"]
        if relay != "splice":
            options.append("--no-splice")
        await server.start(options, nofile=nofile)
        base = procstat.fd_count(server.pid)
        for i in range(cap):
            tunnel = Tunnel(i, target, "127.0.0.1")
            try:
                await asyncio.wait_for(tunnel.open(server.port), 10)
                await asyncio.wait_for(tunnel.exchange(pattern.slice(i, 1024)), 10)
            except netload.SocksError as e:
                outcomes.append(f"reply 0x{e.code:02x}")
                continue
            except Exception as e:  # noqa: BLE001 - the outcome is the point
                outcomes.append(type(e).__name__)
                continue
            outcomes.append("tunnel")
            tunnels.append(tunnel)
        out["fds_per_tunnel"] = round(
            (procstat.fd_count(server.pid) - base) / max(1, len(tunnels)), 2
        )
    finally:
        for tunnel in tunnels:
            netload.abort(tunnel.writer)
        out["exit_status"] = await server.stop()
        servers.close()
    out["outcomes"] = dict(collections.Counter(outcomes))
    out["served"] = outcomes.count("tunnel")
    out["ok"] = out["served"] == cap
    return out
