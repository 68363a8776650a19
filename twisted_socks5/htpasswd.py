"""
``--auth htpasswd:FILE``: a ``twisted.cred`` checker for bcrypt htpasswd files
(``htpasswd -B``: ``$2y$``, ``$2b$``, ``$2a$`` hashes).

bcrypt is slow on purpose (tens of milliseconds), so every check runs in the
reactor's thread pool, never on the reactor thread.  The file is re-read
when its modification time changes, so credentials change without a
restart.  Unknown users are checked against a dummy hash so that their
answer takes as long as a wrong password.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

_BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
#: bcrypt of a random string, cost 12: the work done for unknown users.
_DUMMY_HASH = b"$2b$12$eUrmJJnmTS/TtgXfaX9I/..8bKyuzIk.TZmnhrIvNZCW03epEou/u"


def _bcrypt() -> Any:
    try:
        import bcrypt
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "htpasswd checking needs bcrypt: pip install 'twisted-socks5[bcrypt]'"
        ) from None
    return bcrypt


def check_bcrypt(password: bytes, hashed: bytes) -> bool:
    """Constant-time bcrypt check; ``$2y$`` is read as ``$2b$`` (same algorithm)."""
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        return bool(_bcrypt().checkpw(password, hashed))
    except ValueError:
        return False


def parse_htpasswd(data: bytes) -> Tuple[Dict[bytes, bytes], int]:
    """
    Parse htpasswd content into ``{user: bcrypt hash}``.  Returns the entries
    and the count of lines skipped (not bcrypt, or malformed).
    """
    users: Dict[bytes, bytes] = {}
    skipped = 0
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user or not hashed.startswith(_BCRYPT_PREFIXES):
            skipped += 1
            continue
        users[user] = hashed
    return users, skipped


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """Checks :class:`IUsernamePassword` credentials against an htpasswd file."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, path: str, reactor: Any = None) -> None:
        _bcrypt()
        self.path = path
        self._reactor = reactor
        self._mtime: Optional[float] = None
        self._users: Dict[bytes, bytes] = {}
        self._load()

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            return reactor
        return self._reactor

    def reload(self) -> None:
        """Re-read the file now (SIGHUP), changed or not."""
        self._load(force=True)

    def _load(self, force: bool = False) -> None:
        """(Re)read the file if it changed; a broken file keeps the old users."""
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self._mtime and not force:
                return
            with open(self.path, "rb") as f:
                users, skipped = parse_htpasswd(f.read())
        except OSError as e:
            if self._mtime is None or force:
                raise
            self.log.warn("cannot re-read {path}: {error}", path=self.path, error=e)
            return
        if skipped:
            self.log.warn(
                "{path}: {skipped} line(s) without a bcrypt hash were ignored",
                path=self.path,
                skipped=skipped,
            )
        self._users = users
        self._mtime = mtime

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:  # type: ignore[override]
        self._load()
        username = credentials.username
        if isinstance(username, str):
            username = username.encode("utf-8")
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        hashed = self._users.get(username)
        d = threads.deferToThreadPool(
            self.reactor,
            self.reactor.getThreadPool(),
            check_bcrypt,
            password,
            hashed or _DUMMY_HASH,
        )

        def decide(ok: bool) -> bytes:
            if ok and hashed is not None:
                return username  # type: ignore[no-any-return]
            raise UnauthorizedLogin()

        return d.addCallback(decide)


@implementer(ICheckerFactory, IPlugin)
class HtpasswdCheckerFactory:
    """The ``htpasswd`` entry of ``--auth`` (``twisted.cred.strcred``)."""

    authType = "htpasswd"
    authHelp = (
        "Username/password checked against an htpasswd file of bcrypt hashes "
        "(as written by 'htpasswd -B').  The file is re-read when it changes; "
        "bcrypt runs in a thread, off the reactor."
    )
    argStringFormat = "Path to the htpasswd file"
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> HtpasswdChecker:
        if not argstring:
            raise ValueError("htpasswd needs a file name: --auth htpasswd:FILE")
        return HtpasswdChecker(argstring)
