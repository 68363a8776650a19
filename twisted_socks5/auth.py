"""
The built-in authentication methods: no authentication (METHOD 0x00) and
username/password (METHOD 0x02, RFC 1929) checked through ``twisted.cred``.
"""

from __future__ import annotations

import hmac
from typing import Any, Optional, Union

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import LoginDenied, UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.interfaces import IAddress
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

from .codec import (
    MAX_USERPASS_SIZE,
    Method,
    UserPassStatus,
    parse_userpass_request,
)
from .interfaces import AuthResult, AuthStep, IAuthenticator, IAuthNegotiation


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


@implementer(IAuthNegotiation)
class _NoAuthNegotiation:
    max_message_size = 0

    def start(self) -> Optional[AuthResult]:
        return AuthResult()

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
        parsed = parse_userpass_request(data)
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
        return AuthResult(
            reply=UserPassStatus(0).to_bytes(),
            user=_text(avatar) if isinstance(avatar, (str, bytes)) else None,
            avatar=avatar,
        )

    def _failed(self, failure: Failure, user: str) -> AuthResult:
        if not failure.check(UnauthorizedLogin, LoginDenied):
            self.log.failure("credential check failed for {user!r}", failure, user=user)
        return AuthResult(
            reply=UserPassStatus(STATUS_FAILURE).to_bytes(),
            success=False,
            user=user,
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
