"""The RESP2 codec (sans-IO): round trips, any split, hostile bytes."""

from __future__ import annotations

import contextlib
from typing import List

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_socks5.resp import (
    MAX_ARRAY,
    MAX_BULK,
    MAX_DEPTH,
    MAX_LINE,
    MAX_REPLY,
    Reply,
    ReplyParser,
    RespError,
    RespProtocolError,
    encode_command,
)


def encode_reply(reply: Reply) -> bytes:
    """What a server sends for ``reply`` (the test's own encoder)."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, RespError):
        return b"-" + reply.message.encode() + b"\r\n"
    if isinstance(reply, str):
        return b"+" + reply.encode() + b"\r\n"
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    return b"*%d\r\n" % len(reply) + b"".join(encode_reply(r) for r in reply)


line_text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)),
    max_size=40,
)
scalars = st.one_of(
    st.none(),
    line_text,
    line_text.map(RespError),
    st.integers(-(2**63), 2**63 - 1),
    st.binary(max_size=200),
)
replies = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20
)


def split(data: bytes, cuts: List[int]) -> List[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks, last = [], 0
    for p in points:
        chunks.append(data[last:p])
        last = p
    chunks.append(data[last:])
    return chunks


@given(st.lists(replies, max_size=5), st.lists(st.integers(0, 10_000), max_size=8))
def test_replies_survive_any_split(values: List[Reply], cuts: List[int]) -> None:
    data = b"".join(encode_reply(v) for v in values)
    parser = ReplyParser()
    got: List[Reply] = []
    for chunk in split(data, cuts):
        got.extend(parser.feed(chunk))
    assert got == values


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_the_protocol_error(data: bytes) -> None:
    parser = ReplyParser()
    with contextlib.suppress(RespProtocolError):
        parser.feed(data)


@given(
    st.lists(
        st.one_of(st.binary(max_size=50), line_text, st.integers(), st.floats()),
        min_size=1,
        max_size=8,
    )
)
def test_a_command_is_an_array_of_bulk_strings(arguments: List[object]) -> None:
    [parsed] = ReplyParser().feed(encode_command(arguments))  # type: ignore[arg-type]
    assert isinstance(parsed, list) and len(parsed) == len(arguments)
    for value, item in zip(arguments, parsed):
        if isinstance(value, bytes):
            assert item == value
        elif isinstance(value, str):
            assert item == value.encode()
        else:
            assert item == repr(value).encode()


def test_bools_are_not_arguments() -> None:
    with pytest.raises(TypeError):
        encode_command(["SET", True])


def test_nulls_and_empties() -> None:
    assert ReplyParser().feed(b"$-1\r\n*-1\r\n*0\r\n$0\r\n\r\n") == [
        None,
        None,
        [],
        b"",
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"?what\r\n",
        b":12a\r\n",
        b":\r\n",
        b": 1\r\n",
        b":1_000\r\n",
        b":+1\r\n",
        b":12345678901234567890\r\n",
        b"$-2\r\n",
        b"$3\r\nabcd\r\n",
        b"*-2\r\n",
        b"$%d\r\n" % (MAX_BULK + 1),
        b"*%d\r\n" % (MAX_ARRAY + 1),
        b"*1\r\n" * (MAX_DEPTH + 1),
        b"+" + b"x" * (MAX_LINE + 2),
    ],
)
def test_hostile_replies_are_refused(data: bytes) -> None:
    with pytest.raises(RespProtocolError):
        ReplyParser().feed(data)


def test_an_unending_reply_is_bounded() -> None:
    parser = ReplyParser()
    parser.feed(b"*%d\r\n" % MAX_ARRAY)
    bulk = b"$%d\r\n%s\r\n" % (MAX_BULK, b"x" * MAX_BULK)
    with pytest.raises(RespProtocolError):
        for _ in range(MAX_REPLY // MAX_BULK + 1):
            parser.feed(bulk)


def test_a_reply_in_progress_waits_for_more() -> None:
    parser = ReplyParser()
    assert parser.feed(b"*2\r\n:1\r\n$5\r\nhel") == []
    assert parser.feed(b"lo\r\n+OK\r") == [[1, b"hello"]]
    assert parser.feed(b"\n") == ["OK"]
