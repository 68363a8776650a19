"""
Names that moved keep their old import paths for one release (issue 12):
the alias modules and re-exports must hand out the very same objects.
"""

from __future__ import annotations

import ast
import importlib
import ipaddress
import os
import pathlib
import subprocess
import sys

import pytest

import twisted_socks5

PACKAGE = pathlib.Path(twisted_socks5.__file__).parent

#: (old module, name, new module)
MOVED = [
    ("connect", "DirectConnector", "outbound"),
    ("connect", "IOutboundConnector", "outbound"),
    ("connect", "first_allowed", "outbound"),
    ("connect", "MAX_ADDRESSES_PER_FAMILY", "outbound"),
    ("connect", "interleave_families", "outbound"),
    ("connect", "PolicyDenied", "replies"),
    ("connect", "reply_for_failure", "replies"),
    ("upstream", "UpstreamConnector", "outbound"),
    ("upstream", "UpstreamUnavailable", "outbound"),
    ("upstream", "parse_upstream", "outbound"),
    ("upstream", "Upstream", "outbound"),
    *[
        ("client", name, "replies")
        for name in (
            "REPLY_ERRORS",
            "SOCKS5Error",
            "SOCKS5ReplyError",
            "GeneralServerFailure",
            "ConnectionNotAllowed",
            "NetworkUnreachable",
            "HostUnreachable",
            "ConnectionRefused",
            "TTLExpired",
            "CommandNotSupported",
            "AddressTypeNotSupported",
            "reply_error",
            "NoAcceptableMethods",
            "AuthenticationFailed",
            "MalformedReply",
            "ProxyConnectionLost",
            "HandshakeTimeout",
        )
    ],
]


@pytest.mark.parametrize(("old", "name", "new"), MOVED)
def test_old_import_path_gives_the_same_object(old: str, name: str, new: str) -> None:
    old_module = importlib.import_module(f"twisted_socks5.{old}")
    new_module = importlib.import_module(f"twisted_socks5.{new}")
    assert getattr(old_module, name) is getattr(new_module, name)
    assert name in old_module.__all__


@pytest.mark.parametrize(
    ("old", "name", "new", "new_name"),
    [
        ("bind", "normalize_ip", "addresses", "canonical_ip_text"),
        ("selfnet", "normalize_ip", "addresses", "canonical_ip_text"),
        ("rules", "normalise_ip", "addresses", "parse_ip"),
    ],
)
def test_renamed_functions_keep_their_old_names(
    old: str, name: str, new: str, new_name: str
) -> None:
    old_module = importlib.import_module(f"twisted_socks5.{old}")
    new_module = importlib.import_module(f"twisted_socks5.{new}")
    assert getattr(old_module, name) is getattr(new_module, new_name)


def test_the_two_ip_helpers_return_what_their_names_say() -> None:
    from twisted_socks5.addresses import canonical_ip_text, parse_ip

    assert canonical_ip_text("::ffff:192.0.2.1") == "192.0.2.1"
    assert canonical_ip_text("::0:1") == "::1"
    assert canonical_ip_text("not an address") == "not an address"
    assert parse_ip("::ffff:192.0.2.1") == ipaddress.IPv4Address("192.0.2.1")
    with pytest.raises(ValueError):
        parse_ip("not an address")


@pytest.mark.parametrize("old", ["connect", "upstream"])
def test_alias_modules_say_they_are_deprecated(old: str) -> None:
    module = importlib.import_module(f"twisted_socks5.{old}")
    assert (module.__doc__ or "").lstrip().startswith("Deprecated alias")


def _imports(module: str) -> set[str]:
    """The package modules ``module`` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_replies_imports_neither_client_nor_outbound() -> None:
    """The reply table and the client's errors need no lazy import any more."""
    assert _imports("replies") <= {"codec"}


def test_the_worker_entry_point_answers_under_both_names() -> None:
    """``python -m twisted_socks5.worker`` (the old name) still starts one."""
    from twisted_socks5 import worker, workerprocess

    assert worker.main is workerprocess.main
    for name in ("workerprocess", "worker"):
        done = subprocess.run(
            [sys.executable, "-m", f"twisted_socks5.{name}", "--help"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)},
        )
        assert done.returncode == 0, done.stderr
        assert "--fd FD:FAMILY" in done.stdout


def test_a_missing_extra_names_the_extra_that_installs_it() -> None:
    from twisted_socks5._extras import available, missing

    assert available("twisted")
    assert not available("twisted_socks5_no_such_module")
    assert missing("bcrypt", "htpasswd checking needs") == (
        "htpasswd checking needs bcrypt: pip install 'twisted-socks5[bcrypt]'"
    )
    assert missing("prometheus_client", "--metrics needs") == (
        "--metrics needs prometheus_client: pip install 'twisted-socks5[metrics]'"
    )


def test_address_of_keeps_its_old_path() -> None:
    """``address_of`` moved to addresses.py (the server's gates use it too)."""
    from twisted_socks5.addresses import address_of
    from twisted_socks5.commands.connect import address_of as old

    assert old is address_of


def test_the_protocol_moved_to_connection_and_keeps_its_names() -> None:
    """server.py re-exports the protocol; its log events keep their namespace."""
    from twisted.internet.testing import MemoryReactorClock

    from twisted_socks5 import connection, server

    for name in ("SOCKS5ServerProtocol", "State", "EARLY_DATA_PAUSE"):
        assert getattr(server, name) is getattr(connection, name)
    protocol = server.SOCKS5ServerFactory(reactor=MemoryReactorClock()).buildProtocol(
        None
    )
    assert protocol.log.namespace == "twisted_socks5.server.SOCKS5ServerProtocol"
    assert protocol.log.source is protocol
