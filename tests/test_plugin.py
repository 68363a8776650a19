"""The twistd plugin, its options and the plugin discovery of auth methods."""

from __future__ import annotations

import textwrap
from typing import Any, List

import pytest
from twisted.application.service import IServiceMaker
from twisted.cred.strcred import findCheckerFactories
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.python import usage

import twisted.plugins
from twisted_socks5.auth import NoAuthAuthenticator, UsernamePasswordAuthenticator
from twisted_socks5.tap import (
    DEFAULT_LISTEN,
    Options,
    build_authenticators,
    escape_ipv6_interface,
    makeService,
)


def parse(*args: str) -> Options:
    options = Options()
    options.parseOptions(list(args))
    return options


def test_socks5_service_maker_is_discovered() -> None:
    """An import error in the plugin module would silently hide it (#3865)."""
    makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
    assert "socks5" in makers
    assert makers["socks5"].module == "twisted_socks5.tap"


def test_htpasswd_checker_factory_is_discovered() -> None:
    assert "htpasswd" in {f.authType for f in findCheckerFactories()}


def test_defaults() -> None:
    options = parse()
    assert options["listen"] == [DEFAULT_LISTEN]
    assert options["handshake-timeout"] == 10.0
    assert options["connect-timeout"] == 10.0
    assert options["idle-timeout"] is None
    (auth,) = build_authenticators(options)
    assert isinstance(auth, NoAuthAuthenticator)


def test_commands_and_bind_options() -> None:
    from twisted_socks5.codec import Command

    assert parse()["commands"] == [Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE]
    assert parse("--commands", "connect")["commands"] == [Command.CONNECT]
    assert parse("--bind-timeout", "30")["bind-timeout"] == 30.0
    assert parse("--udp-allow-unknown-sources")["udp-allow-unknown-sources"]
    with pytest.raises(usage.UsageError):
        parse("--commands", "connect,teleport")


def test_listen_is_repeatable_and_validated() -> None:
    options = parse(
        "--listen", "tcp:1081:interface=127.0.0.1", "--listen", "unix:/tmp/s5.sock"
    )
    assert options["listen"] == ["tcp:1081:interface=127.0.0.1", "unix:/tmp/s5.sock"]
    with pytest.raises(usage.UsageError):
        parse("--listen", "nosuchendpoint:1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("tcp:1080:interface=::", "tcp:1080:interface=\\:\\:"),
        ("tcp:1080:interface=::1:backlog=5", "tcp:1080:interface=\\:\\:1:backlog=5"),
        ("tcp:1080:interface=\\:\\:1", "tcp:1080:interface=\\:\\:1"),
        ("tcp:1080:interface=127.0.0.1", "tcp:1080:interface=127.0.0.1"),
        ("tcp:1080", "tcp:1080"),
    ],
)
def test_ipv6_interface_needs_no_escaping(given: str, expected: str) -> None:
    assert escape_ipv6_interface(given) == expected
    assert parse("--listen", given, "--allow-open-relay")["listen"] == [expected]


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_bad_timeouts_are_usage_errors(value: str) -> None:
    with pytest.raises(usage.UsageError):
        parse("--connect-timeout", value)


def test_idle_timeout_values() -> None:
    assert parse("--idle-timeout", "300")["idle-timeout"] == 300.0
    assert parse("--idle-timeout", "off")["idle-timeout"] is None


def test_auth_requires_password_unless_anonymous() -> None:
    (auth,) = build_authenticators(parse("--auth", "memory:alice:pw"))
    assert isinstance(auth, UsernamePasswordAuthenticator)
    auths = build_authenticators(
        parse("--auth", "memory:alice:pw", "--auth", "anonymous")
    )
    assert [a.method for a in auths] == [0x02, 0x00]


def test_unknown_method_plugin_is_a_usage_error() -> None:
    with pytest.raises(usage.UsageError):
        parse("--method", "nosuchmethod")


@pytest.fixture
def third_party_plugin(tmp_path: Any, monkeypatch: Any) -> None:
    """A package of someone else's, adding a method through twisted.plugin."""
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "fancy_auth.py").write_text(
        textwrap.dedent(
            """
            from zope.interface import implementer, provider
            from twisted.plugin import IPlugin
            from twisted_socks5.interfaces import (
                AuthResult, IAuthenticator, IAuthenticatorFactory, IAuthNegotiation,
            )

            @implementer(IAuthNegotiation)
            class Negotiation:
                max_message_size = 0
                def start(self):
                    return AuthResult.granted(user="token-holder")
                def data_received(self, data):
                    return None

            @implementer(IAuthenticator)
            class Fancy:
                method = 0x88
                name = "fancy"
                def __init__(self, argument):
                    self.argument = argument
                def negotiate(self, client):
                    return Negotiation()

            @implementer(IAuthenticatorFactory, IPlugin)
            class FancyFactory:
                name = "fancy"
                description = "a private method for tests"
                def build(self, argument, portal):
                    return Fancy(argument)

            fancy = FancyFactory()
            """
        )
    )
    monkeypatch.setattr(
        twisted.plugins, "__path__", [*twisted.plugins.__path__, str(plugins)]
    )


def test_third_party_method_found_by_name(third_party_plugin: None) -> None:
    options = parse("--method", "fancy:arg", "--auth", "memory:a:b")
    auths = build_authenticators(options)
    assert [a.method for a in auths] == [0x88, 0x02]
    assert auths[0].argument == "arg"


def test_startup_heap_is_frozen_once_running(monkeypatch: Any) -> None:
    """twistd socks5 freezes its start-up heap when the reactor runs."""
    from twisted.internet import reactor

    from twisted_socks5 import tap

    scheduled: List[Any] = []
    monkeypatch.setattr(reactor, "callWhenRunning", scheduled.append)
    makeService(parse("--listen", "tcp:0:interface=127.0.0.1"))
    assert scheduled == [tap.freeze_startup_heap]


def test_freeze_startup_heap_moves_objects_out_of_collections() -> None:
    import gc

    from twisted_socks5.tap import freeze_startup_heap

    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()


def test_make_service_logs_real_addresses() -> None:
    observer = EventLoggingObserver()
    globalLogPublisher.addObserver(observer)
    service = makeService(parse("--listen", "tcp:0:interface=127.0.0.1"))
    try:
        service.startService()
        (event,) = [e for e in observer if e.get("event") == "socks5.listening"]
        assert event["listen"].startswith("127.0.0.1:")
        assert not event["listen"].endswith(":0")
        assert event["methods"] == "0x00 (none)"
    finally:
        globalLogPublisher.removeObserver(observer)
        service.stopService()


@pytest.mark.parametrize(
    "listen",
    [
        "tcp:1080",
        "tcp:1080:interface=0.0.0.0",
        "tcp:1080:interface=::",
        "tcp:1080:interface=192.0.2.1",
        "haproxy:tcp:1080:interface=127.0.0.1",
    ],
)
def test_no_open_relay_by_accident(listen: str) -> None:
    with pytest.raises(usage.UsageError, match="open proxy"):
        parse("--listen", listen)
    # Each way out works:
    parse("--listen", listen, "--allow-open-relay")
    parse("--listen", listen, "--auth", "memory:a:b")


@pytest.mark.parametrize(
    "listen", ["tcp:1080:interface=127.0.0.1", "tcp:1080:interface=::1", "unix:/tmp/x"]
)
def test_loopback_and_unix_listeners_need_no_password(listen: str) -> None:
    parse("--listen", listen)


def test_anonymous_with_password_is_still_open(tmp_path: Any) -> None:
    with pytest.raises(usage.UsageError, match="open proxy"):
        parse("--listen", "tcp:1080", "--auth", "memory:a:b", "--auth", "anonymous")


def test_client_allow_list_closes_the_relay(tmp_path: Any) -> None:
    rules = tmp_path / "rules"
    rules.write_text("allow from 192.0.2.0/24\ndefault deny\n")
    parse("--listen", "tcp:1080", "--rules", str(rules))
    for not_a_client_list in (
        "deny to 10.0.0.0/8\ndefault allow\n",
        "allow port 80\ndefault deny\n",  # an open relay for the web
        "allow to *.com\ndefault deny\n",
    ):
        rules.write_text(not_a_client_list)
        with pytest.raises(usage.UsageError, match="open proxy"):
            parse("--listen", "tcp:1080", "--rules", str(rules))


def test_bad_rules_file_is_a_usage_error(tmp_path: Any) -> None:
    rules = tmp_path / "rules"
    rules.write_text("allow frm 10.0.0.0/8\n")
    with pytest.raises(usage.UsageError, match="rules:1"):
        parse("--rules", str(rules))


def test_upstream_option_is_validated() -> None:
    url = "socks5://u:p@127.0.0.1:1081"
    assert parse("--upstream", url)["upstreams"] == {None: url}
    with pytest.raises(usage.UsageError, match="--upstream"):
        parse("--upstream", "ftp://127.0.0.1:21")


def test_named_upstreams_are_routes_for_the_rules(tmp_path: Any) -> None:
    rules = tmp_path / "rules"
    rules.write_text("allow to .onion via tor\nallow via direct\n")
    options = parse(
        "--upstream",
        "tor=socks5://127.0.0.1:9050",
        "--upstream",
        "tcp:host=127.0.0.1:port=1081",
        "--rules",
        str(rules),
    )
    assert options["upstreams"] == {
        "tor": "socks5://127.0.0.1:9050",
        None: "tcp:host=127.0.0.1:port=1081",
    }
    from twisted.internet import reactor

    from twisted_socks5.tap import build_factory

    factory = build_factory(options, reactor)
    assert set(factory.routes) == {"tor", "direct"}
    rules.write_text("allow via nowhere\n")
    with pytest.raises(usage.UsageError, match="via nowhere"):
        parse("--rules", str(rules))
