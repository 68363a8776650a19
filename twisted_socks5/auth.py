"""
The built-in authentication methods: no authentication (METHOD 0x00) and
username/password (METHOD 0x02, RFC 1929) checked through ``twisted.cred``.
"""

from __future__ import annotations

import hmac
import os
from typing import Any, Optional, Union

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import LoginDenied, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .codec import (
    MAX_USERPASS_SIZE,
    EmptyCredentials,
    Method,
    UserPassStatus,
    parse_userpass_request,
)
from .interfaces import AuthResult, AuthStep, IAuthenticator, IAuthNegotiation


class CheckerBusy(UnauthorizedLogin):
    """
    A checker cannot check now (its queue is full): the login is refused
    but not counted as a failure, which would throttle a client whose
    password may well be right.
    """


class IProxyUser(Interface):
    """The avatar interface the SOCKS server asks a ``twisted.cred`` realm for."""


@implementer(IRealm)
class ProxyRealm:
    """
    The default realm: the avatar is the avatar ID as text.

    A realm of your own can return a richer avatar (limits, allowed
    destinations) that later policy code reads from ``AuthResult.avatar``.
    """

    def requestAvatar(  # type: ignore[override]
        self, avatarId: Union[bytes, str], mind: object, *interfaces: Any
    ) -> tuple[Any, str, Any]:
        if IProxyUser not in interfaces:
            raise NotImplementedError("ProxyRealm only provides IProxyUser")
        return IProxyUser, _text(avatarId), lambda: None


def _text(value: Union[bytes, str]) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value


@implementer(IUsernamePassword)
class UsernamePassword:
    """
    RFC 1929 credentials.  Unlike ``twisted.cred.credentials.UsernamePassword``
    the password comparison takes constant time.
    """

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = username
        self.password = password

    def checkPassword(self, password: Union[bytes, str]) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        return hmac.compare_digest(self.password, password)

    def __repr__(self) -> str:
        return f"UsernamePassword({self.username!r}, <hidden>)"


#: METHOD 0x00's answer: immutable, so one for every connection.
_ANONYMOUS = AuthResult.granted()


@implementer(IAuthNegotiation)
class _NoAuthNegotiation:
    max_message_size = 0

    def start(self) -> Optional[AuthResult]:
        return _ANONYMOUS

    def data_received(self, data: bytes) -> Optional[AuthStep]:  # pragma: no cover
        return None


@implementer(IAuthenticator)
class NoAuthAuthenticator:
    """METHOD 0x00: everyone is let in, anonymously."""

    method = Method.NO_AUTHENTICATION
    name = "none"

    def negotiate(self, client: IAddress) -> IAuthNegotiation:
        return _NoAuthNegotiation()


#: RFC 1929 status sent on failure (any non-zero value means failure).
STATUS_FAILURE = 0x01


@implementer(IAuthNegotiation)
class _UserPassNegotiation:
    max_message_size = MAX_USERPASS_SIZE
    log = Logger()

    def __init__(self, portal: Portal) -> None:
        self._portal = portal

    def start(self) -> Optional[AuthResult]:
        return None

    def data_received(self, data: bytes) -> Optional[AuthStep]:
        try:
            parsed = parse_userpass_request(data)
        except EmptyCredentials:
            # Nothing to check, but RFC 1929 wants a status before the close.
            user = _text(data[2 : 2 + data[1]]) if len(data) > 1 else ""
            return AuthStep(len(data), self._refusal(user))
        if parsed is None:
            return None
        request, used = parsed
        credentials = UsernamePassword(request.username, request.password)
        d = self._portal.login(credentials, None, IProxyUser)
        user = _text(request.username)
        return AuthStep(
            used, d.addCallbacks(self._ok, self._failed, errbackArgs=(user,))
        )

    def _ok(self, result: tuple[Any, Any, Any]) -> AuthResult:
        _, avatar, _ = result
        return AuthResult.granted(
            reply=UserPassStatus(0).to_bytes(),
            user=_text(avatar) if isinstance(avatar, (str, bytes)) else None,
            avatar=avatar,
        )

    def _failed(self, failure: Failure, user: str) -> AuthResult:
        """
        Every failure refuses: a checker that raises anything (the ``unix``
        checker raises ``ValueError`` for a name holding NUL) lets nobody in.
        """
        if not failure.check(UnauthorizedLogin, LoginDenied, CancelledError):
            self.log.failure("credential check failed for {user!r}", failure, user=user)
        return self._refusal(user, busy=failure.check(CheckerBusy) is not None)

    @staticmethod
    def _refusal(user: str, busy: bool = False) -> AuthResult:
        return AuthResult.refused(
            reply=UserPassStatus(STATUS_FAILURE).to_bytes(), user=user, busy=busy
        )


@implementer(IAuthenticator)
class UsernamePasswordAuthenticator:
    """
    METHOD 0x02 (RFC 1929), checked by a ``twisted.cred`` portal whose realm
    provides :class:`IProxyUser` (see :class:`ProxyRealm`).
    """

    method = Method.USERNAME_PASSWORD
    name = "userpass"

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    @classmethod
    def from_checkers(cls, *checkers: Any) -> UsernamePasswordAuthenticator:
        """Build one from ``twisted.cred`` checkers with the default realm."""
        return cls(Portal(ProxyRealm(), checkers))

    def negotiate(self, client: IAddress) -> IAuthNegotiation:
        return _UserPassNegotiation(self.portal)


def unusable_credentials(description: str) -> Optional[str]:
    """
    Why an ``--auth`` description names credentials that cannot work (a
    password file that does not exist, ``memory`` without users), or
    ``None``.  Starting anyway would refuse every login.
    """
    kind, _, argument = description.partition(":")
    if kind in ("file", "htpasswd"):
        if not argument:
            return f"needs a file name (--auth {kind}:FILE)"
        if not os.path.isfile(argument):
            return f"no such file: {argument!r}"
    elif kind == "memory" and not argument:
        return "no users: --auth memory:USER:PASSWORD[:USER:PASSWORD...]"
    return None
