"""
Bearer tokens for twisted-socks5, two ways, from one token file:

* ``--method token:FILE``: a private SOCKS5 authentication METHOD (0x80),
  for clients you write yourself;
* ``--auth tokens:FILE``: a ``twisted.cred`` checker, so that any RFC 1929
  client (``curl -U alice:TOKEN``) can present the same token as a password.

The token file holds one ``NAME SHA256-HEX-OF-TOKEN`` line per token (``#``
starts a comment).  Only digests are stored: tokens are long and random, so a
fast hash is enough, and a leaked file gives nothing away.  The file is read
again whenever it changes (and, for the checker, on SIGHUP); a broken file
keeps the tokens read before.  Make a token with ``python3 socks5_tokens.py
NAME`` and add the line it prints.

The wire format of METHOD 0x80 (in RFC 1928's range for private methods)
mirrors RFC 1929::

    client -> server:  VER=0x01  TLEN (1 byte, 1-255)  TOKEN (TLEN bytes)
    server -> client:  VER=0x01  STATUS (0x00 success; anything else: failure,
                                         and the server closes)
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from typing import Any, List, Optional, Tuple, Union

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from twisted_socks5.codec import ProtocolError
from twisted_socks5.interfaces import (
    AuthResult,
    AuthStep,
    IAuthenticator,
    IAuthenticatorFactory,
    IAuthNegotiation,
)

#: The METHOD code: X'80' to X'FE' are reserved for private methods.
TOKEN_METHOD = 0x80
VERSION = 0x01
STATUS_OK = 0x00
STATUS_FAILURE = 0x01
#: VER + TLEN + the longest token.
MAX_MESSAGE_SIZE = 2 + 255

log = Logger()


# --------------------------------------------------------------------------
# The token file


def digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def parse_token_file(text: str) -> List[Tuple[str, bytes]]:
    """``[(name, digest)]`` from the text of a token file."""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            name, hex_digest = fields
            value = bytes.fromhex(hex_digest)
            if len(value) != hashlib.sha256().digest_size:
                raise ValueError(hex_digest)
            entries.append((name, value))
        except ValueError:
            raise ValueError(f"line {number}: expected NAME SHA256-HEX") from None
    return entries


class TokenFile:
    """
    The ``NAME SHA256-HEX`` lines of a token file, re-read when it changes.

    :param path: the file; it must exist when the server starts.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._mtime: Optional[float] = None
        self._entries: List[Tuple[str, bytes]] = []
        self._load()

    def reload(self) -> None:
        """Read the file now, changed or not; raise if it is broken."""
        self._load(force=True)

    def _load(self, force: bool = False) -> None:
        """Read the file if it changed; a broken file keeps the old tokens."""
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self._mtime and not force:
                return
            with open(self.path, encoding="utf-8") as f:
                entries = parse_token_file(f.read())
        except (OSError, ValueError) as e:
            if self._mtime is None or force:
                raise  # at start-up, or asked to: the caller hears of it
            log.warn("{path}: keeping the old tokens: {error}", path=self.path, error=e)
            return
        self._entries = entries
        self._mtime = mtime

    def owner(self, token: bytes) -> Optional[str]:
        """The name the token belongs to, or ``None``; compares every entry."""
        self._load()
        presented = digest(token)
        found = None
        for name, expected in self._entries:
            if hmac.compare_digest(presented, expected):
                found = name
        return found


# --------------------------------------------------------------------------
# METHOD 0x80 as an IAuthenticator


def parse_token_message(data: bytes) -> Optional[Tuple[bytes, int]]:
    """``(token, bytes used)``, or ``None`` until the whole message is here."""
    if not data:
        return None
    if data[0] != VERSION:
        # No status can be sent for a message we cannot read: the server closes.
        raise ProtocolError(f"token method: version {data[0]}, expected {VERSION}")
    if len(data) < 2:
        return None
    size = data[1]
    if size == 0:
        raise ProtocolError("token method: empty token")
    if len(data) < 2 + size:
        return None
    return bytes(data[2 : 2 + size]), 2 + size


@implementer(IAuthNegotiation)
class TokenNegotiation:
    """One client's token exchange: a single message, a single answer."""

    max_message_size = MAX_MESSAGE_SIZE

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def start(self) -> Optional[AuthResult]:
        return None  # the client speaks first

    def data_received(self, data: bytes) -> Optional[AuthStep]:
        parsed = parse_token_message(data)
        if parsed is None:
            return None
        token, used = parsed
        user = self.tokens.owner(token)
        if user is None:
            refused = AuthResult.refused(reply=bytes((VERSION, STATUS_FAILURE)))
            return AuthStep(used, refused)
        granted = AuthResult.granted(
            reply=bytes((VERSION, STATUS_OK)), user=user, avatar=user
        )
        return AuthStep(used, granted)


@implementer(IAuthenticator)
class TokenAuthenticator:
    """METHOD 0x80: a bearer token checked against a :class:`TokenFile`."""

    method = TOKEN_METHOD
    name = "token"

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def negotiate(self, client: IAddress) -> IAuthNegotiation:
        return TokenNegotiation(self.tokens)


@implementer(IAuthenticatorFactory, IPlugin)
class TokenAuthenticatorFactory:
    """The ``token`` plugin: ``twistd socks5 --method token:FILE``."""

    name = "token"
    description = "METHOD 0x80, a bearer token; token:FILE names the token file"

    def build(self, argument: str, portal: Any) -> IAuthenticator:
        if not argument:
            raise ValueError("the token method needs a file: --method token:FILE")
        return TokenAuthenticator(TokenFile(argument))


# --------------------------------------------------------------------------
# The same tokens as RFC 1929 passwords, through twisted.cred


def _octets(value: Union[bytes, str]) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(ICredentialsChecker)
class TokenChecker:
    """
    Accepts a username/password when the password is a token of that user.
    The avatar ID is the username (bytes), as ``twisted.cred`` checkers give.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    def reload(self) -> None:
        """Called on SIGHUP by ``twistd socks5`` (the server finds it by name)."""
        self.tokens.reload()

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:
        username = _octets(credentials.username)
        owner = self.tokens.owner(_octets(credentials.password))
        if owner is not None and hmac.compare_digest(_octets(owner), username):
            return defer.succeed(username)
        return defer.fail(UnauthorizedLogin())


@implementer(ICheckerFactory, IPlugin)
class TokenCheckerFactory:
    """The ``tokens`` checker: ``twistd socks5 --auth tokens:FILE``."""

    authType = "tokens"
    authHelp = (
        "Username and password, where the password is one of that user's "
        "bearer tokens from a token file of 'NAME SHA256-HEX' lines."
    )
    argStringFormat = "Path to the token file"
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> TokenChecker:
        if not argstring:
            raise ValueError("tokens needs a file name: --auth tokens:FILE")
        return TokenChecker(TokenFile(argstring))


def new_token(name: str) -> Tuple[str, str]:
    """A fresh token for ``name`` and the token-file line that admits it."""
    token = secrets.token_urlsafe(32)
    return token, f"{name} {digest(token.encode('ascii')).hex()}"


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write(f"usage: {argv[0]} NAME\n")
        return 2
    token, line = new_token(argv[1])
    sys.stdout.write(f"token (give it to {argv[1]}): {token}\n")
    sys.stdout.write(f"line for the token file:   {line}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
