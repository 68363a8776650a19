"""
Fuzzing, bounded for the test suite: every parser of the codec and the
whole server protocol, on arbitrary (mostly almost-valid) input split at
arbitrary points.  The targets and their invariants live in
``stress/fuzz_targets.py``, which ``stress/run.py --fuzz-seconds N`` also
runs for longer.  ``SOCKS5_FUZZ_EXAMPLES`` raises the examples per target.

One test function per target, never ``parametrize`` on a ``@given`` test:
pytest-twisted wraps each function's Hypothesis inner test once, and a
shared, parametrized function gets wrapped twice ("blockon cannot be called
from the twisted greenlet").
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "stress"))

import fuzz_targets  # noqa: E402

EXAMPLES = int(os.environ.get("SOCKS5_FUZZ_EXAMPLES", "300"))


@pytest.fixture(scope="module", autouse=True)
def _report_counts(request: Any) -> Iterator[None]:
    """Print how many inputs each target tried, even without ``-s``."""
    before = dict(fuzz_targets.COUNTS)
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    lines = [
        f"  {name}: {count - before.get(name, 0)} inputs"
        for name, count in sorted(fuzz_targets.COUNTS.items())
        if count > before.get(name, 0)
    ]
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not lines:
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        reporter.write_line("fuzz inputs tried:")
        for line in lines:
            reporter.write_line(line)


def _test(name: str, examples: int = EXAMPLES) -> Any:
    test = fuzz_targets.hypothesis_test(name, examples)
    test.__name__ = test.__qualname__ = "test_fuzz_" + name.replace(".", "_")
    return test


test_fuzz_codec_greeting = _test("codec.greeting")
test_fuzz_codec_method_selection = _test("codec.method_selection")
test_fuzz_codec_userpass_request = _test("codec.userpass_request")
test_fuzz_codec_userpass_status = _test("codec.userpass_status")
test_fuzz_codec_request = _test("codec.request")
test_fuzz_codec_reply = _test("codec.reply")
test_fuzz_codec_udp_datagram = _test("codec.udp_datagram")
test_fuzz_codec_address = _test("codec.address")
test_fuzz_config_rules = _test("config.rules")
test_fuzz_config_htpasswd = _test("config.htpasswd")
test_fuzz_server_noauth = _test("server.noauth")
test_fuzz_server_userpass = _test("server.userpass")
test_fuzz_socks4_request = _test("socks4.request")
test_fuzz_socks4_reply = _test("socks4.reply")
test_fuzz_server_socks4 = _test("server.socks4")
test_fuzz_http_target = _test("http.target")
test_fuzz_server_http = _test("server.http")


def test_every_codec_parser_has_a_target() -> None:
    """A parser added to the codec without a fuzz target fails here."""
    from twisted_socks5 import codec

    parsers = {
        name[len("parse_") :] for name in dir(codec) if name.startswith("parse_")
    }
    targets = {
        name.split(".", 1)[1]
        for name in fuzz_targets.TARGETS
        if name.startswith("codec.")
    }
    assert parsers <= targets, parsers - targets


def test_the_server_oracle_catches_a_reply_sent_before_connecting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The server target is not vacuous: a seeded bug is found."""
    from twisted_socks5.codec import ReplyCode
    from twisted_socks5.commands.connect import ConnectHandler

    connect = ConnectHandler.handle

    def early(self: Any, ctx: Any, request: Any) -> None:
        ctx.send_reply(ReplyCode.SUCCEEDED)
        connect(self, ctx, request)

    monkeypatch.setattr(ConnectHandler, "handle", early)
    stream = b"\x05\x01\x00\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    with pytest.raises(AssertionError):
        fuzz_targets.check_server(fuzz_targets.ServerInput(stream=stream))


def test_the_rules_oracle_catches_a_request_check_that_contradicts_the_client(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The rules target is not vacuous: a request check gone wrong is found."""
    from twisted_socks5.rules import Decision, RuleSet

    monkeypatch.setattr(
        RuleSet, "check_request", lambda self, *a, **k: Decision(True, "seeded bug")
    )
    with pytest.raises(AssertionError):
        fuzz_targets.check_rules("deny from 127.0.0.0/8\ndefault deny\n", 0)


def test_the_htpasswd_oracle_catches_a_user_name_with_a_colon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The htpasswd target is not vacuous: a parser that splits wrongly is found."""
    from twisted_socks5 import htpasswd

    def wrong(data: bytes) -> Any:
        user, _, hashed = data.strip().rpartition(b":")
        return {user: hashed}, 0

    monkeypatch.setattr(fuzz_targets, "parse_htpasswd", wrong)
    with pytest.raises(AssertionError):
        fuzz_targets.check_htpasswd(b"a:b:$2y$05$" + b"x" * 53)
    assert htpasswd.parse_htpasswd is not wrong
