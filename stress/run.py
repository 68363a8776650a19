#!/usr/bin/env python3
"""
Stress, fault and fuzz run of twisted-socks5, in one command:

    python stress/run.py                 # full: 5,000 tunnels, a few minutes
    python stress/run.py --short         # CI: a few hundred tunnels, < 60 s
    python stress/run.py --json out.json --fuzz-seconds 600

Phases (``--phases``, all by default):

- ``load``: N tunnels open at once through ``twistd socks5`` with data
  flowing on all (echo, sha256), closed, several rounds; peak RSS, RSS per
  tunnel, back to idle (factory.active, /proc/PID/fd, RSS);
- ``faults``: resets, silent and unreachable destinations, DNS failures,
  vanishing, stalled, slow and garbage clients, all while healthy tunnels
  move data that must arrive intact;
- ``emfile``: twistd with a low RLIMIT_NOFILE flooded past it: no spin (CPU
  measured), no death, old tunnels fine, new clients served afterwards;
- ``attack``: a bcrypt login flood from one address while another logs in
  and CONNECTs by name; the failed-login throttle raced by many connections
  held open; every spelling of the proxy host as a destination of a server
  listening beyond loopback (``attack.py``);
- ``fuzz``: every codec parser, the rules and htpasswd parsers and the server
  protocol, for a time budget (``fuzz_campaign.py`` runs the long campaign).

Loopback only (127.0.0.0/8), no DNS.  Linux only (/proc).  Prints a table
on stdout, progress on stderr; exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

STRESS = Path(__file__).resolve().parent
ROOT = STRESS.parent
for path in (str(STRESS), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)  # the working tree's twisted_socks5 first

import attack  # noqa: E402
import emfile  # noqa: E402
import faults  # noqa: E402
import load  # noqa: E402
import procstat  # noqa: E402

PHASES = ("load", "faults", "emfile", "attack", "fuzz")
RELAYS = ("copy", "splice")
#: Descriptors a tunnel holds in the server: 2 sockets, plus 2 pipes (splice).
FDS_PER_TUNNEL = {"copy": 2, "splice": 6}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Stress, fault and fuzz run of twisted-socks5 (loopback only).",
    )
    parser.add_argument(
        "--short", action="store_true", help="the CI run: small, under a minute"
    )
    parser.add_argument(
        "--tunnels", type=int, help="tunnels open at once (5000; --short: 300)"
    )
    parser.add_argument(
        "--splice-tunnels",
        type=int,
        help="tunnels for the splice relay (default: --tunnels, or as many as "
        "the descriptor limit holds at 6 a tunnel)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="load rounds (3)")
    parser.add_argument(
        "--fuzz-seconds",
        type=float,
        help="fuzzing time, shared by all targets (120; --short: 5)",
    )
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, from {', '.join(PHASES)} (default: all)",
    )
    parser.add_argument(
        "--relays",
        default=",".join(RELAYS),
        help="relays to run load, faults and emfile with: copy (--no-splice), "
        "splice (default: both)",
    )
    parser.add_argument(
        "--load-server",
        choices=("twistd", "stress"),
        default="twistd",
        help="the load phase's server: twistd socks5 (default), or the same "
        "factory in stress/stress_server.py, which also counts live objects",
    )
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--workdir", type=Path, help="where server logs go (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    args.relays = [r.strip() for r in args.relays.split(",") if r.strip()]
    for phase in args.phases:
        if phase not in PHASES:
            parser.error(f"unknown phase {phase!r}")
    for relay in args.relays:
        if relay not in RELAYS:
            parser.error(f"unknown relay {relay!r}")
    if args.tunnels is None:
        args.tunnels = 300 if args.short else 5000
    if args.fuzz_seconds is None:
        args.fuzz_seconds = 5.0 if args.short else 120.0
    return args


def tunnels_for(relay: str, args: argparse.Namespace, nofile: int) -> int:
    """The tunnel count a relay can hold within the descriptor limit."""
    if relay == "splice" and args.splice_tunnels:
        return int(args.splice_tunnels)
    fits = (nofile - 200) // FDS_PER_TUNNEL[relay]
    if args.tunnels <= fits:
        return int(args.tunnels)
    return max(100, fits // 100 * 100)


async def run_phases(args: argparse.Namespace, workdir: Path) -> Dict[str, Any]:
    results: Dict[str, Any] = {}
    nofile = procstat.raise_nofile()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    results["environment"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0)),
        "nofile_soft": nofile,
        "nofile_hard": hard,
        "short": args.short,
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }
    durations: Dict[str, float] = {}
    results["durations_s"] = durations

    if "load" in args.phases:
        for relay in args.relays:
            n = tunnels_for(relay, args, nofile)
            config = load.LoadConfig(
                tunnels=n,
                rounds=args.rounds,
                exchanges=2,
                payload=16 * 1024 if args.short else 64 * 1024,
                relay=relay,
                server=args.load_server,
            )
            log(
                f"load: {n} tunnels, relay {relay}, {args.rounds} rounds, "
                f"server {args.load_server} ..."
            )
            start = time.monotonic()
            results[f"load_{relay}"] = await load.run(config, workdir)
            durations[f"load_{relay}"] = round(time.monotonic() - start, 1)
            log(f"  ok={results[f'load_{relay}']['ok']}")

    if "faults" in args.phases:
        for relay in args.relays:
            fault_config = faults.FaultConfig(relay=relay)
            if args.short:
                fault_config.healthy = 30
                fault_config.healthy_bytes = 256 * 1024
                fault_config.each = 6
                fault_config.slow_bytes = 256 * 1024
            log(f"faults: relay {relay} ...")
            start = time.monotonic()
            results[f"faults_{relay}"] = await faults.run(fault_config)
            durations[f"faults_{relay}"] = round(time.monotonic() - start, 1)
            log(f"  ok={results[f'faults_{relay}']['ok']}")

    if "emfile" in args.phases:
        for relay in args.relays:
            emfile_config = emfile.EmfileConfig(relay=relay)
            if args.short:
                emfile_config.flood = 250
                emfile_config.window = 1.5
                emfile_config.fresh = 10
            log(f"emfile: relay {relay}, RLIMIT_NOFILE {emfile_config.nofile} ...")
            start = time.monotonic()
            results[f"emfile_{relay}"] = await emfile.run(emfile_config, workdir)
            durations[f"emfile_{relay}"] = round(time.monotonic() - start, 1)
            log(f"  ok={results[f'emfile_{relay}']['ok']}")
        log("emfile: the default --max-connections against RLIMIT_NOFILE 256 ...")
        start = time.monotonic()
        probes = [await emfile.default_cap_probe(workdir, 256, r) for r in args.relays]
        results["default_cap"] = {"probes": probes, "ok": all(p["ok"] for p in probes)}
        durations["default_cap"] = round(time.monotonic() - start, 1)

    if "attack" in args.phases:
        attack_config = attack.AttackConfig()
        if args.short:
            attack_config.flood_seconds = 3.0
            attack_config.flood = 40
            attack_config.flood_cost = 8
            attack_config.probes = 5
            attack_config.held = 30
        log(
            f"attack: login flood ({attack_config.flood} connections, "
            f"{attack_config.flood_seconds} s), throttle race "
            f"({attack_config.held} held), self destinations ..."
        )
        start = time.monotonic()
        results["attack"] = await attack.run(attack_config, workdir)
        durations["attack"] = round(time.monotonic() - start, 1)
        log(f"  ok={results['attack']['ok']}")

    if "fuzz" in args.phases:
        start = time.monotonic()
        results["fuzz"] = fuzz(args.fuzz_seconds)
        durations["fuzz"] = round(time.monotonic() - start, 1)
    return results


def fuzz(seconds: float) -> Dict[str, Any]:
    """Every target for an equal share of ``seconds``."""
    import fuzz_targets

    share = seconds / len(fuzz_targets.TARGETS)
    log(f"fuzz: {len(fuzz_targets.TARGETS)} targets, {share:.1f} s each ...")
    targets = {
        name: fuzz_targets.fuzz_for(name, share) for name in fuzz_targets.TARGETS
    }
    return {
        "seconds_per_target": round(share, 2),
        "targets": targets,
        "inputs": sum(t["inputs"] for t in targets.values()),
        "ok": all(t["failure"] is None for t in targets.values()),
    }


# ------------------------------------------------------------------ the table


def mib(kib: Any) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def verdict(ok: Any) -> str:
    return "PASS" if ok else "FAIL"


def table(results: Dict[str, Any]) -> List[str]:
    rows: List[tuple[str, str, str]] = []

    def row(what: str, figure: Any, ok: Any = None) -> None:
        rows.append((what, str(figure), "" if ok is None else verdict(ok)))

    for relay in RELAYS:
        r = results.get(f"load_{relay}")
        if not r:
            continue
        c = r["config"]
        checks = r["checks"]
        first = r["rounds"][0]
        rate = c["tunnels"] / max(first["open_s"], 0.001)
        head = f"load {relay}" + (" (stress)" if c["server"] == "stress" else "")
        row(
            f"{head}: tunnels open at once",
            f"{c['tunnels']} x {len(r['rounds'])} rounds, opened in "
            f"{first['open_s']} s ({rate:.0f}/s)",
            checks["all_tunnels_opened"] and checks["all_open_at_once"],
        )
        echoed = sum(x["bytes_echoed"] for x in r["rounds"])
        failed = sum(x["failed"] for x in r["rounds"])
        row(
            f"{head}: data (echo, sha256)",
            f"{echoed / 2**20:.0f} MiB each way, {failed} tunnels failed",
            checks["data_intact"],
        )
        row(f"{head}: server RSS idle (cold)", mib(r["baseline_rss_kib"]))
        row(f"{head}: server peak RSS", mib(r["peak_rss_kib"]))
        row(
            f"{head}: RSS per tunnel",
            f"{r['rss_per_tunnel_open_kib']} KiB open, "
            f"{r['rss_per_tunnel_peak_kib']} KiB at peak (data flowing)",
        )
        row(f"{head}: descriptors per tunnel", r["fds_per_tunnel"])
        row(
            f"{head}: after close: active, fds",
            f"active {[x['active_after'] for x in r['rounds']]}, fds "
            f"{[x['fds_after'] for x in r['rounds']]} (baseline {r['baseline_fds']})",
            checks["active_empty_after"] and checks["fds_back_to_baseline"],
        )
        row(
            f"{head}: RSS after each round",
            ", ".join(mib(k) for k in r["rss_after_rounds_kib"])
            + f"; last round {r['rss_growth_last_round_kib']:+d} KiB"
            f" (margin {r['margin_kib']} KiB)"
            if r["rss_growth_last_round_kib"] is not None
            else ", ".join(mib(k) for k in r["rss_after_rounds_kib"]),
            checks["rss_back_to_idle_footprint"],
        )
        if "live_objects_back_to_baseline" in checks:
            row(f"{head}: live objects", "", checks["live_objects_back_to_baseline"])
        row(
            f"{head}: alive, nothing logged as error",
            "",
            checks["server_alive"] and checks["no_errors_logged"],
        )
    for relay in RELAYS:
        r = results.get(f"faults_{relay}")
        if not r:
            continue
        head = f"faults {relay}"
        checks = r["checks"]
        row(
            f"{head}: healthy tunnels intact",
            f"{r['healthy_intact']}/{r['config']['healthy']} "
            f"({r['config']['healthy_bytes'] // 1024} KiB each, echo/upload/download)",
            checks["healthy_data_intact"],
        )
        for kind, outcomes in r["faults"].items():
            shown = ", ".join(f"{k} x{v}" for k, v in outcomes.items())
            ok = kind not in r["unexpected"]
            if kind == "garbage":
                ok = checks["garbage_answered_as_documented"]
            row(f"{head}: {kind}", shown, ok)
        row(
            f"{head}: stalled handshakes closed after",
            f"{r['stall_closed_after_s']} s "
            f"(timeout {r['config']['handshake_timeout']})",
        )
        row(
            f"{head}: tunnels held after their client reset",
            f"{r['held_after_client_reset']} (destination not reading; see docs)",
        )
        row(
            f"{head}: back to idle (active, fds, objects)",
            f"active {r['active_after']}, fds {r['fds_after']}/{r['fds_baseline']}",
            checks["active_empty_after"]
            and checks["fds_back_to_baseline"]
            and checks["live_objects_back_to_baseline"],
        )
        row(
            f"{head}: server CPU, peak RSS",
            f"{r['server_cpu_s']} s, {mib(r['server_peak_rss_kib'])}",
            checks["no_errors_logged"] and checks["server_alive"],
        )
    for relay in RELAYS:
        r = results.get(f"emfile_{relay}")
        if not r:
            continue
        head = f"emfile {relay}"
        checks = r["checks"]
        c = r["config"]
        row(
            f"{head}: flood past RLIMIT_NOFILE {c['nofile']}",
            ", ".join(f"{k} x{v}" for k, v in r["flood"].items())
            + f"; fds at limit {r['fds_at_limit']}",
            checks["hit_the_limit"],
        )
        row(
            f"{head}: server CPU at the limit",
            f"{r['window_cpu_percent']} % over {r['window_s']} s "
            f"(trickle: {', '.join(f'{k} x{v}' for k, v in r['trickle'].items())})",
            checks["no_spin"],
        )
        row(
            f"{head}: existing tunnels during/after",
            f"{r['window_exchanges_ok']} exchanges, {r['existing_ok_after']}/"
            f"{c['existing']} fine after",
            checks["existing_tunnels_kept_working"],
        )
        row(
            f"{head}: serves again after the flood",
            f"{r['fresh_ok']}/{c['fresh']} new tunnels",
            checks["serves_again_after"],
        )
        row(
            f"{head}: back to idle, alive, no errors",
            f"fds {r['fds_after']}/{r['baseline_fds']}, EMFILE recoveries logged "
            f"{r['emfile_recoveries_logged']}",
            checks["active_empty_after"]
            and checks["fds_back_to_baseline"]
            and checks["alive"]
            and checks["no_errors_logged"],
        )
    cap = results.get("default_cap")
    if cap:
        for p in cap["probes"]:
            row(
                f"default --max-connections, {p['relay']}, NOFILE {p['nofile']}",
                f"cap {p['default_cap']}: "
                + ", ".join(f"{k} x{v}" for k, v in p["outcomes"].items()),
                p["ok"],
            )
    at = results.get("attack")
    if at:
        fl = at["flood"]
        row(
            f"attack: login flood ({fl['flood_connections']} connections, "
            f"bcrypt cost {fl['bcrypt_cost']})",
            f"{sum(fl['flood_logins'].values())} bad logins; another client's "
            f"login + CONNECT by name: median {fl['under_flood_median_s']:.3f} s, "
            f"max {fl['under_flood_max_s']:.3f} s "
            f"(alone {fl['baseline_median_s']:.3f} s)"
            if fl["under_flood_median_s"] is not None
            else f"{fl['under_flood_probes_failed']} probes failed",
            fl["ok"],
        )
        th = at["throttle"]
        row(
            f"attack: throttle race ({th['held']} connections held)",
            f"right password after: {th['right_password_after']}; fresh "
            f"connection {th['fresh_connection']}; other address {th['bystander']}",
            th["ok"],
        )
        sf = at["self"]
        row(
            "attack: the proxy host as a destination (exposed)",
            f"{sf['refused']}/{sf['tried']} spellings refused 0x02; loopback-only "
            f"server: {sf['loopback_only_control']}",
            sf["ok"],
        )
    fz = results.get("fuzz")
    if fz:
        for name, t in fz["targets"].items():
            row(
                f"fuzz {name}",
                f"{t['inputs']} inputs",
                t["failure"] is None,
            )
        row("fuzz: all targets", f"{fz['inputs']} inputs", fz["ok"])
    for phase, seconds in results.get("durations_s", {}).items():
        row(f"duration {phase}", f"{seconds} s")

    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = []
    for what, figure, ok in rows:
        lines.append(f"{what:<{width[0]}}  {figure:<{width[1]}}  {ok}".rstrip())
    return lines


def overall(results: Dict[str, Any]) -> bool:
    return all(
        value.get("ok", True)
        for key, value in results.items()
        if isinstance(value, dict) and key not in ("environment", "durations_s")
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="socks5-stress-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"stress: logs in {workdir}")
    start = time.monotonic()
    results = asyncio.run(run_phases(args, workdir))
    results["durations_s"]["total"] = round(time.monotonic() - start, 1)
    results["ok"] = overall(results)
    for line in table(results):
        print(line)
    print(f"stress: {'PASS' if results['ok'] else 'FAIL'}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str) + "\n")
    return 0 if results["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
