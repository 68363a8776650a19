"""
``twistd socks5``: command-line options and the service they build.
"""

from __future__ import annotations

import sys
from typing import Any, List, Optional

from twisted.application import service, strports
from twisted.cred.checkers import (
    AllowAnonymousAccess,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IAnonymous, IUsernamePassword
from twisted.cred.portal import Portal
from twisted.cred.strcred import AuthOptionMixin
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python import usage

from .auth import NoAuthAuthenticator, ProxyRealm, UsernamePasswordAuthenticator
from .interfaces import IAuthenticator, IAuthenticatorFactory
from .server import SOCKS5ServerFactory

DEFAULT_LISTEN = "tcp:1080:interface=127.0.0.1"

log = Logger()


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _timeout_or_off(value: str) -> Optional[float]:
    if value.lower() in ("0", "off", "none"):
        return None
    return _positive(value)


_positive.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]
_timeout_or_off.coerceDoc = "Seconds; 0 or 'off' disables it."  # type: ignore[attr-defined]


def find_authenticator_factory(name: str) -> IAuthenticatorFactory:
    """Find an :class:`IAuthenticatorFactory` plugin by its name."""
    for factory in getPlugins(IAuthenticatorFactory):
        if factory.name == name:
            return factory
    raise KeyError(name)


class Options(usage.Options, AuthOptionMixin):
    """Options for ``twistd socks5``."""

    synopsis = "[options]"
    longdesc = (
        "A SOCKS5 proxy server (RFC 1928, RFC 1929).  Without --auth it offers "
        "no authentication; with --auth it requires a username and password "
        "(checked by the twisted.cred checkers named with --auth), unless "
        "--auth anonymous is given too."
    )
    supportedInterfaces = (IUsernamePassword, IAnonymous)

    optParameters = [
        [
            "handshake-timeout",
            None,
            10.0,
            "Seconds a client has from connecting to a working tunnel "
            "(greeting, authentication, request and connect).",
            _positive,
        ],
        [
            "connect-timeout",
            None,
            10.0,
            "Seconds for the outbound connection, name resolution included; "
            "expiry answers 0x06 (TTL expired).",
            _positive,
        ],
        [
            "idle-timeout",
            None,
            None,
            "Close a tunnel after this many seconds without traffic either way "
            "(default: never).",
            _timeout_or_off,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["methods"] = []

    def opt_listen(self, endpoint: str) -> None:
        """
        Listen on this Twisted server endpoint string; may be repeated.
        Examples: tcp:1080:interface=::  ssl:1080:privateKey=key.pem:certKey=cert.pem
        unix:/run/socks5.sock  systemd:domain=INET6:index=0
        (default: tcp:1080:interface=127.0.0.1).
        """
        self["listen"].append(endpoint)

    def opt_method(self, spec: str) -> None:
        """
        Offer an authentication method provided by an IAuthenticatorFactory
        plugin, as NAME or NAME:ARGUMENT; may be repeated, in order of
        preference (offered before the built-in ones).
        """
        name, _, argument = spec.partition(":")
        try:
            factory = find_authenticator_factory(name)
        except KeyError:
            raise usage.UsageError(
                f"unknown authentication method plugin {name!r} (see --help-methods)"
            ) from None
        self["methods"].append((factory, argument))

    def opt_help_methods(self) -> None:
        """List the authentication method plugins that --method can use."""
        for factory in getPlugins(IAuthenticatorFactory):
            sys.stdout.write(f"  {factory.name:<12} {factory.description}\n")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]


def _bytes_memory_checkers(checkers: List[Any]) -> None:
    """
    strcred's ``memory:`` checker stores text, but RFC 1929 credentials are
    octets: store bytes so both compare alike.
    """
    for checker in checkers:
        if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
            checker.users = {
                (k.encode("utf-8") if isinstance(k, str) else k): (
                    v.encode("utf-8") if isinstance(v, str) else v
                )
                for k, v in checker.users.items()
            }


def build_authenticators(options: Options) -> List[IAuthenticator]:
    """Turn --auth and --method into the ordered list of methods offered."""
    interfaces = options.get("credInterfaces", {})
    password_checkers = list(interfaces.get(IUsernamePassword, []))
    anonymous = bool(interfaces.get(IAnonymous))
    _bytes_memory_checkers(password_checkers)
    portal = None
    if password_checkers:
        checkers = password_checkers + ([AllowAnonymousAccess()] if anonymous else [])
        portal = Portal(ProxyRealm(), checkers)
    authenticators: List[IAuthenticator] = [
        factory.build(argument, portal) for factory, argument in options["methods"]
    ]
    if portal is not None:
        authenticators.append(UsernamePasswordAuthenticator(portal))
    if anonymous or not (password_checkers or options["methods"]):
        authenticators.append(NoAuthAuthenticator())
    return authenticators


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    authenticators = build_authenticators(options)
    factory = SOCKS5ServerFactory(
        authenticators,
        reactor=reactor,
        handshake_timeout=options["handshake-timeout"],
        connect_timeout=options["connect-timeout"],
        idle_timeout=options["idle-timeout"],
    )
    top = service.MultiService()
    for description in options["listen"]:
        strports.service(description, factory, reactor=reactor).setServiceParent(top)
    names = ", ".join(f"0x{a.method:02x} ({a.name})" for a in authenticators)
    reactor.callWhenRunning(
        log.info,
        "twisted-socks5 listening on {listen}; methods offered: {methods}",
        listen=" ".join(options["listen"]),
        methods=names,
    )
    return top
