"""
The htpasswd back end refuses whatever it cannot check: a hash bcrypt
cannot read, a file it cannot open at start or on reload, a missing bcrypt.
(Found by mutation testing: docs/reliability.rst.)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bcrypt
import pytest
import pytest_twisted
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor

from twisted_socks5.auth import UsernamePassword
from twisted_socks5.htpasswd import HtpasswdChecker, HtpasswdCheckerFactory


def _line(user: bytes, password: bytes) -> bytes:
    return user + b":" + bcrypt.hashpw(password, bcrypt.gensalt(4)) + b"\n"


@pytest_twisted.ensureDeferred
async def test_a_hash_bcrypt_cannot_read_refuses_every_password(
    tmp_path: Path,
) -> None:
    path = tmp_path / "users"
    # A bcrypt prefix, so the file keeps the line, but no valid salt.
    path.write_bytes(b"alice:$2b$12$not-a-hash\n")
    checker = HtpasswdChecker(str(path))
    for password in (b"", b"not-a-hash", b"$2b$12$not-a-hash"):
        with pytest.raises(UnauthorizedLogin):
            await checker.requestAvatarId(UsernamePassword(b"alice", password))


@pytest_twisted.ensureDeferred
async def test_the_auth_plugin_gives_a_working_checker(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(_line(b"alice", b"wonderland"))
    checker = HtpasswdCheckerFactory().generateChecker(str(path))
    good = UsernamePassword(b"alice", b"wonderland")
    assert await checker.requestAvatarId(good) == b"alice"
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonder"))


@pytest_twisted.ensureDeferred
async def test_a_given_reactor_runs_the_checks(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(_line(b"alice", b"wonderland"))
    checker = HtpasswdChecker(str(path), reactor=reactor)
    assert checker.reactor is reactor
    good = UsernamePassword(b"alice", b"wonderland")
    assert await checker.requestAvatarId(good) == b"alice"


def test_a_missing_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        HtpasswdChecker(str(tmp_path / "missing"))


def test_without_bcrypt_the_checker_refuses_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "users"
    path.write_bytes(_line(b"alice", b"wonderland"))
    monkeypatch.setitem(sys.modules, "bcrypt", None)  # import bcrypt fails
    with pytest.raises(RuntimeError, match="bcrypt"):
        HtpasswdChecker(str(path))


@pytest_twisted.ensureDeferred
async def test_reload_reads_the_file_even_when_its_time_is_unchanged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "users"
    path.write_bytes(_line(b"alice", b"wonderland"))
    checker = HtpasswdChecker(str(path))
    stat = os.stat(path)
    path.write_bytes(_line(b"bob", b"builder"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    checker.reload()
    assert await checker.requestAvatarId(UsernamePassword(b"bob", b"builder")) == (
        b"bob"
    )
    with pytest.raises(UnauthorizedLogin):
        await checker.requestAvatarId(UsernamePassword(b"alice", b"wonderland"))


def test_reload_of_a_vanished_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "users"
    path.write_bytes(_line(b"alice", b"wonderland"))
    checker = HtpasswdChecker(str(path))
    path.unlink()
    with pytest.raises(OSError):
        checker.reload()
