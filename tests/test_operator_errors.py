"""
What an operator sees when something is wrong: one line that says what,
naming the option or the file, and no traceback.
"""

from __future__ import annotations

import sys
from typing import Any

import pytest
from test_plugin import parse
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import LogLevel, formatEvent
from twisted.python import usage

import twisted
from twisted_socks5 import __version__
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.tap import (
    Options,
    RulesFile,
    describe_routes,
    makeService,
    version_line,
    warn_if_metrics_exposed,
)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--handshake-timeout", "-1"], "--handshake-timeout: must be positive"),
        (["--connect-timeout", "0"], "--connect-timeout: must be positive"),
        (["--idle-timeout", "soon"], "--idle-timeout: not a number: 'soon'"),
        (["--max-connections", "-3"], "--max-connections: must be 0 or more"),
        (["--max-connections", "many"], "--max-connections: not a number: 'many'"),
        (["--bind-ports", "9-1"], "--bind-ports: must be LOW-HIGH"),
        (["--workers", "0"], "--workers: at least 1 worker"),
    ],
)
def test_a_bad_value_names_its_option(args: list[str], message: str) -> None:
    options = Options()
    with pytest.raises(usage.UsageError) as caught:
        options.parseOptions(args)
    assert str(caught.value).startswith(message)
    # twistd prints the usage above the error: one short line, not the help.
    assert str(options).strip().count("\n") <= 1


def test_help_is_still_the_whole_help() -> None:
    assert "--handshake-timeout" in Options().getUsage()


def test_a_bad_metrics_endpoint_is_one_line() -> None:
    pytest.importorskip("prometheus_client")
    with pytest.raises(usage.UsageError, match=r"^--metrics 'bogus:1': Unknown"):
        parse("--metrics", "bogus:1")


def test_metrics_without_prometheus_client_says_what_to_install(
    monkeypatch: Any,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(usage.UsageError, match="needs prometheus_client: pip"):
        parse("--metrics", "tcp:9180:interface=127.0.0.1")


@pytest.mark.parametrize(
    "endpoint, exposed",
    [
        ("tcp:9180", True),
        ("tcp:9180:interface=0.0.0.0", True),
        ("tcp:9180:interface=::", True),
        ("tcp:9180:interface=127.0.0.1", False),
        ("tcp:9180:interface=::1", False),
        ("unix:/run/socks5-metrics.sock", False),
    ],
)
def test_metrics_on_every_interface_are_warned_about(
    log_events: EventLoggingObserver, endpoint: str, exposed: bool
) -> None:
    from twisted_socks5.tap import escape_ipv6_interface

    assert warn_if_metrics_exposed(escape_ipv6_interface(endpoint)) is exposed
    warnings = [e for e in log_events if e.get("event") == "socks5.metrics_exposed"]
    assert len(warnings) == exposed
    for event in warnings:
        assert event["log_level"] is LogLevel.warn
        assert "interface=127.0.0.1" in formatEvent(event)


def test_make_service_warns_of_exposed_metrics(
    log_events: EventLoggingObserver, monkeypatch: Any
) -> None:
    pytest.importorskip("prometheus_client")
    from twisted.internet import reactor

    monkeypatch.setattr(reactor, "callWhenRunning", lambda *a: None)
    makeService(parse("--metrics", "tcp:0"))  # built, never started
    assert [e for e in log_events if e.get("event") == "socks5.metrics_exposed"]


def test_a_broken_rules_file_on_reload_is_one_warning(
    tmp_path: Any, log_events: EventLoggingObserver
) -> None:
    path = tmp_path / "rules"
    path.write_text("deny to 10.0.0.0/8\ndefault allow\n")
    rules = RulesFile(str(path))
    factory = SOCKS5ServerFactory(reactor=MemoryReactorClock(), policy=rules)
    path.write_text("deny to 10.0.0.0/8\nallow frm everywhere\ndefault allow\n")
    factory.reload()
    (event,) = [e for e in log_events if e.get("event") == "socks5.reload_failed"]
    assert event["log_level"] is LogLevel.warn
    assert "log_failure" not in event
    text = formatEvent(event)
    assert f"{path}:2" in text and "\n" not in text
    assert not [e for e in log_events if e["log_level"] >= LogLevel.error]
    assert not rules.rules.check_client("127.0.0.1").rule.startswith("allow frm")


def test_version_names_twisted_socks5_and_twisted(capsys: Any) -> None:
    with pytest.raises(SystemExit) as exited:
        parse("--version")
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out == f"twisted-socks5 {__version__} (Twisted {twisted.__version__})\n"
    assert version_line() in out


def test_help_methods_says_when_there_is_none(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        parse("--help-methods")
    assert "No authentication method plugins are installed" in capsys.readouterr().out


def test_start_up_line_has_the_version_and_the_routes(
    log_events: EventLoggingObserver, monkeypatch: Any
) -> None:
    from twisted.internet import reactor

    monkeypatch.setattr(reactor, "callWhenRunning", lambda *a: None)
    service = makeService(
        parse(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--upstream",
            "socks5://alice:s3cret@127.0.0.1:1081",
            "--upstream",
            "tor=socks5://127.0.0.1:9050",
        )
    )
    service.startService()
    try:
        (event,) = [e for e in log_events if e.get("event") == "socks5.listening"]
    finally:
        service.stopService()
    line = formatEvent(event)
    assert line.startswith(version_line() + " listening on 127.0.0.1:")
    assert event["routes"] == (
        "default via socks5://alice:***@127.0.0.1:1081, tor via socks5://127.0.0.1:9050"
    )
    assert "s3cret" not in line


def test_routes_without_upstreams_are_direct() -> None:
    assert describe_routes({}) == "direct"
    assert describe_routes({"x": "tcp:127.0.0.1:1081"}) == (
        "direct, x via tcp:127.0.0.1:1081"
    )
