"""
The entry point of one worker process of ``twistd socks5 --workers N``
(:mod:`.workers` is the supervisor that starts them).

``python -m twisted_socks5.workerprocess --fd FD:FAMILY ... -- SOCKS5-OPTIONS``:
adopts the inherited listening sockets and serves them with the factory the
same options build.  Logs go to stdout, which the supervisor reads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="twisted_socks5.workerprocess")
    parser.add_argument("--fd", action="append", default=[], metavar="FD:FAMILY")
    parser.add_argument("options", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    socks5_argv = args.options[1:] if args.options[:1] == ["--"] else args.options

    from twisted.internet import reactor
    from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner
    from twisted.python import usage

    from .tap import (
        Options,
        build_factory,
        freeze_startup_heap,
        install_reload_signal,
    )

    options = Options()
    try:
        options.parseOptions(socks5_argv)
    except usage.UsageError as e:
        sys.stderr.write(f"worker: {e}\n")
        return 2
    # The supervisor time-stamps each line: print just the event.
    observer = FileLogObserver(
        sys.stdout,
        lambda event: f"[{event.get('log_namespace', '-')}] {formatEvent(event)}\n",
    )
    globalLogBeginner.beginLoggingTo([observer])
    from .limits import raise_fd_limit

    raise_fd_limit()
    factory = build_factory(options, reactor)
    install_reload_signal(factory)
    # i14-core: the rules' limits (their store, quota flushes; saved at stop).
    from .exposure import refuse_split_limits_on_reload

    refuse_split_limits_on_reload(options.policy, options["limits-store"])
    limiter = factory.limiter
    if limiter is not None:
        reactor.callWhenRunning(limiter.start)  # type: ignore[attr-defined]
    ports = []
    for spec in args.fd:
        fd_text, _, family_text = spec.partition(":")
        fd = int(fd_text)
        family = socket.AF_INET6 if family_text == "6" else socket.AF_INET
        ports.append(reactor.adoptStreamPort(fd, family, factory))  # type: ignore[attr-defined]
        os.close(fd)  # adoptStreamPort keeps its own duplicate

    def drain() -> object:
        for port in ports:
            port.stopListening()
        drained = factory.drain(options["drain-timeout"])
        if limiter is not None:
            drained = limiter.stop_after(drained)
        if factory.access_log is not None:  # i16-log: its last lines
            return factory.access_log.close_after(drained)
        return drained

    reactor.addSystemEventTrigger("before", "shutdown", drain)  # type: ignore[attr-defined]
    reactor.callWhenRunning(freeze_startup_heap)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
