"""
``--admin`` and ``--admin-auth``: the console never starts without a
password (the guard says who could reach it), nor with ``--workers``; the
service ``twistd socks5`` builds listens with the console.
"""

from __future__ import annotations

from typing import Any, List

import pytest
from twisted.cred.credentials import UsernamePassword
from twisted.python import usage

from twisted_socks5.admin import ConsoleSite
from twisted_socks5.exposure import warn_if_console_in_clear
from twisted_socks5.tap import ListeningService, Options, makeService

LOOPBACK = "tcp:8081:interface=127.0.0.1"


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


@pytest.mark.parametrize(
    "endpoint",
    ["tcp:8081", "tcp:8081:interface=0.0.0.0", "tcp:8081:interface=::", "tcp6:8081"],
)
def test_exposed_console_without_a_password_is_refused(endpoint: str) -> None:
    with pytest.raises(usage.UsageError, match="reached from other hosts"):
        parse("--admin", endpoint)


@pytest.mark.parametrize(
    "endpoint", [LOOPBACK, "tcp:8081:interface=::1", "unix:/tmp/socks5-admin.sock"]
)
def test_local_console_without_a_password_is_refused(endpoint: str) -> None:
    with pytest.raises(usage.UsageError, match="every local user"):
        parse("--admin", endpoint)


@pytest.mark.parametrize("endpoint", [LOOPBACK, "tcp:8081:interface=0.0.0.0"])
def test_console_with_a_password_starts(endpoint: str) -> None:
    options = parse("--admin", endpoint, "--admin-auth", "memory:root:toor")
    assert options["admin"] == endpoint
    [checker] = options["admin-auth"]
    # Stored as bytes, as the SOCKS side's memory checker is.
    assert checker.users == {b"root": b"toor"}


def test_a_bare_port_is_on_loopback() -> None:
    options = parse("--admin", "8081", "--admin-auth", "memory:root:toor")
    assert options["admin"] == LOOPBACK
    with pytest.raises(usage.UsageError, match="every local user"):
        parse("--admin", "8081")


def test_ipv6_interface_needs_no_escaping() -> None:
    options = parse("--admin", "tcp:8081:interface=::1", "--admin-auth", "memory:a:b")
    assert options["admin"] == "tcp:8081:interface=\\:\\:1"


@pytest.mark.parametrize(
    "argv, why",
    [
        (["--admin-auth", "memory:root:toor"], "give --admin too"),
        (["--admin", LOOPBACK, "--admin-auth", "anonymous"], "username/password"),
        (["--admin", LOOPBACK, "--admin-auth", "file:/nonexistent/x"], "no such file"),
        (["--admin", LOOPBACK, "--admin-auth", "memory"], "no users"),
        (["--admin", LOOPBACK, "--admin-auth", "nosuchtype:x"], "--admin-auth"),
        (["--admin", "nosuchendpoint:1", "--admin-auth", "memory:a:b"], "--admin"),
        (
            ["--admin", LOOPBACK, "--admin-auth", "memory:a:b", "--workers", "2"],
            "cannot be combined with --workers",
        ),
    ],
)
def test_bad_console_options(argv: List[str], why: str) -> None:
    with pytest.raises(usage.UsageError, match=why):
        parse(*argv)


def test_the_console_users_are_not_the_socks_users() -> None:
    options = parse(
        "--auth",
        "memory:alice:s3cret",
        "--admin",
        LOOPBACK,
        "--admin-auth",
        "memory:root:toor",
    )
    [checker] = options["admin-auth"]
    failed: List[Any] = []
    checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret")).addErrback(
        failed.append
    )
    assert failed


def test_the_service_listens_with_the_console() -> None:
    options = parse("--listen", "tcp:0:interface=127.0.0.1")
    plain = makeService(options)
    options = parse(
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--admin",
        "tcp:0:interface=127.0.0.1",
        "--admin-auth",
        "memory:root:toor",
    )
    service = makeService(options)
    consoles = [
        child
        for child in service  # type: ignore[attr-defined]
        if isinstance(child, ListeningService)
        and isinstance(child.factory, ConsoleSite)
    ]
    assert len(consoles) == 1
    assert not any(isinstance(getattr(c, "factory", None), ConsoleSite) for c in plain)  # type: ignore[attr-defined]


def test_a_console_in_clear_beyond_loopback_is_warned_about(events: Any) -> None:
    assert warn_if_console_in_clear("tcp:8081")
    assert [e["event"] for e in events] == ["socks5.console_in_clear"]
    assert not warn_if_console_in_clear(LOOPBACK)
    assert not warn_if_console_in_clear("ssl:8443:privateKey=k.pem")
    assert len(events) == 1
