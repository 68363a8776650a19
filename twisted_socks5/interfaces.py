"""
The interfaces others implement to extend the server.

An authentication method is an :class:`IAuthenticator`: it owns one SOCKS
METHOD code and runs that method's sub-negotiation through a fresh
:class:`IAuthNegotiation` per connection.  Packages ship new methods as
:class:`IAuthenticatorFactory` plugins (``twisted.plugin``), found by name from
``twistd socks5 --method NAME``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.plugin import IPlugin
from zope.interface import Attribute, Interface


@dataclass(frozen=True)
class AuthResult:
    """
    The outcome of one step of a method's sub-negotiation.

    Build it with :meth:`granted`, :meth:`refused` or :meth:`more`.  The
    outcome has no default, so that a method can never let a client in by
    omission: ``AuthResult(reply=...)`` alone is a :class:`TypeError`.
    Keyword construction stays for older methods when it says what it
    means: ``success=True`` or ``success=False`` (a bool, nothing else), or
    ``done=False`` for another round.

    :ivar reply: bytes to send to the client (may be empty).
    :ivar done: ``False`` when the method needs another client message.
    :ivar success: once ``done``, whether the client is authenticated; a
        failure closes the connection once ``reply`` has been sent.  Never
        ``True`` unless the method said so.
    :ivar user: the authenticated identity for rules and logs, or ``None``
        for anonymous access.
    :ivar avatar: whatever the method's back end returned (a
        ``twisted.cred`` avatar, for instance), for per-user policy.
    :ivar busy: a refusal because the back end could not check now (its
        queue is full), not because the credentials were wrong: it is not
        counted as a failed login, so a flood cannot get others throttled.
    """

    reply: bytes = b""
    done: bool = True
    success: Optional[bool] = None
    user: Optional[str] = None
    avatar: Any = None
    busy: bool = False

    def __post_init__(self) -> None:
        if self.done is not True and self.done is not False:
            raise TypeError(f"AuthResult.done must be a bool, not {self.done!r}")
        if not self.done:
            if self.success is not None and self.success is not False:
                raise TypeError("an AuthResult that needs more cannot grant")
        elif self.success is not True and self.success is not False:
            raise TypeError(
                "AuthResult needs an outcome: AuthResult.granted(...), "
                "AuthResult.refused(...) or AuthResult.more(...)"
            )
        if self.busy and (not self.done or self.success is not False):
            raise TypeError("only a refusal can be busy")

    @classmethod
    def granted(
        cls, reply: bytes = b"", user: Optional[str] = None, avatar: Any = None
    ) -> AuthResult:
        """The client is authenticated (as ``user``, or anonymously)."""
        return cls(reply=reply, success=True, user=user, avatar=avatar)

    @classmethod
    def refused(
        cls, reply: bytes = b"", user: Optional[str] = None, busy: bool = False
    ) -> AuthResult:
        """The client is not let in: ``reply`` is sent, then the connection closes."""
        return cls(reply=reply, success=False, user=user, busy=busy)

    @classmethod
    def more(cls, reply: bytes = b"") -> AuthResult:
        """Send ``reply`` and wait for another client message."""
        return cls(reply=reply, done=False)

    @property
    def outcome(self) -> str:
        """``"granted"``, ``"refused"`` or ``"more"``."""
        if not self.done:
            return "more"
        return "granted" if self.success is True else "refused"


@dataclass(frozen=True)
class AuthStep:
    """One client message taken by a negotiation: bytes used and the outcome."""

    consumed: int
    result: Union[AuthResult, Deferred[AuthResult]]


class IAuthNegotiation(Interface):
    """The sub-negotiation of one method on one connection."""

    max_message_size = Attribute(
        "The most bytes one client message of this method can take; the "
        "server drops a client that sends more without completing one."
    )

    def start() -> Optional[AuthResult]:
        """
        Called right after the method is selected.  Return a result when the
        method completes without client input (METHOD 0x00 does), else
        ``None`` to wait for :meth:`data_received`.
        """

    def data_received(data: bytes) -> Optional[AuthStep]:
        """
        Look at the bytes buffered so far.  Return ``None`` if they do not yet
        hold a whole message, else an :class:`AuthStep`.  Raise
        :class:`twisted_socks5.codec.ProtocolError` on malformed input: the
        server closes the connection.  Slow checks return a Deferred result
        and must not block the reactor.
        """


class IAuthenticator(Interface):
    """One SOCKS authentication METHOD."""

    method = Attribute("The METHOD code this authenticator answers to (0-254).")
    name = Attribute("A short name for logs and configuration, e.g. 'userpass'.")

    def negotiate(client: IAddress) -> IAuthNegotiation:
        """Start a sub-negotiation for a client that selected this method."""


class IAuthenticatorFactory(IPlugin):
    """
    A ``twisted.plugin`` that makes an :class:`IAuthenticator`.

    Put an object providing this interface in a module under your package's
    ``twisted/plugins/`` directory and ``twistd socks5 --method NAME`` finds it.
    """

    name = Attribute("The name used with --method.")
    description = Attribute("One line for --help-methods.")

    def build(argument: str, portal: Any) -> IAuthenticator:
        """
        Make the authenticator.  ``argument`` is what followed ``NAME:`` on
        the command line (or ``""``); ``portal`` is the ``twisted.cred``
        portal built from ``--auth`` (or ``None``), for methods that check
        credentials.
        """
