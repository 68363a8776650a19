"""
``--access-log``: one JSON object per line for each finished tunnel or
refused request, for tools (``jq``, a log shipper) rather than eyes.

The record is built from the connection log's event
(:func:`twisted_socks5.logs.log_connection`), whose strings from the
network are already escaped there, once: a record adds only what that
event does not carry (the listener, the protocol, the resolved
destination, the route, the outcome's class, the limit).  ``json.dumps``
with ``ensure_ascii`` then makes each record one line of plain ASCII.

Nothing here runs per connection when no access log is configured (the
factory's ``access_log`` is ``None``).  When one is, lines are buffered and
written once a second or every :data:`BUFFER_BYTES`, in one ``write``
each, so a busy server does not make a system call per connection; a
write that fails (disk full, EIO) is said once in the server's log, the
lines are dropped, and relaying goes on.

Files are Twisted's log files (:mod:`twisted.python.logfile`), opened
append-only so that ``logrotate``'s ``copytruncate`` and several
``--workers`` appending to one file both work; :meth:`AccessLog.reopen`
(SIGHUP, SIGUSR1) follows a file ``logrotate`` moved away (``create``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

from twisted.logger import Logger
from twisted.python.logfile import DailyLogFile, LogFile

from ._twisted import appending_log_file
from .codec import Method, ReplyCode

#: Buffered bytes that make a write at once, before the timer's.
BUFFER_BYTES = 64 * 1024
#: Seconds a line may wait in the buffer.
FLUSH_INTERVAL = 1.0
#: Lines kept while writes fail are dropped past this (memory stays bounded).
MAX_BUFFER_BYTES = 4 * 1024 * 1024

_AppendingLogFile = appending_log_file(LogFile)
_AppendingDailyLogFile = appending_log_file(DailyLogFile)

#: Reply codes that refuse a request (the rest of the failures are errors).
_REFUSALS = frozenset(
    (
        ReplyCode.CONNECTION_NOT_ALLOWED,
        ReplyCode.COMMAND_NOT_SUPPORTED,
        ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED,
    )
)
#: Outcomes (admission.py's texts) of logins the server refused.
_LOGIN_REFUSED = ("authentication failed", "login refused")

_SIZE = re.compile(r"(\d+)([KMG]?)", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


class Rotation:
    """
    ``--access-log-rotate``: ``none`` (the default: leave it to
    ``logrotate``), ``daily`` (at local midnight, the old file renamed with
    its date), or ``size:BYTES[:KEEP]`` (``BYTES`` may end in K, M or G;
    the old files are ``PATH.1``, ``PATH.2``..., at most ``KEEP`` of them).
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        kind, _, rest = spec.strip().partition(":")
        kind = kind.lower()
        self.kind = kind
        self.size: Optional[int] = None
        self.keep: Optional[int] = None
        if kind in ("none", "daily"):
            if rest:
                raise ValueError(f"{kind} takes no argument")
            return
        if kind != "size":
            raise ValueError(f"not none, daily or size:BYTES[:KEEP]: {spec!r}")
        size, _, keep = rest.partition(":")
        match = _SIZE.fullmatch(size)
        if match is None or int(match.group(1)) == 0:
            raise ValueError(f"size needs a positive byte count: {spec!r}")
        self.size = int(match.group(1)) * _UNITS[match.group(2).upper()]
        if keep:
            if not keep.isdigit() or int(keep) < 1:
                raise ValueError(f"KEEP must be a positive count: {spec!r}")
            self.keep = int(keep)

    def __repr__(self) -> str:
        return f"Rotation({self.spec!r})"

    def open(self, path: str) -> Any:
        """The Twisted log file for ``path`` this rotation asks for."""
        if self.kind == "daily":
            return _AppendingDailyLogFile.fromFullPath(path)  # type: ignore[attr-defined]
        return _AppendingLogFile.fromFullPath(  # type: ignore[attr-defined]
            path, rotateLength=self.size, maxRotatedFiles=self.keep
        )


class _Stdout:
    """``--access-log -``: standard output as twistd found it."""

    def __init__(self) -> None:
        stream = sys.__stdout__
        self.fd = stream.fileno() if stream is not None else 1
        self.path = "-"

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def flush(self) -> None:
        """Written at once: nothing to flush."""

    def reopen(self) -> None:
        """Standard output is not rotated."""

    def close(self) -> None:
        """Standard output stays open."""


def _utc_stamp(when: float, cache: List[Any]) -> str:
    """ISO 8601 UTC with milliseconds; the seconds part formatted once a second."""
    second = int(when)
    if cache[0] != second:
        cache[0] = second
        cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
    return f"{cache[1]}.{int((when - second) * 1000):03d}Z"


def address_text(address: Any) -> Optional[str]:
    """``HOST:PORT`` (``[IPv6]:PORT``), ``unix:PATH``, or ``None``."""
    host = getattr(address, "host", None)
    port = getattr(address, "port", None)
    if isinstance(host, str) and isinstance(port, int):
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    name = getattr(address, "name", None)
    if name is not None:
        if isinstance(name, bytes):
            name = name.decode("utf-8", "backslashreplace")
        return f"unix:{name}"
    return None


def outcome_class(protocol: Any, reply: Optional[int]) -> str:
    """
    ``success``, ``refused`` (the rules, a limit, the login, a command or
    method the server does not serve), ``error`` (anything else that ended
    it: connect failures, timeouts, a client gone mid-handshake) or
    ``revoked``.
    """
    if getattr(protocol, "revoked", None) is not None:
        return "revoked"
    if reply is None:
        if protocol.method == Method.NO_ACCEPTABLE_METHODS:
            return "refused"
        if protocol.outcome.startswith(_LOGIN_REFUSED):
            return "refused"
        return "error"
    if reply == ReplyCode.SUCCEEDED:
        return "success"
    return "refused" if reply in _REFUSALS else "error"


class AccessLog:
    """
    The access log of one server: :meth:`finished` takes the connection
    log's event; :meth:`reopen` (also ``reload``, for SIGHUP) follows
    ``logrotate``; :meth:`close` writes what is buffered.

    :param out: what lines go to: a Twisted log file (see :class:`Rotation`),
        or anything with ``write(bytes)``, ``flush()``, ``reopen()`` and
        ``close()``.
    """

    log = Logger()

    def __init__(self, out: Any, reactor: Any) -> None:
        self.out = out
        self.reactor = reactor
        self.path: str = getattr(out, "path", "-")
        self._lines: List[str] = []
        self._size = 0
        self._call: Any = None
        self._stamp: List[Any] = [None, ""]
        #: Lines lost to failed writes since the last that worked.
        self.dropped = 0
        self._failing = False

    @classmethod
    def open(
        cls, path: str, reactor: Any, rotation: Optional[Rotation] = None
    ) -> AccessLog:
        """The access log at ``path`` (``-``: standard output)."""
        if path == "-":
            return cls(_Stdout(), reactor)
        return cls((rotation or Rotation("none")).open(path), reactor)

    def __repr__(self) -> str:
        return f"<access log {self.path}>"

    # ------------------------------------------------------------------
    # Records

    def finished(self, protocol: Any, event: Dict[str, Any]) -> None:
        """One record for a connection the connection log just logged."""
        self.write(self.record(protocol, event))

    def record(self, protocol: Any, event: Dict[str, Any]) -> Dict[str, Any]:
        """The record's fields, from the connection log's ``event``."""
        reply = event["reply"]
        decision = protocol.decision
        resolved = getattr(protocol, "resolved", None) or event["peer"]
        limit = getattr(protocol, "limit", None)
        return {
            "time": _utc_stamp(event["log_time"], self._stamp),
            "listener": getattr(protocol, "listener", None),
            "protocol": getattr(protocol, "protocol", "socks5"),
            "client": event["client"],
            "user": event["user"],
            "command": event["command"],
            "destination": event["target"],
            "resolved": str(resolved) if resolved is not None else None,
            "bound": event["bound"],
            "outgoing": event["outgoing"],
            "route": getattr(decision, "via", None) or "default",
            "bytes_up": event["bytes_up"],
            "bytes_down": event["bytes_down"],
            "udp": event["udp"],
            "duration": round(event["duration"], 3),
            "outcome": outcome_class(protocol, reply),
            "reply": reply,
            "reply_text": event["reply_text"],
            "reason": event["outcome"],
            "rule": event["rule"],
            "limit": str(limit) if limit is not None else None,
        }

    def write(self, record: Dict[str, Any]) -> None:
        """Buffer one record's line; written within :data:`FLUSH_INTERVAL`."""
        line = json.dumps(record, ensure_ascii=True, separators=(",", ":")) + "\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= BUFFER_BYTES:
            self.flush()
        elif self._call is None:
            self._call = self.reactor.callLater(FLUSH_INTERVAL, self.flush)

    # ------------------------------------------------------------------
    # Writing

    def flush(self) -> None:
        """Write the buffered lines, in one write; a failure drops them."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if not self._lines:
            return
        lines, self._lines, self._size = self._lines, [], 0
        try:
            self._follow_truncation()
            self.out.write("".join(lines).encode("ascii"))
            self.out.flush()
        except (OSError, ValueError) as e:  # ValueError: a closed file
            self.dropped += len(lines)
            if not self._failing:
                self._failing = True
                self.log.error(
                    "access log {path}: write failed ({error}); dropping its "
                    "lines until a write works again, relaying goes on",
                    path=self.path,
                    error=str(e),
                    event="socks5.access_log_failed",
                )
            return
        if self._failing:
            self._failing = False
            self.log.info(
                "access log {path}: writing again ({dropped} line(s) lost)",
                path=self.path,
                dropped=self.dropped,
                event="socks5.access_log_recovered",
            )
            self.dropped = 0

    def _follow_truncation(self) -> None:
        """
        Reopen a file someone truncated (``copytruncate``) or replaced, so
        that the size Twisted counts for rotation starts again; one
        ``stat`` per write.
        """
        if isinstance(self.out, _Stdout) or not hasattr(self.out, "path"):
            return
        size = getattr(self.out, "size", 0)  # a daily file: only if gone
        try:
            on_disk = os.stat(self.out.path).st_size
        except FileNotFoundError:
            on_disk = -1  # moved away and not replaced: make a new one
        if on_disk < size:
            self.out.reopen()

    def reopen(self) -> None:
        """Write what is buffered, then open the path again (logrotate)."""
        self.flush()
        try:
            self.out.reopen()
        except OSError as e:
            self.log.error(
                "access log {path}: cannot reopen: {error}",
                path=self.path,
                error=str(e),
                event="socks5.access_log_failed",
            )

    #: SIGHUP reloads every ``reloadable``: for the access log, a reopen.
    reload = reopen

    def close(self) -> None:
        """Write what is buffered and close the file (at shutdown)."""
        self.flush()
        self.out.close()
