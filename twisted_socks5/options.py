"""
The command line of ``twistd socks5``: the options, their checks and
defaults, and the authentication methods they choose.  The service they
build is :mod:`twisted_socks5.tap`'s.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.cred.checkers import (
    AllowAnonymousAccess,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.credentials import IAnonymous, IUsernamePassword
from twisted.cred.portal import Portal
from twisted.cred.strcred import AuthOptionMixin
from twisted.internet.endpoints import serverFromString
from twisted.plugin import getPlugins
from twisted.python import usage

from ._version import version_line
from .accesslog import Rotation
from .addresses import by_family
from .auth import (
    NoAuthAuthenticator,
    ProxyRealm,
    UsernamePasswordAuthenticator,
    unusable_credentials,
)
from .codec import Command
from .connection import PROTOCOLS
from .exposure import check_limits_store, refuse_open_relay
from .interfaces import IAuthenticator, IAuthenticatorFactory
from .limits import DEFAULT_IPV6_CLIENT_PREFIX
from .outgoing import ROTATIONS, OutgoingAddresses, check_on_host
from .resolver import DNSServer, FamilyPreference, parse_servers, read_hosts
from .rules import RulesError, RulesFile
from .rules.rule import ROUTE_NAME
from .selfnet import default_host
from .server import DEFAULT_SPLICE_AFTER
from .workers import worker_count

DEFAULT_LISTEN = "tcp:1080:interface=127.0.0.1"


def _positive(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _timeout_or_off(value: str) -> Optional[float]:
    if value.lower() in ("0", "off", "none"):
        return None
    return _positive(value)


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be 0 or more")
    return number


_count.coerceDoc = "A whole number, 0 or more."  # type: ignore[attr-defined]


def _prefix_length(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 128:
        raise ValueError("must be an IPv6 prefix length, 0 to 128")
    return number


_prefix_length.coerceDoc = "0 to 128."  # type: ignore[attr-defined]


def _port_range(value: str) -> Tuple[int, int]:
    low, sep, high = value.partition("-")
    ports = (int(low), int(high if sep else low))
    if not 1 <= ports[0] <= ports[1] <= 65535:
        raise ValueError("must be LOW-HIGH with 1 <= LOW <= HIGH <= 65535")
    return ports


_port_range.coerceDoc = "LOW-HIGH, e.g. 40000-40999, or one port."  # type: ignore[attr-defined]


def _dns_servers(value: str) -> List[DNSServer]:
    return parse_servers(value)


_dns_servers.coerceDoc = "For example udp:192.0.2.53,tcp:[2001:db8::53]:53."  # type: ignore[attr-defined]


def _hosts_file(path: str) -> str:
    try:
        read_hosts(path)
    except OSError as e:
        raise ValueError(f"cannot read {path!r}: {e.strerror}") from None
    return path


def _addresses(value: str) -> Tuple[str, ...]:
    return tuple(by_family(value.split(",")).values())


_addresses.coerceDoc = "IP addresses, comma-separated, one per family."  # type: ignore[attr-defined]


def _local_addresses(value: str) -> Tuple[str, ...]:
    """:func:`_addresses` that this host can bind (checked at start)."""
    addresses = _addresses(value)
    for ip in addresses:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            try:
                s.bind((ip, 0))
            except OSError as e:
                why = f"{ip} is no address of this host ({e.strerror})"
                raise ValueError(why) from None
    return addresses


_local_addresses.coerceDoc = _addresses.coerceDoc  # type: ignore[attr-defined]


_COMMANDS = {
    "connect": Command.CONNECT,
    "bind": Command.BIND,
    "udp": Command.UDP_ASSOCIATE,
}


def _commands(value: str) -> List[Command]:
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in _COMMANDS]
    if unknown or not names:
        raise ValueError(f"unknown command(s) {unknown}; use connect, bind, udp")
    return [_COMMANDS[n] for n in names]


def _protocols(value: str) -> Tuple[str, ...]:
    names = [n.strip().lower() for n in value.split(",")]
    if not value.strip() or "" in names:
        raise ValueError("empty protocol name; use socks5, socks4, http")
    unknown = [n for n in names if n not in PROTOCOLS]
    if unknown:
        raise ValueError(f"unknown protocol(s) {unknown}; use socks5, socks4, http")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"{', '.join(twice)} named twice")
    return tuple(names)


_protocols.coerceDoc = ""  # type: ignore[attr-defined]  # the help lists them
_positive.coerceDoc = "Seconds, greater than 0."  # type: ignore[attr-defined]


def _rotation(value: str) -> str:
    if value not in ROTATIONS:
        raise ValueError(f"unknown rotation {value!r}; use {', '.join(ROTATIONS)}")
    return value


_rotation.coerceDoc = ""  # type: ignore[attr-defined]  # the help lists them
_timeout_or_off.coerceDoc = "Seconds; 0 or 'off' disables it."  # type: ignore[attr-defined]


def escape_ipv6_interface(description: str) -> str:
    """
    Escape the colons of an IPv6 literal given as ``interface=``, so that
    ``tcp:1080:interface=::`` means what it says (Twisted's endpoint syntax
    would otherwise read each colon as a separator).
    """
    key = "interface="
    start = description.find(key)
    if start < 0:
        return description
    start += len(key)
    rest = description[start:]
    if "\\" in rest or ":" not in rest:
        return description
    best = None
    for end in range(1, len(rest) + 1):
        if end < len(rest) and rest[end] != ":":
            continue
        candidate = rest[:end]
        try:
            ipaddress.IPv6Address(candidate.split("%", 1)[0])
        except ValueError:
            continue
        best = candidate
    if best is None:
        return description
    escaped = best.replace(":", "\\:")
    return description[:start] + escaped + rest[len(best) :]


def find_authenticator_factory(name: str) -> IAuthenticatorFactory:
    """Find an :class:`IAuthenticatorFactory` plugin by its name."""
    for factory in getPlugins(IAuthenticatorFactory):
        if factory.name == name:
            return factory
    raise KeyError(name)


def _naming(name: str, coerce: Callable[[str], Any]) -> Callable[[str], Any]:
    """``coerce``, whose errors name the option: "--handshake-timeout: ..."."""

    def coerce_named(value: str) -> Any:
        try:
            return coerce(value)
        except ValueError as e:
            why = str(e)
            if why.startswith(("could not convert", "invalid literal")):
                why = f"not a number: {value!r}"
            raise usage.UsageError(f"--{name}: {why}") from None

    coerce_named.coerceDoc = getattr(coerce, "coerceDoc", "")  # type: ignore[attr-defined]
    return coerce_named


def _with_named_errors(specs: List[List[Any]]) -> List[List[Any]]:
    """The option table with each value check's errors naming its option."""
    return [
        [*spec[:4], _naming(spec[0], spec[4])] if len(spec) > 4 and spec[4] else spec
        for spec in specs
    ]


#: ``usage.Options.optParameters``: name, short, default, help, value check.
def _limits_store(text: str) -> str:
    from .limiting import parse_store_url

    return parse_store_url(text)


def _store_failure_mode(text: str) -> str:
    if text not in ("open", "closed"):
        raise ValueError(f"open or closed, not {text!r}")
    return text


_PARAMETERS: List[List[Any]] = [
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
        "(default: never)",
        _timeout_or_off,
    ],
    [
        "stall-timeout",
        None,
        300.0,
        "Close a tunnel that moved nothing for this many seconds while data "
        "waits for a peer that does not read (such a peer may be gone "
        "unnoticed); 0 or 'off' never does.",
        _timeout_or_off,
    ],
    [
        "bind-timeout",
        None,
        120.0,
        "Seconds a BIND waits for its peer to connect; expiry answers 0x06.",
        _positive,
    ],
    [
        "max-connections",
        None,
        None,
        "Client connections open at once, all clients together; over it a "
        "new client is closed at once (default: the descriptor limit, "
        "raised to its hard maximum at start, less a reserve, divided by "
        "3; UDP associations count the four they may hold, busy tunnels' "
        "splice pipes only use descriptors left over, and new clients are "
        "refused before the process runs out; 0: no limit)",
        _count,
    ],
    [
        "splice-after",
        None,
        DEFAULT_SPLICE_AFTER,
        "Bytes (both ways together) a tunnel relays by copying before the "
        "zero-copy splice relay takes over; short tunnels never pay for its "
        "pipes. 0: splice from the first byte.",
        _count,
    ],
    [
        "max-connections-per-client",
        None,
        None,
        "Connections open at once from one client (see --ipv6-client-prefix; "
        "default: a quarter of "
        "--max-connections, so that no one client holds every slot; 0: no "
        "limit).",
        _count,
    ],
    [
        "udp-idle-timeout",
        None,
        300.0,
        "Close a UDP association after this many seconds without a datagram "
        "either way; 0 or 'off' never does.",
        _timeout_or_off,
    ],
    [
        "bind-ports",
        None,
        None,
        "The ports, as LOW-HIGH, a BIND for 0.0.0.0:PORT may listen on as "
        "the client asks (some clients, such as Dante's, need the port they "
        "ask for); by default, and outside the range, the system picks one.",
        _port_range,
    ],
    [
        "auth-failures",
        None,
        5,
        "Failed logins from one client (see --ipv6-client-prefix), within "
        "--auth-failure-window, after which that client is refused until "
        "they age out, at connect and on the connections it holds open "
        "(0: never).",
        _count,
    ],
    [
        "auth-failure-window",
        None,
        60.0,
        "Seconds a failed login counts for --auth-failures.",
        _positive,
    ],
    [
        "ipv6-client-prefix",
        None,
        DEFAULT_IPV6_CLIENT_PREFIX,
        "IPv6 clients in one network of this prefix length count as one "
        "client for --max-connections-per-client, --auth-failures and the "
        "one-check-at-a-time rule (128: each address on its own).",
        _prefix_length,
    ],
    [
        "drain-timeout",
        None,
        10.0,
        "On stop: seconds open tunnels may take to finish before they are "
        "cut (new clients are refused meanwhile).",
        _positive,
    ],
    [
        "rules",
        None,
        None,
        "Access rules file (first match wins; see the docs for the format). "
        "Re-read on SIGHUP; a broken file keeps the rules in force.",
    ],
    [
        "metrics",
        None,
        None,
        "Serve Prometheus metrics at /metrics on this endpoint, e.g. "
        "tcp:9180:interface=127.0.0.1 (needs prometheus_client: "
        "pip install 'twisted-socks5[metrics]').",
    ],
    [
        "workers",
        None,
        1,
        "Reactor processes serving the same ports (tcp: endpoints only); "
        "'auto' starts one per CPU.  Dead workers are restarted.",
        worker_count,
    ],
    [
        "commands",
        None,
        "connect,bind,udp",
        "The commands served, comma-separated, from connect, bind and udp; "
        "the others are answered 0x07.",
        _commands,
    ],
    [
        "outgoing-rotation",
        None,
        "none",
        "How each connection picks its source among a family's --outgoing "
        "addresses: none (the first), round-robin, random, or same-as-listen "
        "(the address the client connected to, when the set holds it; else "
        "the first).",
        _rotation,
    ],
    [
        "resolver",
        None,
        None,
        "Resolve names through these DNS servers (twisted.names, no threads) "
        "instead of the system resolver: [udp:|tcp:]IP[:PORT], "
        "comma-separated, tried in order; answers are cached for their TTL "
        "(5 s to 1 h), /etc/hosts answers first unless --hosts says "
        "otherwise.  A failed look-up answers 0x04 (host unreachable)",
        _dns_servers,
    ],
    [
        "hosts",
        None,
        None,
        "A hosts file (IP NAME [ALIAS...]) whose names resolve without "
        "asking: before --resolver's servers, or before the system resolver "
        "without it.  Re-read on SIGHUP (with the cache forgotten).",
        _hosts_file,
    ],
    [
        "prefer",
        None,
        None,
        "Address family of a name's addresses the rules allowed: ipv4 or "
        "ipv6 tries that family first, ipv4-only or ipv6-only uses only it "
        "(a name left with none answers 0x04); default: the resolver's "
        "order.  IP addresses in requests are used as given.",
        FamilyPreference,
    ],
    [
        "udp-bind",
        None,
        None,
        "The address UDP relay sockets bind to, one per family (IPv4,IPv6), "
        "the one of the client's family (default: the address the client "
        "reached, as for a family not given; a wildcard such as 0.0.0.0 "
        "binds every address)",
        _local_addresses,
    ],
    [
        "udp-ports",
        None,
        None,
        "The ports, as LOW-HIGH, UDP relay sockets take (for a firewall or a "
        "port forwarding); when none is free the UDP ASSOCIATE gets 0x01 and "
        "a warning is logged (default: ports the system picks)",
        _port_range,
    ],
    [
        "udp-advertise",
        None,
        None,
        "The address a UDP ASSOCIATE reply names (BND.ADDR), one per family, "
        "e.g. the public address of a NAT in front (default: the address "
        "bound)",
        _addresses,
    ],
    [
        "bind-advertise",
        None,
        None,
        "The address BIND's first reply names (BND.ADDR), one per family, e.g. "
        "the public address of a NAT in front (default: the address bound)",
        _addresses,
    ],
    # i15-socks4: the protocols a listener speaks.
    [
        "protocols",
        None,
        "socks5",
        "The protocols served, comma-separated, from socks5, socks4 (SOCKS4 "
        "and SOCKS4a) and http (an HTTP proxy), on every --listen endpoint: "
        "each client's first byte tells which it speaks.",
        _protocols,
    ],
    # i14-core: the counters of the rules' limit lines.
    [
        "limits-store",
        None,
        "memory",
        "Where the rules' limit lines keep their counters: memory (this "
        "process; quota usage saved to --state-file), or redis://HOST:PORT/DB "
        "or rediss://HOST:PORT/DB (TLS), shared by every process using it.",
        _limits_store,
    ],
    [
        "state-file",
        None,
        None,
        "With --limits-store memory: the file quota usage is saved to "
        "(atomically, every few seconds and at stop) and read at start, so "
        "quotas survive a restart (default: kept in memory only).",
    ],
    [
        "limits-on-store-failure",
        None,
        "closed",
        "When the limits store cannot answer: closed refuses requests that a "
        "sessions or quota line applies to (0x02), open lets them through; "
        "rate lines let requests through either way.",
        _store_failure_mode,
    ],
    # i16-log: the access log.
    [
        "access-log",
        None,
        None,
        "Write one JSON line per finished tunnel or refused request to this "
        "file ('-': standard output); reopened on SIGHUP and SIGUSR1 "
        "(logrotate).",
    ],
    [
        "access-log-rotate",
        None,
        "none",
        "How --access-log rotates: none (leave it to logrotate), daily, or "
        "size:BYTES[:KEEP] (BYTES may end in K, M or G; KEEP old files).",
        Rotation,
    ],
    # i16-console: the live console
    [
        "admin",
        None,
        None,
        "Serve the live console (open tunnels, per-user totals, close, "
        "reload) and its JSON API on this endpoint, e.g. "
        "tcp:8081:interface=127.0.0.1 or ssl:8443:... (a bare port: on "
        "127.0.0.1); needs --admin-auth; not with --workers (default: off).",
    ],
]


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
    #: The --rules file, once parsed.
    policy: Any = None
    #: Whether parsing failed (twistd then prints a short usage).
    _failed = False

    optParameters = _with_named_errors(_PARAMETERS)

    optFlags = [
        [
            "no-splice",
            None,
            "Relay through user space only (no os.splice zero-copy path, which "
            "is otherwise used for plain TCP tunnels on Linux).",
        ],
        [
            "allow-open-relay",
            None,
            "Start even when listening beyond loopback with neither a password "
            "nor a client allow-list in --rules (an open proxy for anyone).",
        ],
        [
            "allow-self-destinations",
            None,
            "Let clients reach the proxy host itself (loopback, its own "
            "addresses) when listening beyond loopback; by default only rules "
            "that name 'self' (allow ... to self) can allow it.",
        ],
        [
            "udp-allow-unknown-sources",
            None,
            "Relay UDP datagrams to a client from addresses it never sent to "
            "(needed by some NAT traversal); by default they are dropped.",
        ],
        # i14-core
        [
            "metrics-per-user",
            None,
            "Label --metrics' limit refusals by user too (one series per user "
            "refused: use it when the users are few).",
        ],
        # i16-log: revocation.
        [
            "keep-tunnels-on-reload",
            None,
            "On SIGHUP, re-read rules and password files but leave every open "
            "tunnel as it is (by default those the new ones no longer allow "
            "are closed).",
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["methods"] = []
        #: Upstream servers by route name; ``None`` is the default route.
        self["upstreams"] = {}
        #: --outgoing address lists by route name; ``None``: the default set.
        self["outgoing"] = {}
        #: --admin-auth's checkers (i16-console).
        self["admin-auth"] = []

    def opt_upstream(self, spec: str) -> None:
        from twisted.internet import reactor

        from .outbound import parse_upstream

        name: Optional[str] = None
        head, sep, rest = spec.partition("=")
        if sep and head and "://" not in head and ":" not in head:
            name, spec = head, rest
        if name in self["upstreams"]:
            raise usage.UsageError(f"--upstream {name or '(default)'} given twice")
        try:
            parse_upstream(reactor, spec)
        except Exception as e:  # noqa: BLE001 - any parse error is a usage error
            raise usage.UsageError(f"--upstream: {e}") from None
        self["upstreams"][name] = spec

    opt_upstream.__doc__ = (
        "Send CONNECT requests through this SOCKS5 server: "
        "socks5://[USER:PASS@]HOST:PORT, socks5+tls://...[?ca=CA.pem"
        "&servername=NAME] (certificate and name verified), or a client "
        "endpoint string.  As NAME=URL (repeatable) it is a route that access "
        "rules choose with 'via NAME'; without NAME, the default route."
    )

    def opt_outgoing(self, spec: str) -> None:
        name: Optional[str] = None
        head, sep, rest = spec.partition("=")
        if sep:
            name, spec = head, rest
            if not ROUTE_NAME.fullmatch(name) or name == "direct":
                raise usage.UsageError(
                    f"--outgoing: bad route name {name!r} (letters, digits, '-', "
                    "'_'; 'direct' is the default set, given without a name)"
                )
        if name in self["outgoing"]:
            raise usage.UsageError(f"--outgoing {name or '(default)'} given twice")
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
        try:
            OutgoingAddresses(entries)
        except ValueError as e:
            raise usage.UsageError(f"--outgoing {spec!r}: {e}") from None
        self["outgoing"][name] = entries

    opt_outgoing.__doc__ = (
        "Source addresses of outbound connections (and UDP relay sockets), "
        "as ADDRESS[,ADDRESS...]; an IPv6 prefix (2001:db8:1::/64) gives a "
        "random address of it per connection (IP_FREEBIND).  Each family "
        "uses its own addresses; a family without any gets the system's "
        "choice.  As NAME=ADDRESS[,...] (repeatable) it is a route that access "
        "rules choose with 'via NAME', like --upstream NAME=URL."
    )

    def opt_listen(self, endpoint: str) -> None:
        description = escape_ipv6_interface(endpoint)
        from twisted.internet import reactor

        try:
            serverFromString(reactor, description)
        except Exception as e:  # noqa: BLE001 - any parser error is a usage error
            raise usage.UsageError(f"--listen {endpoint!r}: {e!r}") from None
        self["listen"].append(description)

    # One line each: usage.Options prints docstrings' indentation as is.
    opt_listen.__doc__ = (
        "Listen on this Twisted server endpoint string; may be repeated.  "
        "Examples: tcp:1080:interface=:: "
        "ssl:1080:privateKey=key.pem:certKey=cert.pem unix:/run/socks5.sock "
        "systemd:domain=INET6:index=0 haproxy:tcp:1080 "
        "(default: tcp:1080:interface=127.0.0.1)."
    )

    def opt_auth(self, description: str) -> None:
        problem = unusable_credentials(description)
        if problem is not None:
            kind = description.partition(":")[0]
            raise usage.UsageError(f"--auth {kind}: {problem}")
        AuthOptionMixin.opt_auth(self, description)

    opt_auth.__doc__ = AuthOptionMixin.opt_auth.__doc__

    def opt_admin_auth(self, description: str) -> None:
        self["admin-auth"].append(_admin_checker(description))

    opt_admin_auth.__doc__ = (
        "A twisted.cred checker (as --auth takes: memory:, file:, unix, "
        "htpasswd:...) for the --admin console's users, separate from the "
        "SOCKS users; repeatable."
    )

    def opt_method(self, spec: str) -> None:
        name, _, argument = spec.partition(":")
        try:
            factory = find_authenticator_factory(name)
        except KeyError:
            raise usage.UsageError(
                f"unknown authentication method plugin {name!r} (see --help-methods)"
            ) from None
        self["methods"].append((factory, argument))

    opt_method.__doc__ = (
        "Offer an authentication method provided by an IAuthenticatorFactory "
        "plugin, as NAME or NAME:ARGUMENT; may be repeated, in order of "
        "preference (offered before the built-in ones)."
    )

    def opt_help_methods(self) -> None:
        """List the authentication method plugins that --method can use."""
        factories = list(getPlugins(IAuthenticatorFactory))
        for factory in factories:
            sys.stdout.write(f"  {factory.name:<12} {factory.description}\n")
        if not factories:
            sys.stdout.write(
                "No authentication method plugins are installed: --method has "
                "nothing to offer (an IAuthenticatorFactory plugin in a "
                "twisted/plugins directory adds one).\n"
            )
        raise SystemExit(0)

    def opt_version(self) -> None:
        """Display twisted-socks5's version and Twisted's, and exit."""
        sys.stdout.write(version_line() + "\n")
        raise SystemExit(0)

    def getUsage(self, width: Optional[int] = None) -> str:
        # twistd prints this above a usage error: the whole help would bury
        # the one line that says what is wrong.
        if self._failed:
            return "Usage: twistd [options] socks5 [options] (--help lists them)\n"
        return str(super().getUsage(width))

    def parseOptions(self, options: Optional[List[str]] = None) -> None:
        # Kept for --workers, whose processes get the same options again.
        self.argv = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError:
            self._failed = True
            raise

    def postOptions(self) -> None:
        if self["workers"] > 1:
            from twisted.internet import reactor

            from .workers import tcp_listener

            for description in self["listen"] or [DEFAULT_LISTEN]:
                try:
                    tcp_listener(reactor, description)
                except ValueError as e:
                    raise usage.UsageError(str(e)) from None
            if self["metrics"]:
                raise usage.UsageError(
                    "--metrics is per process: it cannot be combined with --workers"
                )
        if self["metrics"]:
            self["metrics"] = _metrics_endpoint(self["metrics"])
        #: The ``self`` network, read now and on SIGHUP.
        self.host = default_host()
        if self["rules"]:
            try:
                self.policy = RulesFile(self["rules"], self.host)
            except RulesError as e:
                raise usage.UsageError(f"--rules: {e}") from None
            named = {name for name in self["upstreams"] if name is not None}
            named |= {name for name in self["outgoing"] if name is not None}
            unknown = sorted(self.policy.rules.routes - named - {"direct"})
            if unknown:
                raise usage.UsageError(
                    f"--rules: 'via {unknown[0]}' names no --upstream "
                    f"{unknown[0]}=URL or --outgoing {unknown[0]}=ADDRESS"
                )
        check_limits_store(self)
        _check_outgoing(self["outgoing"], self["upstreams"])
        if isinstance(self["commands"], str):
            self["commands"] = _commands(self["commands"])
        if isinstance(self["protocols"], str):
            self["protocols"] = _protocols(self["protocols"])
        if not self["listen"]:
            self["listen"] = [DEFAULT_LISTEN]
        if not self["allow-open-relay"]:
            refuse_open_relay(
                self["listen"], self._anonymous, self.policy, self["protocols"]
            )
        # i16-log: workers append to one access log; one of them rotating
        # it would pull it from under the others.
        if isinstance(self["access-log-rotate"], str):
            self["access-log-rotate"] = Rotation(self["access-log-rotate"])
        if self["workers"] > 1 and self["access-log-rotate"].kind != "none":
            raise usage.UsageError(
                "--access-log-rotate cannot be combined with --workers: "
                "rotate with logrotate (every worker reopens on SIGUSR1)"
            )
        # i16-console: the live console
        if self["admin"] or self["admin-auth"]:
            self["admin"] = _admin_endpoint(self["admin"], self)

    def _anonymous(self) -> bool:
        """Whether a client may use the proxy without a password."""
        return any(a.method == 0 for a in build_authenticators(self))


def _check_outgoing(
    outgoing: Dict[Optional[str], List[str]], upstreams: Dict[Optional[str], str]
) -> None:
    """Each --outgoing address is this host's, and no route has two meanings."""
    for name in outgoing:
        if name is not None and name in upstreams:
            raise usage.UsageError(
                f"--outgoing {name}= and --upstream {name}= name one route twice"
            )
        problem = check_on_host(outgoing[name])
        if problem is not None:
            raise usage.UsageError(f"--outgoing: {problem}")


def _metrics_endpoint(description: str) -> str:
    """A usable --metrics endpoint, or a usage error that says why not."""
    from ._extras import available, missing

    if not available("prometheus_client"):
        raise usage.UsageError(missing("prometheus_client", "--metrics needs"))
    from twisted.internet import reactor

    if description.isascii() and description.isdigit():
        # A bare port: on loopback, as --listen's default is.
        description = f"tcp:{description}:interface=127.0.0.1"
    escaped = escape_ipv6_interface(description)
    try:
        serverFromString(reactor, escaped)
    except Exception as e:  # noqa: BLE001 - any parser error is a usage error
        raise usage.UsageError(f"--metrics {description!r}: {e}") from None
    return escaped


def _admin_checker(description: str) -> Any:
    """An --admin-auth checker: one of usernames and passwords."""
    from twisted.cred import strcred

    problem = unusable_credentials(description)
    kind = description.partition(":")[0]
    if problem is not None:
        raise usage.UsageError(f"--admin-auth {kind}: {problem}")
    try:
        checker = strcred.makeChecker(description)
    except Exception as e:  # noqa: BLE001 - any checker error is a usage error
        raise usage.UsageError(f"--admin-auth {kind}: {e}") from None
    if IUsernamePassword not in checker.credentialInterfaces:
        raise usage.UsageError(
            f"--admin-auth {kind}: the console needs a username/password checker"
        )
    _bytes_memory_checkers([checker])
    return checker


def _admin_endpoint(description: Optional[str], options: Options) -> str:
    """A usable --admin endpoint, or a usage error that says why not."""
    from .exposure import refuse_console_without_password

    if not description:
        raise usage.UsageError("--admin-auth is for the console: give --admin too")
    if options["workers"] > 1:
        raise usage.UsageError(
            "--admin shows one process's tunnels: it cannot be combined with "
            "--workers (each worker holds its own; run one process, or use "
            "each worker's log)"
        )
    from twisted.internet import reactor

    if description.isascii() and description.isdigit():
        # A bare port: on loopback, as --listen's default is.
        description = f"tcp:{description}:interface=127.0.0.1"
    escaped = escape_ipv6_interface(description)
    try:
        serverFromString(reactor, escaped)
    except Exception as e:  # noqa: BLE001 - any parser error is a usage error
        raise usage.UsageError(f"--admin {description!r}: {e}") from None
    refuse_console_without_password(escaped, options["admin-auth"])
    return escaped


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
