"""
twisted-socks5: a SOCKS5 (RFC 1928, RFC 1929) proxy server built on Twisted.
"""

from ._version import __version__
from .auth import NoAuthAuthenticator, ProxyRealm, UsernamePasswordAuthenticator
from .client import (
    REPLY_ERRORS,
    SOCKS5ClientEndpoint,
    SOCKS5Error,
    SOCKS5ReplyError,
)
from .codec import Address, AddressType, Command, ReplyCode
from .interfaces import (
    AuthResult,
    AuthStep,
    IAuthenticator,
    IAuthenticatorFactory,
    IAuthNegotiation,
)
from .outbound import DirectConnector, IOutboundConnector
from .rules import AllowAll, Decision, IPolicy, RulesError, RuleSet
from .server import SOCKS5ServerFactory, SOCKS5ServerProtocol

__all__ = [
    "REPLY_ERRORS",
    "Address",
    "AllowAll",
    "Decision",
    "IPolicy",
    "RuleSet",
    "RulesError",
    "SOCKS5ClientEndpoint",
    "SOCKS5Error",
    "SOCKS5ReplyError",
    "AddressType",
    "AuthResult",
    "AuthStep",
    "Command",
    "DirectConnector",
    "IAuthNegotiation",
    "IAuthenticator",
    "IAuthenticatorFactory",
    "IOutboundConnector",
    "NoAuthAuthenticator",
    "ProxyRealm",
    "ReplyCode",
    "SOCKS5ServerFactory",
    "SOCKS5ServerProtocol",
    "UsernamePasswordAuthenticator",
    "__version__",
]


def __getattr__(name: str) -> object:
    """``socks5_agent``, imported on first use (it brings ``twisted.web``)."""
    if name == "socks5_agent":
        from .agent import socks5_agent

        return socks5_agent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
