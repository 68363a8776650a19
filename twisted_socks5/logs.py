"""
A text log observer for ``twistd --logger``: Twisted's classic lines, cheaper.

Under load the proxy logs one event per connection, and Twisted's
``textFileLogObserver`` is a sixth of what a short connection costs: for
every event it builds a time zone and a ``datetime`` to format the time, and
runs ``string.Formatter`` over the format string.  This observer writes the
same text, byte for byte, with the time stamp formatted once per second and
the common one-field format (``"{summary}"``, as the connection event uses)
taken from the event directly.  Everything else (failures, other formats)
goes through Twisted's own formatter.

Use it when the log goes to standard output (systemd's journal, containers)::

    twistd -n --logger twisted_socks5.logs.text_observer socks5 ...

``--logger`` takes the place of ``--logfile`` and ``--syslog``.
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Dict, Optional, TextIO

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

#: Text that needs no escaping: printable ASCII less backslash and quotes.
_PLAIN = re.compile(r"[ !#-&(-\[\]-~]+")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape_char(char: str) -> str:
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if char in "\"'" or not char.isprintable():
        if code < 0x100:
            return f"\\x{code:02x}"
        return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return char


def escape(value: object) -> str:
    """
    A string from the network made safe for one log line: control and
    other non-printable characters, backslash and quotes become Python-style
    escapes (``\\n``, ``\\x1b``, ``\\u202e``), so no client can start a
    line of its own or drive the operator's terminal.  Unambiguous: an
    absent value is ``-``, a real ``-`` is ``\\x2d`` and an empty one ``""``.
    """
    if value is None:
        return "-"
    text = value if type(value) is str else str(value)
    if _PLAIN.fullmatch(text):
        return "\\x2d" if text == "-" else text
    if not text:
        return '""'
    return "".join(map(_escape_char, text))


def escape_word(value: object) -> str:
    """
    :func:`escape`, and spaces too (``\\x20``): for the fields of a log
    line that the network chooses (client, user, target), so that none can
    forge the fields after it on the same line.
    """
    text = escape(value)
    return text.replace(" ", "\\x20") if " " in text else text


def escape_line(text: str) -> str:
    """Control characters of a line escaped, the rest (tabs too) kept."""
    if text.isprintable():
        return text
    return "".join(c if c == "\t" or c.isprintable() else _escape_char(c) for c in text)


#: Format strings that name one field and nothing else, like ``"{summary}"``.
_ONE_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@implementer(ILogObserver)
class TextLogObserver:
    """
    Writes each event as Twisted's ``textFileLogObserver`` would, and
    flushes after each line as it does (a line is on disk before the next
    event happens).
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._second: Optional[int] = None
        self._stamp = "-"
        #: format string -> the field it names, or None if it is not one field.
        self._fields: Dict[str, Optional[str]] = {}

    def _format_time(self, when: Optional[float]) -> str:
        """Twisted's ``formatTime``, computed once per second."""
        if when is None:
            return "-"
        second = int(when // 1)
        if when - second >= 0.999999:
            # datetime rounds to microseconds: this may be the next second.
            return formatTime(when)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def _fast_line(self, event: LogEvent) -> Optional[str]:
        """The line without ``string.Formatter``, or None where that cannot be."""
        fmt = event.get("log_format")
        if not isinstance(fmt, str) or "log_failure" in event:
            return None
        try:
            field = self._fields[fmt]
        except KeyError:
            match = _ONE_FIELD.fullmatch(fmt)
            field = self._fields[fmt] = match.group(1) if match else None
            if len(self._fields) > 1000:  # a program that logs ad-hoc formats
                self._fields.clear()
        if field is None:
            return None
        text = event.get(field)
        if type(text) is not str:
            return None
        if not text:
            return ""
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            level_name = level.name if level is not None else "-"
            system = f"{event.get('log_namespace', '-')}#{level_name}"
        elif type(system) is not str:
            return None
        stamp = self._format_time(event.get("log_time"))
        line = f"{stamp} [{system}] {text}"
        return line.replace("\n", "\n\t") + "\n"

    def __call__(self, event: LogEvent) -> None:
        line = self._fast_line(event)
        if line is None:
            line = formatEventAsClassicLogText(event, formatTime=self._format_time)
        if line:
            self._stream.write(line)
            self._stream.flush()


def text_observer() -> TextLogObserver:
    """The factory for ``twistd --logger``: text lines on standard output."""
    return TextLogObserver(sys.stdout)


def log_connection(log: Logger, protocol: Any, duration: float) -> LogEvent:
    """
    The connection's one log event (``socks5.connection``), from the
    server protocol's facts at close; returned for the access log.
    """
    request = protocol.request
    # Names, users and error messages come from the network: escaped
    # here, once, so no observer (text, JSON, a worker's relay) shows a
    # forged line or a terminal escape.
    client = escape_word(protocol.client) if protocol.client else None
    user = escape_word(protocol.user) if protocol.user is not None else None
    command = request.command.phrase if request else None
    target = escape_word(request.address) if request else None
    outcome = escape_line(protocol.outcome)
    rule = escape(protocol.rule) if protocol.rule is not None else None
    reply = protocol.reply
    reply_text = reply.phrase if reply is not None else "-"
    counters = protocol.counters
    # Set only by an --outgoing set: other connections' lines stay as they were.
    outgoing = protocol.outgoing
    udp = protocol.udp
    if outgoing is None and udp is not None and udp.outgoing:
        outgoing = ",".join(udp.outgoing)
    shown = f"{target or '-'} from {outgoing}" if outgoing else target or "-"
    # The line for text logs is rendered here, with an f-string: Twisted
    # would otherwise run its pure-Python formatter over a dozen fields,
    # a tenth of what a short connection costs.  Every field stays in
    # the event for structured observers (JSON logs).  The event is the
    # one Logger.info would build (the keys twisted.logger documents):
    # Logger.emit would first check its level against a sorted list of
    # LogLevel constants, for every connection.
    log.observer(
        event := {
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": "{summary}",
            "log_time": time.time(),
            "summary": f"{client or '-'} {user or '-'} {command or '-'} "
            f"{shown} -> {reply_text}: {outcome}; "
            f"up {counters.bytes_up} B, down {counters.bytes_down} B "
            f"in {duration:.3f} s",
            "event": "socks5.connection",
            "client": client,
            "user": user,
            "method": protocol.method,
            "command": command,
            "target": target,
            "reply": int(reply) if reply is not None else None,
            "reply_text": reply_text,
            "bound": str(protocol.bound) if protocol.bound else None,
            "peer": str(protocol.peer) if protocol.peer else None,
            "outgoing": outgoing,
            "udp": udp.counters.as_dict() if udp else None,
            "outcome": outcome,
            "rule": rule,
            "bytes_up": counters.bytes_up,
            "bytes_down": counters.bytes_down,
            "duration": duration,
        }
    )
    return event
