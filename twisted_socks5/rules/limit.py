"""
``limit`` lines of the rules file: which requests a limit applies to (the
same conditions as an access rule) and what it allows (``sessions``,
``rate``, ``bandwidth``, ``quota``).  Sans-IO: text in, values out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Optional, Tuple

from .rule import Rule

#: The kinds of limit, in the order the syntax documents them.
KINDS = ("sessions", "rate", "bandwidth", "quota")
#: Bandwidth scopes: one bucket per tunnel, per user (or client), per line.
SCOPES = ("per-connection", "per-user", "per-rule")
#: Quota periods (calendar-aligned in UTC, see limitstore.period_bounds).
PERIODS = ("hour", "day", "week", "month")

#: Byte units: decimal (kB = 1000) and binary (KiB = 1024); case matters
#: (``Mb`` would read as megabits to some, so it is refused).
UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "TiB": 1 << 40,
}
_INTERVAL_UNITS = {"s": 1, "m": 60, "h": 3600}

#: Bounds on what a line may say: beyond them a number is a typo.
MAX_SESSIONS = 1_000_000
MAX_RATE = 1_000_000
MIN_INTERVAL = 0.001
MAX_INTERVAL = 86400.0
MAX_BANDWIDTH = 1 << 40  # bytes per second
MAX_QUOTA = 1 << 60  # bytes per period

_NUMBER = r"(\d{1,20}(?:\.\d{1,9})?)"
_BYTES = re.compile(_NUMBER + r"([A-Za-z]{1,3})")
_RATE = re.compile(r"(\d{1,20})/" + _NUMBER + r"?([smh]?)")


def _bytes(text: str, what: str, maximum: int) -> int:
    """``2MiB`` -> 2097152; ValueError on a bad number or unit."""
    match = _BYTES.fullmatch(text)
    if match is None:
        raise ValueError(
            f"bad {what} {text!r} (a number and a unit: {', '.join(UNITS)})"
        )
    number, unit = match.groups()
    if unit not in UNITS:
        raise ValueError(
            f"unknown unit {unit!r} in {text!r} (one of {', '.join(UNITS)})"
        )
    value = int(Decimal(number) * UNITS[unit])
    if not 1 <= value <= maximum:
        raise ValueError(f"{what} {text!r} out of range (1 B to {maximum} B)")
    return value


def _count(text: str, what: str, maximum: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise ValueError(f"bad {what} {text!r} (a whole number)")
    value = int(text)
    if not 1 <= value <= maximum:
        raise ValueError(f"{what} {text} out of range (1 to {maximum})")
    return value


def _render_bytes(value: int) -> str:
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        if value % UNITS[unit] == 0:
            return f"{value // UNITS[unit]}{unit}"
    return f"{value}B"


def _render_number(value: float) -> str:
    return str(int(value)) if value == int(value) else repr(value)


@dataclass(frozen=True)
class LimitLine:
    """
    One ``limit`` line: ``when`` holds its conditions (an allow rule that is
    only ever matched, never decides), ``kind`` what it limits.  Only the
    fields of its kind are set.  ``source`` and ``line`` say where it came
    from and take no part in equality.
    """

    when: Rule
    kind: str
    #: ``sessions N`` and ``rate N/S``: N.
    count: int = 0
    #: ``rate N/S``: S in seconds.
    interval: float = 0.0
    #: ``bandwidth`` bytes per second, ``quota`` bytes per period.
    nbytes: int = 0
    #: ``bandwidth``: one of SCOPES.
    scope: str = ""
    #: ``quota``: one of PERIODS.
    period: str = ""
    source: str = field(default="<code>", compare=False)
    line: Optional[int] = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "sessions":
            ok = 1 <= self.count <= MAX_SESSIONS
        elif self.kind == "rate":
            ok = 1 <= self.count <= MAX_RATE and (
                MIN_INTERVAL <= self.interval <= MAX_INTERVAL
            )
        elif self.kind == "bandwidth":
            ok = 1 <= self.nbytes <= MAX_BANDWIDTH and self.scope in SCOPES
        elif self.kind == "quota":
            ok = 1 <= self.nbytes <= MAX_QUOTA and self.period in PERIODS
        else:
            raise ValueError(f"unknown limit {self.kind!r} (one of {', '.join(KINDS)})")
        if not ok:
            raise ValueError(f"impossible {self.kind} limit: {self.what}")

    @property
    def what(self) -> str:
        """What it allows, in the file syntax: ``sessions 2``, ``quota 1GiB/day``."""
        if self.kind == "sessions":
            return f"sessions {self.count}"
        if self.kind == "rate":
            return f"rate {self.count}/{_render_number(self.interval)}s"
        if self.kind == "bandwidth":
            return f"bandwidth {_render_bytes(self.nbytes)}/s {self.scope}"
        return f"quota {_render_bytes(self.nbytes)}/{self.period}"

    @property
    def slot(self) -> str:
        """
        Which lines compete: the first matching line of each slot applies
        (one ``sessions``, one ``rate``, one ``bandwidth`` per scope, one
        ``quota`` per period).
        """
        return f"{self.kind} {self.scope or self.period}".rstrip()

    def __str__(self) -> str:
        conditions = str(self.when).partition(" ")[2]
        return " ".join(filter(None, ("limit", conditions, self.what)))

    @property
    def description(self) -> str:
        """Where it comes from and what it says, for logs."""
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self}"


def parse_limit(
    when: Rule, words: Tuple[str, ...], source: str, number: int
) -> LimitLine:
    """
    ``words`` are the tokens from the kind keyword on (``("rate",
    "20/1s")``); ValueError saying what is wrong.
    """
    kind = words[0].lower()
    arguments = words[1:]
    expected = {"sessions": 1, "rate": 1, "bandwidth": 2, "quota": 1}
    if kind not in expected:
        raise ValueError(f"unknown limit {words[0]!r} (one of {', '.join(KINDS)})")
    if len(arguments) != expected[kind]:
        usage = {
            "sessions": "sessions N",
            "rate": "rate N/INTERVAL, e.g. rate 20/1s",
            "bandwidth": "bandwidth B/s per-connection|per-user|per-rule",
            "quota": "quota B/hour|day|week|month",
        }[kind]
        raise ValueError(f"expected '{usage}' at the end of a limit line")
    text = arguments[0]
    if kind == "sessions":
        return LimitLine(
            when,
            kind,
            count=_count(text, "sessions", MAX_SESSIONS),
            source=source,
            line=number,
        )
    if kind == "rate":
        match = _RATE.fullmatch(text)
        if match is None:
            raise ValueError(
                f"bad rate {text!r} (N/INTERVAL, e.g. 20/1s, 600/1m, 100/s)"
            )
        count = _count(match.group(1), "rate", MAX_RATE)
        try:
            interval = float(
                Decimal(match.group(2) or "1") * _INTERVAL_UNITS[match.group(3) or "s"]
            )
        except InvalidOperation:  # pragma: no cover - the pattern allows none
            raise ValueError(f"bad interval in {text!r}") from None
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise ValueError(
                f"rate interval in {text!r} out of range ({MIN_INTERVAL}s to 24h)"
            )
        return LimitLine(
            when, kind, count=count, interval=interval, source=source, line=number
        )
    amount, slash, per = text.partition("/")
    if kind == "bandwidth":
        if per != "s":
            raise ValueError(f"bad bandwidth {text!r} (bytes per second, e.g. 2MiB/s)")
        scope = arguments[1].lower()
        if scope not in SCOPES:
            raise ValueError(
                f"bad bandwidth scope {arguments[1]!r} (one of {', '.join(SCOPES)})"
            )
        nbytes = _bytes(amount, "bandwidth", MAX_BANDWIDTH)
        return LimitLine(
            when, kind, nbytes=nbytes, scope=scope, source=source, line=number
        )
    period = per.lower()
    if not slash or period not in PERIODS:
        raise ValueError(
            f"bad quota {text!r} (bytes per period, e.g. 1GiB/day; "
            f"{', '.join(PERIODS)})"
        )
    nbytes = _bytes(amount, "quota", MAX_QUOTA)
    return LimitLine(
        when, kind, nbytes=nbytes, period=period, source=source, line=number
    )


@dataclass(frozen=True)
class BandwidthLimit:
    """
    A bandwidth limit as it applies to one tunnel: its rate and the token
    bucket's ``key`` (shared by the tunnels of one user for ``per-user``, of
    one line for ``per-rule``; the tunnel's own for ``per-connection``).
    """

    rate_bytes_per_s: float
    scope: str
    key: str
