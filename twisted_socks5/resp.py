"""
RESP2, the Redis wire format, sans-IO: :func:`encode_command` makes the bytes
of a command, :class:`ReplyParser` turns the bytes a server sends into
replies.  :mod:`.redisstore` moves the bytes.

A server's bytes are input like any other: every length is bounded and a
malformed reply raises :class:`RespProtocolError` (the caller drops the
connection), never anything else.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

#: The longest simple line (status, error, integer or a length) we read.
MAX_LINE = 64 * 1024
#: The largest bulk string, and reply, we accept (the store's are tiny).
MAX_BULK = 512 * 1024
MAX_REPLY = 1024 * 1024
#: The most elements of one array, and how deep arrays may nest.
MAX_ARRAY = 1024
MAX_DEPTH = 8


class RespProtocolError(Exception):
    """The server sent something that is not RESP2 (or exceeds our bounds)."""


class RespError:
    """An error reply (``-ERR ...``): a value, so a pipeline's order stays."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and other.message == self.message

    def __hash__(self) -> int:
        return hash(self.message)

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"


#: What a reply decodes to: simple strings are ``str``, bulk strings ``bytes``.
Reply = Union[str, bytes, int, None, RespError, List["Reply"]]

Argument = Union[bytes, str, int, float]


def _argument(value: Argument) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, bool):
        raise TypeError("a Redis argument cannot be a bool")
    return repr(value).encode("ascii")


def encode_command(arguments: Sequence[Argument]) -> bytes:
    """One command as an array of bulk strings (what every server accepts)."""
    parts = [b"*%d\r\n" % len(arguments)]
    for value in arguments:
        data = _argument(value)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class ReplyParser:
    """
    Feed it bytes, get the complete replies so far.  After a
    :class:`RespProtocolError` the parser is spent: drop the connection.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> List[Reply]:
        self._buffer += data
        replies: List[Reply] = []
        while self._buffer:
            parsed = _parse(self._buffer, 0, 0)
            if parsed is None:
                if len(self._buffer) > MAX_REPLY:
                    raise RespProtocolError(f"a reply larger than {MAX_REPLY} bytes")
                break
            reply, end = parsed
            del self._buffer[:end]
            replies.append(reply)
        return replies


def _line(buffer: bytearray, start: int) -> Optional[Tuple[bytes, int]]:
    end = buffer.find(b"\r\n", start, start + MAX_LINE + 2)
    if end < 0:
        if len(buffer) - start > MAX_LINE + 1:
            raise RespProtocolError(f"a line longer than {MAX_LINE} bytes")
        return None
    return bytes(buffer[start:end]), end + 2


def _integer(text: bytes) -> int:
    # int() would take "1_000", " 1" or "+1": RESP integers are plain.
    digits = text[1:] if text[:1] == b"-" else text
    if not digits or len(digits) > 19 or not digits.isdigit() or not digits.isascii():
        raise RespProtocolError(f"not an integer: {text[:32]!r}")
    return int(text)


_KINDS = (b"+", b"-", b":", b"$", b"*")


def _parse(buffer: bytearray, start: int, depth: int) -> Optional[Tuple[Reply, int]]:
    """The reply starting at ``start`` and where it ends, or None if incomplete."""
    kind = bytes(buffer[start : start + 1])
    if kind not in _KINDS:
        if not kind:
            return None
        raise RespProtocolError(f"unknown reply type {kind!r}")
    line = _line(buffer, start + 1)
    if line is None:
        return None
    text, end = line
    if kind == b"+":
        return text.decode("utf-8", "replace"), end
    if kind == b"-":
        return RespError(text.decode("utf-8", "replace")), end
    if kind == b":":
        return _integer(text), end
    if kind == b"$":
        size = _integer(text)
        if size == -1:
            return None, end
        if size < 0 or size > MAX_BULK:
            raise RespProtocolError(f"bulk length {size} out of bounds")
        if len(buffer) < end + size + 2:
            return None
        if buffer[end + size : end + size + 2] != b"\r\n":
            raise RespProtocolError("a bulk string without its end")
        return bytes(buffer[end : end + size]), end + size + 2
    # kind == b"*"
    count = _integer(text)
    if count == -1:
        return None, end
    if count < 0 or count > MAX_ARRAY:
        raise RespProtocolError(f"array length {count} out of bounds")
    if depth >= MAX_DEPTH:
        raise RespProtocolError("arrays nested too deep")
    items: List[Reply] = []
    for _ in range(count):
        parsed = _parse(buffer, end, depth + 1)
        if parsed is None:
            return None
        item, end = parsed
        items.append(item)
    return items, end
