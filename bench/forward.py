#!/usr/bin/env python3
"""
Twisted's own port forwarder, as a reference target for bench/bench.py.

    python bench/forward.py source=PORT,sink=PORT,echo=PORT,pecho=PORT

For each NAME=PORT, listens on 127.0.0.1 on an ephemeral port and forwards
every connection to 127.0.0.1:PORT with the stock
``twisted.protocols.portforward.ProxyFactory`` (its ProxyServer and
ProxyClient, unmodified: this is the real portforward, no SOCKS).  Once
listening, prints one JSON line, ``{"source": LISTENPORT, ...}``, on stdout.
Exits when stdin closes (the parent closed it or died), on SIGTERM or on
SIGINT.

The default reactor (epoll on Linux).  Twisted's log goes to stderr, with
the classes' stock verbosity, as ``twistd portforward`` would write it to
its log file.  Needs a Python with Twisted (bench.py runs it with the one
that runs twistd).  Loopback only.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from typing import Any, Dict, List, Optional

HOST = "127.0.0.1"  # loopback only, always


def parse_mapping(text: str) -> Dict[str, int]:
    """``source=1234,sink=1235`` -> {"source": 1234, "sink": 1235}."""
    mapping: Dict[str, int] = {}
    for item in text.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep or not name or name in mapping:
            raise ValueError(f"bad or repeated item {item!r}")
        port = int(value)
        if not 0 < port < 65536:
            raise ValueError(f"bad port in {item!r}")
        mapping[name] = port
    if not mapping:
        raise ValueError("no NAME=PORT given")
    return mapping


def watch_stdin(reactor: Any) -> bool:
    """Stop the reactor when stdin reaches EOF; False if it cannot be watched."""
    from twisted.internet import main as imain
    from twisted.internet.interfaces import IReadDescriptor
    from zope.interface import implementer

    @implementer(IReadDescriptor)
    class StdinWatcher:
        def fileno(self) -> int:
            return 0

        def logPrefix(self) -> str:
            return "stdin"

        def doRead(self) -> Optional[Any]:
            try:
                data = os.read(0, 4096)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            return None if data else imain.CONNECTION_DONE

        def connectionLost(self, reason: Any) -> None:
            if reactor.running:
                reactor.stop()

    try:
        mode = os.fstat(0).st_mode
    except OSError:  # no stdin at all
        return False
    # Like loadgen serve: /dev/null or a file is not watched (Twisted would poll
    # it as always readable, and its EOF would stop the forwarder at once).
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(0)):
        return False
    reactor.addReader(StdinWatcher())
    return True


def main(argv: List[str]) -> int:
    if len(argv) != 2 or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    try:
        mapping = parse_mapping(argv[1])
    except ValueError as e:
        print(f"forward.py: {e}", file=sys.stderr)
        return 2

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.protocols.portforward import ProxyFactory

    globalLogBeginner.beginLoggingTo(
        [textFileLogObserver(sys.stderr)], redirectStandardIO=False
    )
    listening: Dict[str, int] = {}
    for name, dest in mapping.items():
        port = reactor.listenTCP(0, ProxyFactory(HOST, dest), interface=HOST)
        listening[name] = port.getHost().port
    sys.stdout.write(json.dumps(listening) + "\n")
    sys.stdout.flush()
    if not watch_stdin(reactor):
        print("forward.py: stdin cannot be watched; SIGTERM only", file=sys.stderr)
    reactor.run()  # its signal handlers stop it on SIGTERM and SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
