"""
What a SOCKS5 reply code means, both ways, in one place.

The server side: :func:`reply_for_failure`, the one table that turns a failed
outbound connection (an errno, an exception class, an upstream's answer) into
the RFC 1928 REP code sent to the client.  The client side: the exceptions
:class:`~twisted_socks5.client.SOCKS5ClientEndpoint` fails with, one
:class:`SOCKS5ReplyError` subclass per REP code (:data:`REPLY_ERRORS`).  They
live together because the server passes an upstream's REP code on: the
table needs the client's errors, and neither side imports the other.
"""

from __future__ import annotations

import errno
from typing import Mapping, Optional, Sequence, Tuple, Type

from twisted.internet import defer, error
from twisted.internet.error import ConnectError
from twisted.python.failure import Failure

from .codec import ReplyCode

__all__ = [
    "REPLY_ERRORS",
    "AddressTypeNotSupported",
    "AuthenticationFailed",
    "CommandNotSupported",
    "ConnectionNotAllowed",
    "ConnectionRefused",
    "GeneralServerFailure",
    "HandshakeTimeout",
    "HostUnreachable",
    "MalformedReply",
    "NetworkUnreachable",
    "NoAcceptableMethods",
    "PolicyDenied",
    "ProxyConnectionLost",
    "SOCKS5Error",
    "SOCKS5ReplyError",
    "TTLExpired",
    "reply_error",
    "reply_for_failure",
]

# --------------------------------------------------------------------------
# The client's errors


class SOCKS5Error(ConnectError):
    """
    The SOCKS5 handshake failed.  A ``ConnectError``, so code that handles
    failed connections in general handles these too.
    """

    def __init__(self, message: str) -> None:
        super().__init__(string=message)

    def __str__(self) -> str:
        return str(self.args[0])


class SOCKS5ReplyError(SOCKS5Error):
    """
    The server answered the request with a failure REP code.  Known codes
    raise the subclass for that code; unknown ones (Tor's 0xF0-0xF7, say)
    raise this class with ``code`` set.
    """

    code: int

    def __init__(self, code: Optional[int] = None) -> None:
        if code is None:
            code = getattr(type(self), "code", None)
            if code is None:
                raise TypeError("SOCKS5ReplyError needs a reply code")
        self.code = code
        try:
            phrase = ReplyCode(code).phrase
        except ValueError:
            phrase = "unknown reply code"
        super().__init__(f"SOCKS5 server replied 0x{code:02x}: {phrase}")


class GeneralServerFailure(SOCKS5ReplyError):
    code = ReplyCode.GENERAL_FAILURE


class ConnectionNotAllowed(SOCKS5ReplyError):
    code = ReplyCode.CONNECTION_NOT_ALLOWED


class NetworkUnreachable(SOCKS5ReplyError):
    code = ReplyCode.NETWORK_UNREACHABLE


class HostUnreachable(SOCKS5ReplyError):
    code = ReplyCode.HOST_UNREACHABLE


class ConnectionRefused(SOCKS5ReplyError):
    """The target refused the proxy's connection (not the proxy refusing ours)."""

    code = ReplyCode.CONNECTION_REFUSED


class TTLExpired(SOCKS5ReplyError):
    code = ReplyCode.TTL_EXPIRED


class CommandNotSupported(SOCKS5ReplyError):
    code = ReplyCode.COMMAND_NOT_SUPPORTED


class AddressTypeNotSupported(SOCKS5ReplyError):
    code = ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED


#: REP code -> the exception class raised for it.
REPLY_ERRORS: Mapping[int, Type[SOCKS5ReplyError]] = {
    cls.code: cls
    for cls in (
        GeneralServerFailure,
        ConnectionNotAllowed,
        NetworkUnreachable,
        HostUnreachable,
        ConnectionRefused,
        TTLExpired,
        CommandNotSupported,
        AddressTypeNotSupported,
    )
}


def reply_error(code: int) -> SOCKS5ReplyError:
    """The exception for a failure REP code, known or not."""
    cls = REPLY_ERRORS.get(code)
    return cls() if cls is not None else SOCKS5ReplyError(code)


class NoAcceptableMethods(SOCKS5Error):
    """The server accepts none of the offered methods (it answered ``05 FF``)."""

    def __init__(self, offered: Sequence[int]) -> None:
        self.offered = tuple(offered)
        names = ", ".join(f"0x{m:02x}" for m in self.offered)
        super().__init__(f"SOCKS5 server accepts none of the methods offered ({names})")


class AuthenticationFailed(SOCKS5Error):
    """The server rejected the username and password (RFC 1929 status != 0)."""

    def __init__(self, status: int) -> None:
        self.status = status
        super().__init__(f"SOCKS5 authentication failed (status 0x{status:02x})")


class MalformedReply(SOCKS5Error):
    """The server sent something RFC 1928/1929 does not allow."""


class ProxyConnectionLost(SOCKS5Error):
    """The proxy connection ended before the handshake completed."""

    def __init__(self, reason: Failure) -> None:
        self.reason = reason
        super().__init__(
            "SOCKS5 proxy connection lost during the handshake: "
            + reason.getErrorMessage()
        )


class HandshakeTimeout(SOCKS5Error):
    """No successful reply within the endpoint's timeout."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        super().__init__(f"SOCKS5 connection not established within {timeout:g} s")


# --------------------------------------------------------------------------
# The server's table: a failed outbound connection -> REP


#: errno values that carry a more precise meaning than their exception class.
_ERRNO_REPLIES = {
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: ReplyCode.HOST_UNREACHABLE,
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
    errno.EACCES: ReplyCode.CONNECTION_NOT_ALLOWED,
    errno.EPERM: ReplyCode.CONNECTION_NOT_ALLOWED,
}


_REPLY_CODES = frozenset(int(code) for code in ReplyCode)


class PolicyDenied(Exception):
    """Every address the destination resolved to is denied by the rules."""

    def __init__(self, rule: str) -> None:
        super().__init__(f"denied by {rule}")
        self.rule = rule


#: Exception classes, most specific first.
_CLASS_REPLIES: Tuple[Tuple[type, ReplyCode], ...] = (
    (PolicyDenied, ReplyCode.CONNECTION_NOT_ALLOWED),
    (error.ConnectionRefusedError, ReplyCode.CONNECTION_REFUSED),
    (error.DNSLookupError, ReplyCode.HOST_UNREACHABLE),
    (error.NoRouteError, ReplyCode.NETWORK_UNREACHABLE),
    (error.TCPTimedOutError, ReplyCode.TTL_EXPIRED),
    (error.TimeoutError, ReplyCode.TTL_EXPIRED),
    (defer.TimeoutError, ReplyCode.TTL_EXPIRED),
    (defer.CancelledError, ReplyCode.TTL_EXPIRED),
)


def reply_for_failure(failure: Failure) -> ReplyCode:
    """
    Map a failed outbound connection to the RFC 1928 reply code.

    The ``errno`` of the failure decides first, then its class:

    - ``ECONNREFUSED``, ``ConnectionRefusedError``: 0x05 connection refused;
    - ``DNSLookupError`` (the name does not resolve; with ``--resolver``
      also SERVFAIL, REFUSED, a DNS timeout, and no address of
      ``--prefer``'s family: :class:`~twisted_socks5.resolver.LookupFailed`),
      ``EHOSTUNREACH``, ``EHOSTDOWN``, ``EADDRNOTAVAIL``: 0x04 host
      unreachable;
    - ``ENETUNREACH``, ``ENETDOWN``, ``NoRouteError``: 0x03 network unreachable;
    - a connect timeout, ours or the kernel's (``ETIMEDOUT``): 0x06 TTL
      expired, as Tor does: it tells the client the attempt ran out of time,
      which 0x04 would hide;
    - ``EACCES``, ``EPERM`` (a local firewall), :class:`PolicyDenied` (the
      access rules denied every address of the name): 0x02 not allowed;
    - through ``--upstream``: the upstream's own reply code when it sent
      one, 0x06 when its handshake timed out, else 0x01;
    - anything else: 0x01 general failure.
    """
    value = failure.value
    if isinstance(value, SOCKS5ReplyError) and value.code in _REPLY_CODES:
        return ReplyCode(value.code)  # an upstream's answer, passed on
    if isinstance(value, HandshakeTimeout):
        return ReplyCode.TTL_EXPIRED
    if isinstance(value, SOCKS5Error):
        return ReplyCode.GENERAL_FAILURE
    number = getattr(value, "osError", None)
    if not isinstance(number, int):
        number = getattr(value, "errno", None)
    if isinstance(number, int) and number in _ERRNO_REPLIES:
        return _ERRNO_REPLIES[number]
    for cls, code in _CLASS_REPLIES:
        if isinstance(value, cls):
            return code
    return ReplyCode.GENERAL_FAILURE
