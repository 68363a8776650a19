"""
Name resolution without the system resolver: ``--resolver``, ``--hosts``
and ``--prefer``.

:class:`NamesResolver` is an ``IHostnameResolver`` that asks DNS servers
through :mod:`twisted.names` (no thread, nothing blocks the reactor), answers
names from a hosts file first, and keeps answers for their TTL in a bounded
cache.  The connectors wrap it like any resolver (the access rules' filter in
:mod:`twisted_socks5.outbound` sees every address it gives), so CONNECT, UDP
datagram targets and BIND's expected peer all resolve through it.

A look-up that fails raises :class:`LookupFailed`, a ``DNSLookupError``:
the client is answered 0x04 (host unreachable), and one log line says why
(``NXDOMAIN``, ``SERVFAIL``, ``REFUSED``, ``timeout``, ``no address``).

:class:`FamilyPreference` is ``--prefer``: the order of the families, or one
family only, applied to the addresses the rules allowed.
"""

from __future__ import annotations

import collections
import ipaddress
import math
import socket
from dataclasses import dataclass
from typing import (
    Any,
    Callable,
    Dict,
    FrozenSet,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
)

from twisted.internet import defer, error
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from twisted.logger import Logger
from twisted.names import client, dns
from twisted.names import error as dns_error
from twisted.python.failure import Failure
from zope.interface import implementer

from .addresses import canonical_ip_text
from .logs import escape_word

_T = TypeVar("_T")

DNS_PORT = 53
#: Answers kept at once (names times families); the least recently used go.
MAX_CACHED_ANSWERS = 10_000
#: An answer is kept at least this long (a TTL of 0 would send every
#: connection to the server) and at most this long (a huge TTL would pin a
#: moved name).
MIN_TTL = 5.0
MAX_TTL = 3600.0
#: NXDOMAIN and "no address" are kept for the zone's negative TTL (its SOA),
#: bounded by MIN_TTL and this.
MAX_NEGATIVE_TTL = 300.0
#: CNAMEs followed for one name, across queries.
MAX_CNAME_HOPS = 8
#: Seconds for a whole look-up (every server, every retry) by default.
DEFAULT_TIMEOUT = 5.0


class LookupFailed(error.DNSLookupError):
    """A name did not resolve; ``reason`` says how (for the log)."""

    def __init__(self, name: str = "", reason: str = "error") -> None:
        super().__init__(f"{name}: {reason}")
        self.name = name
        self.reason = reason


#: What a DNS server's failure is called in the log.
_REASONS: Tuple[Tuple[type, str], ...] = (
    (dns_error.DNSNameError, "NXDOMAIN"),
    (dns_error.DNSServerError, "SERVFAIL"),
    (dns_error.DNSQueryRefusedError, "REFUSED"),
    (dns_error.DNSQueryTimeoutError, "timeout"),
    (defer.TimeoutError, "timeout"),
    (error.TimeoutError, "timeout"),
    (LookupFailed, ""),
)


#: Reasons that are the servers' answers (logged as information, not as a
#: warning about the servers).
_ANSWERS = ("NXDOMAIN", "no address")


def _reason(failure: Failure) -> str:
    for cls, reason in _REASONS:
        if failure.check(cls):
            return reason or getattr(failure.value, "reason", "error")
    return f"error ({failure.getErrorMessage()})"


# --------------------------------------------------------------------------
# Configuration: servers, hosts file, preference


@dataclass(frozen=True)
class DNSServer:
    """One ``--resolver`` server: ``udp`` or ``tcp``, an IP and a port."""

    transport: str
    host: str
    port: int = DNS_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}:{host}:{self.port}"


def parse_servers(spec: str) -> List[DNSServer]:
    """
    ``--resolver``'s value: ``[udp:|tcp:]IP[:PORT]`` items, comma-separated
    (an IPv6 address with a port in brackets, ``[::1]:53``).  Addresses only:
    the DNS server's own name would need a resolver.
    """
    servers: List[DNSServer] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        transport, sep, rest = item.partition(":")
        if not sep or transport.lower() not in ("udp", "tcp"):
            transport, rest = "udp", item
        host, port = _host_port(rest)
        servers.append(DNSServer(transport.lower(), host, port))
    if not servers:
        raise ValueError("no DNS server given")
    return servers


def _host_port(text: str) -> Tuple[str, int]:
    port = DNS_PORT
    if text.startswith("["):
        host, sep, tail = text[1:].partition("]")
        if not sep or (tail and not tail.startswith(":")):
            raise ValueError(f"bad DNS server address {text!r}")
        if tail:
            port = _port(tail[1:])
    elif text.count(":") == 1:
        host, _, number = text.partition(":")
        port = _port(number)
    else:
        host = text
    try:
        return canonical_ip_text(str(ipaddress.ip_address(host))), port
    except ValueError:
        raise ValueError(
            f"a DNS server is an IP address, not {host!r} (its name would "
            "need a resolver)"
        ) from None


def _port(text: str) -> int:
    number = int(text)
    if not 1 <= number <= 65535:
        raise ValueError(f"bad DNS server port {text!r}")
    return number


def read_hosts(path: str) -> Dict[str, List[str]]:
    """
    A hosts file (``/etc/hosts`` format: ``IP NAME [ALIAS...]``, ``#``
    comments) as lower-case name -> addresses, in the file's order.  Lines
    whose first field is not an IP address (or has a zone, ``%eth0``) are
    skipped.
    """
    names: Dict[str, List[str]] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.partition("#")[0].split()
            if len(fields) < 2:
                continue
            try:
                # A zone (fe80::1%eth0) would be lost on the way: skipped.
                if "%" in fields[0]:
                    continue
                ip = canonical_ip_text(str(ipaddress.ip_address(fields[0])))
            except ValueError:
                continue
            for name in fields[1:]:
                known = names.setdefault(name.lower().rstrip("."), [])
                if ip not in known:
                    known.append(ip)
    return names


PREFERENCES = ("ipv4", "ipv6", "ipv4-only", "ipv6-only")


class FamilyPreference:
    """
    ``--prefer``: which family a name's addresses are tried in first
    (``ipv4``, ``ipv6``), or the only one used (``ipv4-only``,
    ``ipv6-only``).  Applied to the addresses the rules allowed.
    """

    def __init__(self, spec: str) -> None:
        spec = spec.strip().lower()
        if spec not in PREFERENCES:
            raise ValueError(f"must be one of {', '.join(PREFERENCES)}")
        self.spec = spec
        self.ipv6 = spec.startswith("ipv6")
        self.only = spec.endswith("-only")

    def __repr__(self) -> str:
        return f"FamilyPreference({self.spec!r})"

    def split(
        self, addresses: Sequence[_T], host: Callable[[_T], str] = str
    ) -> Tuple[List[_T], List[_T]]:
        """
        ``addresses`` in the order to try them (the preferred family first,
        each family in its own order), and those the restriction drops.
        """
        first = [a for a in addresses if (":" in host(a)) == self.ipv6]
        other = [a for a in addresses if (":" in host(a)) != self.ipv6]
        return (first, other) if self.only else (first + other, [])

    def no_address(self, name: str) -> LookupFailed:
        """The failure of a name left with no address of the allowed family."""
        family = "IPv6" if self.ipv6 else "IPv4"
        return LookupFailed(name, f"no {family} address allowed (--prefer {self.spec})")


# --------------------------------------------------------------------------
# The resolver


class _TCPResolver(client.Resolver):
    """A twisted.names client that asks its server over TCP only."""

    def queryUDP(self, queries: Any, timeout: Any = None) -> Any:
        seconds: Any = timeout if timeout else self.timeout
        return self.queryTCP(queries, sum(seconds))

    def queryTCP(self, queries: Any, timeout: float = 10) -> Any:
        # client.Resolver's, with one connection attempt at a time and a
        # connect timeout of the query's: a server that never accepts holds
        # one descriptor for seconds, not one per query for 30 s.
        if self.connections:
            return self.connections[0].query(queries, timeout)
        if not self.pending:
            host, port = self.servers[0]
            self._reactor.connectTCP(
                host, port, self.factory, timeout=max(1, math.ceil(timeout))
            )
        d: defer.Deferred[Any] = defer.Deferred()
        self.pending.append((d, queries, timeout))
        return d


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        """Nothing to stop: the look-up is bounded and shared."""


_FAMILIES = {4: (dns.A, IPv4Address), 6: (dns.AAAA, IPv6Address)}
_BOTH: FrozenSet[int] = frozenset((4, 6))


@implementer(IHostnameResolver)
class NamesResolver:
    """
    Resolves names through DNS servers with :mod:`twisted.names`, a hosts
    file first; an ``IHostnameResolver`` the connectors use like the
    reactor's.

    :param servers: asked in order, the next one when a server fails or
        says nothing (NXDOMAIN is an answer: no next server); ``None``:
        names not in ``hosts`` go to ``fallback``.
    :param hosts: names answered without asking (see :func:`read_hosts`).
    :param timeout: seconds for a whole look-up, every server included;
        each server has its share (over UDP, one retry within it).
    :param fallback: the resolver without ``servers`` (the reactor's).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        servers: Optional[Sequence[DNSServer]] = None,
        hosts: Optional[Mapping[str, List[str]]] = None,
        timeout: float = DEFAULT_TIMEOUT,
        fallback: Optional[IHostnameResolver] = None,
        max_answers: int = MAX_CACHED_ANSWERS,
        hosts_path: Optional[str] = None,
    ) -> None:
        if not servers and fallback is None:
            fallback = reactor.nameResolver
        self.reactor = reactor
        self.servers = list(servers or ())
        self.hosts = dict(hosts or {})
        #: The file ``hosts`` came from, re-read by :meth:`reload`.
        self.hosts_path = hosts_path
        self.timeout = timeout
        self.fallback = fallback
        self.max_answers = max_answers
        share = timeout / max(1, len(self.servers))
        self._share = share
        self._clients = [
            (_TCPResolver if s.transport == "tcp" else client.Resolver)(
                servers=[(s.host, s.port)],
                timeout=(share / 4, share * 3 / 4),
                reactor=reactor,
            )
            for s in self.servers
        ]
        #: (name, family) -> (expiry, addresses, failure reason or None).
        self._cache: collections.OrderedDict[
            Tuple[str, int], Tuple[float, Tuple[str, ...], Optional[str]]
        ] = collections.OrderedDict()
        self._waiting: Dict[Tuple[str, int], List[defer.Deferred[List[str]]]] = {}

    def reload(self) -> None:
        """
        SIGHUP: re-read the hosts file (a file that fails to read keeps the
        old names: the error propagates first) and forget cached answers.
        """
        if self.hosts_path is not None:
            self.hosts = read_hosts(self.hosts_path)
        self._cache.clear()

    def __repr__(self) -> str:
        where = f" hosts={self.hosts_path}" if self.hosts_path else ""
        servers = ",".join(f"{s.transport}:{s.host}:{s.port}" for s in self.servers)
        return f"<NamesResolver {servers or 'system'}{where}>"

    # ------------------------------------------------------------------
    # IHostnameResolver

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Optional[Sequence[Any]] = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        families = _BOTH
        if addressTypes is not None:
            families = frozenset(
                f for f, (_, cls) in _FAMILIES.items() if cls in addressTypes
            )
        name = hostName.lower().rstrip(".")
        if not self.servers and name not in self.hosts and self.fallback is not None:
            return self.fallback.resolveHostName(
                resolutionReceiver,
                hostName,
                portNumber,
                addressTypes,
                transportSemantics,
            )
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)

        def deliver(addresses: List[str]) -> None:
            for ip in addresses:
                cls = IPv6Address if ":" in ip else IPv4Address
                resolutionReceiver.addressResolved(
                    cls(transportSemantics, ip, portNumber)  # type: ignore[arg-type]
                )
            resolutionReceiver.resolutionComplete()

        def failed(failure: Failure) -> None:
            resolutionReceiver.resolutionComplete()

        self.lookup(hostName, families).addCallbacks(deliver, failed)
        return resolution

    # ------------------------------------------------------------------

    def lookup(
        self, hostName: str, families: FrozenSet[int] = _BOTH
    ) -> defer.Deferred[List[str]]:
        """
        ``hostName``'s addresses (IPv6 first, then IPv4), from the hosts
        file, the cache or the servers; fails with :class:`LookupFailed`.
        """
        name = hostName.lower().rstrip(".")
        try:
            return defer.succeed([canonical_ip_text(str(ipaddress.ip_address(name)))])
        except ValueError:
            pass
        known = self.hosts.get(name)
        if known is not None:
            found = [ip for ip in known if (6 if ":" in ip else 4) in families]
            if found:
                return defer.succeed(sorted(found, key=lambda ip: ":" not in ip))
            return defer.fail(LookupFailed(hostName, "no address in the hosts file"))
        if not self.servers:
            return defer.fail(LookupFailed(hostName, "not in the hosts file"))
        try:
            qname = name.encode("idna")
        except UnicodeError:
            return defer.fail(LookupFailed(hostName, "not a valid name"))
        asked = [self._family(qname, f) for f in (6, 4) if f in families]
        d = defer.DeferredList([d for d, _ in asked], consumeErrors=True)
        return d.addCallback(self._combined, hostName, any(new for _, new in asked))

    def _combined(
        self, results: List[Tuple[bool, Any]], hostName: str, new: bool
    ) -> List[str]:
        addresses = [ip for ok, found in results if ok for ip in found]
        if addresses:
            return addresses
        reasons = [_reason(f) for ok, f in results if not ok]
        reason = "NXDOMAIN" if "NXDOMAIN" in reasons else reasons[0]
        if new:
            # One line per name asked (not per answer from the cache).
            log = self.log.info if reason in _ANSWERS else self.log.warn
            log(
                "DNS look-up of {name} failed: {reason}",
                event="socks5.dns_failed",
                name=escape_word(hostName),
                reason=reason,
            )
        raise LookupFailed(hostName, reason)

    def _family(
        self, qname: bytes, family: int
    ) -> Tuple[defer.Deferred[List[str]], bool]:
        """
        One family's addresses: cached, shared with a look-up under way, or
        asked (then the flag is true).
        """
        key = (qname.decode("ascii"), family)
        cached = self._cache.get(key)
        if cached is not None:
            expiry, addresses, reason = cached
            if expiry > self.reactor.seconds():
                self._cache.move_to_end(key)
                if reason is not None:
                    return defer.fail(LookupFailed(key[0], reason)), False
                return defer.succeed(list(addresses)), False
            del self._cache[key]
        mine: defer.Deferred[List[str]] = defer.Deferred()
        waiting = self._waiting.get(key)
        if waiting is not None:
            waiting.append(mine)
            return mine, False
        self._waiting[key] = [mine]
        # The whole look-up, CNAMEs asked after included, within the time.
        asked = _within(
            self._ask(qname, _FAMILIES[family][0], 0), self.timeout, self.reactor, qname
        )
        asked.addBoth(self._answered, key)
        return mine, True

    def _answered(self, result: Any, key: Tuple[str, int]) -> None:
        now = self.reactor.seconds()
        waiting = self._waiting.pop(key, [])
        if isinstance(result, Failure):
            reason = _reason(result)
            negative = _negative_ttl(result)
            if negative is not None:
                self._remember(key, now + negative, (), reason)
            for d in waiting:
                d.errback(LookupFailed(key[0], reason))
            return
        addresses, ttl = result
        self._remember(key, now + _clamp(ttl, MAX_TTL), tuple(addresses), None)
        for d in waiting:
            d.callback(list(addresses))

    def _remember(
        self,
        key: Tuple[str, int],
        expiry: float,
        addresses: Tuple[str, ...],
        reason: Optional[str],
    ) -> None:
        self._cache[key] = (expiry, addresses, reason)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_answers:
            self._cache.popitem(last=False)

    def _ask(
        self, qname: bytes, rtype: int, hops: int
    ) -> defer.Deferred[Tuple[List[str], float]]:
        """Ask the servers in turn; follow a CNAME chain the answer leaves
        open."""
        d = self._from_server(0, qname, rtype)
        return d.addCallback(self._addresses, qname, rtype, hops)

    def _from_server(self, index: int, qname: bytes, rtype: int) -> defer.Deferred[Any]:
        resolver = self._clients[index]
        asked = resolver.query(dns.Query(qname, rtype, dns.IN))
        d = _within(asked, self._share, self.reactor, qname)

        def next_server(failure: Failure) -> Any:
            if failure.check(dns_error.DNSNameError) or index + 1 >= len(self._clients):
                return failure
            self.log.info(
                "DNS server {server} failed for {name}: {reason}; asking the next",
                server=str(self.servers[index]),
                name=escape_word(qname.decode("ascii")),
                reason=_reason(failure),
            )
            return self._from_server(index + 1, qname, rtype)

        return d.addErrback(next_server)

    def _addresses(self, sections: Any, qname: bytes, rtype: int, hops: int) -> Any:
        answers, authority, _ = sections
        current = qname.lower()
        ttl = float("inf")
        for _ in range(MAX_CNAME_HOPS + 1):
            found = [
                r for r in answers if r.type == rtype and r.name.name.lower() == current
            ]
            if found:
                ttl = min([ttl, *(r.ttl for r in found)])
                return [_text(r.payload) for r in found], ttl
            alias = next(
                (
                    r
                    for r in answers
                    if r.type == dns.CNAME and r.name.name.lower() == current
                ),
                None,
            )
            if alias is None:
                break
            ttl = min(ttl, alias.ttl)
            current = alias.payload.name.name.lower()
            hops += 1
            if hops > MAX_CNAME_HOPS:
                raise LookupFailed(qname.decode("ascii"), "CNAME chain too long")
        if current != qname.lower():
            # The answer stops at an alias: ask for its target.
            then = self._ask(current, rtype, hops)
            return then.addCallback(lambda found: (found[0], min(ttl, found[1])))
        empty = LookupFailed(qname.decode("ascii"), "no address")
        empty.authority = authority  # type: ignore[attr-defined]
        raise empty


def _text(payload: Any) -> str:
    if isinstance(payload, dns.Record_A):
        return str(payload.dottedQuad())
    return canonical_ip_text(socket.inet_ntop(socket.AF_INET6, payload.address))


def _clamp(ttl: float, ceiling: float) -> float:
    return min(max(ttl, MIN_TTL), ceiling)


def _negative_ttl(failure: Failure) -> Optional[float]:
    """
    How long a failure is kept: an answer that the name or the address does
    not exist, for the zone's SOA TTL (at most its MINIMUM field, RFC 2308);
    a server's failure or a timeout, not at all.
    """
    value: Any = failure.value
    if isinstance(value, dns_error.DNSNameError):
        message = value.args[0] if value.args else None
        authority = getattr(message, "authority", ())
    elif isinstance(value, LookupFailed) and value.reason == "no address":
        authority = getattr(value, "authority", ())
    else:
        return None
    for record in authority:
        if record.type == dns.SOA:
            return _clamp(min(record.ttl, record.payload.minimum), MAX_NEGATIVE_TTL)
    return MIN_TTL


def _within(
    d: defer.Deferred[_T], seconds: float, reactor: Any, qname: bytes
) -> defer.Deferred[_T]:
    """
    ``d``'s result, or a timeout after ``seconds``.  ``d`` is left to end on
    its own (twisted.names' TCP client fails if its query is cancelled
    while it connects); the server's late answer is dropped.
    """
    out: defer.Deferred[_T] = defer.Deferred()

    def expire() -> None:
        if not out.called:
            out.errback(dns_error.DNSQueryTimeoutError(qname))

    timer = reactor.callLater(seconds, expire)

    def done(result: Any) -> None:
        if timer.active():
            timer.cancel()
        if out.called:
            return
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)

    d.addBoth(done)
    return out
