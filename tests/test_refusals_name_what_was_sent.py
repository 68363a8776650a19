"""
A refused login names in the connection's record the user the client sent
(an empty password refused unchecked included), and a malformed
``AuthResult`` is refused at construction: a method plugin's mistake is
caught where it is made.  In memory.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_server import GREET_USERPASS, userpass_harness

from twisted_socks5.interfaces import AuthResult


@pytest.mark.parametrize(
    ("message", "user"),
    [(b"\x01\x05alice\x00", "alice"), (b"\x01\x01a\x00", "a"), (b"\x01\x00\x00", "")],
)
def test_an_empty_password_is_refused_in_the_name_of_its_user(
    message: bytes, user: str
) -> None:
    h = userpass_harness()
    h.send(GREET_USERPASS + message)
    assert h.take() == b"\x05\x02\x01\x01"
    assert h.closing
    assert h.protocol.user == user


@pytest.mark.parametrize("done", [1, 0, None, "yes"])
def test_done_must_be_a_bool(done: Any) -> None:
    with pytest.raises(TypeError, match="done must be a bool"):
        AuthResult(done=done, success=False)
