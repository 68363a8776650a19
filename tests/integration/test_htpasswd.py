"""The htpasswd (bcrypt) checker: correct answers, off the reactor thread."""

from __future__ import annotations

import os
import threading
from typing import Any

import bcrypt
import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin

from twisted_socks5 import htpasswd
from twisted_socks5.auth import UsernamePassword
from twisted_socks5.htpasswd import (
    HtpasswdChecker,
    HtpasswdCheckerFactory,
    parse_htpasswd,
)


def _hash(password: bytes, prefix: bytes = b"$2b$") -> bytes:
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4))
    return prefix + hashed[4:]


def test_parse_keeps_bcrypt_lines_only() -> None:
    data = (
        b"# comment\n\nalice:"
        + _hash(b"a")
        + b"\nbob:{SHA}xyz\nbroken\ncarol:$apr1$x\n"
    )
    users, skipped = parse_htpasswd(data)
    assert list(users) == [b"alice"]
    assert skipped == 3


def test_factory_needs_a_file_name() -> None:
    with pytest.raises(ValueError):
        HtpasswdCheckerFactory().generateChecker("")


@pytest.fixture
def htfile(tmp_path: Any) -> Any:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(
        b"alice:"
        + _hash(b"wonderland", b"$2y$")
        + b"\nbob:"
        + _hash(b"builder")
        + b"\n"
    )
    return path


@pytest_twisted.ensureDeferred
async def test_checks_run_in_a_thread(htfile: Any, monkeypatch: Any) -> None:
    threads_seen = []
    real = htpasswd.check_bcrypt

    def spy(password: bytes, hashed: bytes) -> bool:
        threads_seen.append(threading.current_thread())
        return real(password, hashed)

    monkeypatch.setattr(htpasswd, "check_bcrypt", spy)
    checker = HtpasswdChecker(str(htfile))
    assert (
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))
        == b"alice"
    )
    assert threads_seen and threads_seen[0] is not threading.main_thread()


@pytest.mark.parametrize(
    ("user", "password"),
    [(b"alice", b"wrong"), (b"mallory", b"wonderland"), (b"bob", b"wonderland")],
)
@pytest_twisted.ensureDeferred
async def test_wrong_credentials_fail(
    htfile: Any, user: bytes, password: bytes
) -> None:
    checker = HtpasswdChecker(str(htfile))
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(user, password))


@pytest_twisted.ensureDeferred
async def test_file_changes_are_picked_up(htfile: Any) -> None:
    checker = HtpasswdChecker(str(htfile))
    htfile.write_bytes(b"dave:" + _hash(b"new") + b"\n")
    stat = os.stat(htfile)
    os.utime(htfile, (stat.st_atime, stat.st_mtime + 5))
    assert await checker.requestAvatarId(UsernamePassword(b"dave", b"new")) == b"dave"
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))


@pytest_twisted.ensureDeferred
async def test_unreadable_file_keeps_the_old_users(htfile: Any) -> None:
    checker = HtpasswdChecker(str(htfile))
    os.remove(htfile)
    assert await checker.requestAvatarId(UsernamePassword(b"bob", b"builder")) == b"bob"


@pytest_twisted.ensureDeferred
async def test_through_the_server_with_curl_style_client(
    htfile: Any, make_proxy: Any, http_target: Any
) -> None:
    from test_clients import _pysocks_get
    from twisted.internet import threads

    from twisted_socks5.auth import UsernamePasswordAuthenticator

    auth = UsernamePasswordAuthenticator.from_checkers(HtpasswdChecker(str(htfile)))
    _, port = make_proxy(authenticators=[auth])
    body = await threads.deferToThread(
        _pysocks_get,
        port,
        "127.0.0.1",
        http_target["127.0.0.1"],
        username="alice",
        password="wonderland",
    )
    assert body.endswith(b"hello through socks\n")
