"""
A SOCKS5 server for the fault runs, in a process of its own, with a name
resolver that never leaves the machine and a control channel on stdin.

Why not ``twistd socks5``: the DNS-failure faults need names that fail
without asking any DNS server, and the checks need the factory's own view
(``factory.active``, each connection's outcome).  The factory is the same
``SOCKS5ServerFactory`` twistd builds.

Protocol: prints one JSON line ``{"port": N, "pid": P}`` once listening;
then each line on stdin is a command answered by one JSON line:
``stats`` (connections open, outcomes so far, errors logged) or ``gc``
(collect garbage, then stats with the live objects counted by type, which
is how a leak shows without any doubt about the allocator).  EOF on stdin
stops the server.
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the working tree's twisted_socks5

from twisted.internet import reactor, stdio  # noqa: E402
from twisted.logger import globalLogBeginner  # noqa: E402
from twisted.protocols.basic import LineReceiver  # noqa: E402

from twisted_socks5.limits import ConnectionLimits  # noqa: E402
from twisted_socks5.outbound import DirectConnector  # noqa: E402
from twisted_socks5.server import SOCKS5ServerFactory  # noqa: E402
from twisted_socks5.testing import LoopbackResolver  # noqa: E402


class Observer:
    """Counts the connections' outcomes and every error logged."""

    def __init__(self) -> None:
        self.outcomes: Dict[str, int] = collections.Counter()
        self.replies: Dict[str, int] = collections.Counter()
        self.errors = 0
        self.error_texts: List[str] = []

    def __call__(self, event: Dict[str, Any]) -> None:
        if event.get("event") == "socks5.connection":
            outcome = str(event.get("outcome", "?")).split(":", 1)[0]
            self.outcomes[outcome] += 1
            reply = event.get("reply")
            self.replies["-" if reply is None else f"0x{reply:02x}"] += 1
        failure = event.get("log_failure")
        level = getattr(event.get("log_level"), "name", "")
        if failure is not None or level in ("error", "critical"):
            self.errors += 1
            if len(self.error_texts) < 5:
                text = str(event.get("log_format", ""))
                if failure is not None:
                    text += "\n" + failure.getTraceback()
                self.error_texts.append(text)


#: Classes whose live instances are counted: none may outlive its connection.
_TRACKED = (
    "SOCKS5ServerProtocol",
    "OutboundProtocol",
    "SpliceRelay",
    "Server",  # twisted.internet.tcp.Server: an accepted connection
    "Client",  # twisted.internet.tcp.Client: an outbound connection
    "Deferred",
    "DelayedCall",
    "Failure",
)


def live_objects() -> Dict[str, int]:
    """
    After a full collection: objects alive in all, instances of the tracked
    classes, the reactor's timers and registered descriptors.
    """
    gc.collect()
    everything = gc.get_objects()
    counts: Dict[str, int] = dict.fromkeys(_TRACKED, 0)
    for obj in everything:
        name = type(obj).__name__
        if name in counts:
            counts[name] += 1
    counts["gc_objects"] = len(everything)
    counts["pending_timers"] = len(reactor.getDelayedCalls())  # type: ignore[attr-defined]
    counts["readers"] = len(reactor.getReaders())  # type: ignore[attr-defined]
    counts["writers"] = len(reactor.getWriters())  # type: ignore[attr-defined]
    return counts


class Control(LineReceiver):
    """Answers ``stats``/``gc`` on stdin; EOF stops the reactor."""

    delimiter = b"\n"

    def __init__(
        self,
        factory: SOCKS5ServerFactory,
        observer: Observer,
        resolver: LoopbackResolver,
    ) -> None:
        self.factory = factory
        self.observer = observer
        self.resolver = resolver

    def lineReceived(self, line: bytes) -> None:
        command = line.strip().decode()
        objects: Optional[Dict[str, int]] = None
        if command == "gc":
            objects = live_objects()
        states: Dict[str, int] = collections.Counter(
            p.state.value for p in self.factory.active
        )
        ports: Dict[str, int] = collections.Counter(
            str(p.request.address.port) if p.request is not None else "-"
            for p in self.factory.active
        )
        answer = {
            "active": len(self.factory.active),
            "states": dict(states),
            "ports": dict(ports),
            "outcomes": dict(self.observer.outcomes),
            "replies": dict(self.observer.replies),
            "errors": self.observer.errors,
            "error_texts": self.observer.error_texts,
            "resolver_asked": len(self.resolver.asked),
            "resolver_failed": self.resolver.failed,
            "objects": objects,
        }
        self.sendLine(json.dumps(answer).encode())

    def connectionLost(self, reason: Any = None) -> None:
        if reactor.running:  # type: ignore[attr-defined]
            reactor.stop()  # type: ignore[attr-defined]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--handshake-timeout", type=float, default=10.0)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--idle-timeout", type=float, default=None)
    parser.add_argument(
        "--no-splice", action="store_true", help="the user-space relay only"
    )
    args = parser.parse_args(argv)

    observer = Observer()
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    # IPv4 only: the stress targets listen on 127.0.0.1.
    resolver = LoopbackResolver(v6=False)
    reactor.installNameResolver(resolver)  # type: ignore[attr-defined]
    factory = SOCKS5ServerFactory(
        reactor=reactor,
        connector=DirectConnector(reactor, args.connect_timeout, resolver=resolver),
        handshake_timeout=args.handshake_timeout,
        idle_timeout=args.idle_timeout,
        splice=not args.no_splice,
        limits=ConnectionLimits(reactor.seconds, max_connections=0),  # type: ignore[attr-defined]
    )
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    sys.stdout.write(
        json.dumps({"port": port.getHost().port, "pid": os.getpid()}) + "\n"
    )
    sys.stdout.flush()
    stdio.StandardIO(Control(factory, observer, resolver))
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
