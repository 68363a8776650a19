"""
Connection limits and failed-authentication throttling, per server.

Checked before a protocol is even built, so a client over a limit costs one
accept and one close.  Existing tunnels are never touched by a limit.
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import resource
from contextvars import ContextVar
from typing import Callable, Dict, Optional, Tuple

#: File descriptors kept free for listening sockets, logs, DNS, UDP...
_FD_RESERVE = 64
#: Clients whose failures are remembered; the oldest are forgotten first.
MAX_TRACKED_CLIENTS = 65536
#: IPv6 clients in one network of this prefix length count as one client:
#: a single host is commonly given a whole /64.
DEFAULT_IPV6_CLIENT_PREFIX = 64

#: The client key (:func:`client_key`) of the login whose credentials the
#: server is handing to its checker now, ``None`` outside: what a hash
#: pool shares its queue by.
checking_client: ContextVar[Optional[str]] = ContextVar("checking_client", default=None)


@functools.lru_cache(maxsize=4096)
def client_key(ip: str, ipv6_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX) -> str:
    """
    What the per-client limits count ``ip`` as: an IPv4 address itself
    (an IPv4-mapped IPv6 one too), an IPv6 address its ``/ipv6_prefix``
    network, anything else (a UNIX socket's path, "") as it is.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        if ipv6_prefix < 128:
            network = ipaddress.IPv6Network((address, ipv6_prefix), strict=False)
            return str(network)
    return str(address)


def raise_fd_limit(ceiling: int = 1 << 20) -> int:
    """
    Raise the soft ``RLIMIT_NOFILE`` to the hard limit (as Go's runtime and
    most servers do): the soft default of 1024 is meant for programs that
    use select(), not for a proxy holding thousands of sockets.  Returns
    the soft limit in force afterwards.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # pragma: no cover - not allowed here
            pass
    return soft


#: Descriptors the splice relay's two pipes add to a tunnel.
PIPE_FDS = 4
#: Descriptors a UDP association may hold: its TCP connection, the socket
#: facing the client and one outbound socket per address family.
UDP_FDS = 4


def descriptor_budget() -> int:
    """``RLIMIT_NOFILE`` less a reserve: what connections and pipes may use."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(1, soft - _FD_RESERVE)


def default_max_connections(fds_per_connection: int = 3) -> int:
    """
    The most client connections this process can carry: a CONNECT tunnel
    uses two file descriptors, a waiting BIND three and a UDP association
    up to four; so what is left of ``RLIMIT_NOFILE`` after a reserve (and
    the last client's possible fourth), divided by three.  The descriptors
    are counted besides (:class:`ConnectionLimits`): a UDP association's
    fourth, and the splice relay's pipes (four more for a busy tunnel), are
    only taken from descriptors no connection uses, and a new client is
    refused while there is no room for a UDP association's four.  Raise
    the descriptor limit (``LimitNOFILE=`` in systemd) to raise this.
    """
    udp_extra = max(0, UDP_FDS - fds_per_connection)
    # The last client admitted may become a UDP association: room for it.
    return max(1, (descriptor_budget() - udp_extra) // fds_per_connection)


def default_max_per_client(max_connections: int) -> int:
    """A quarter of the server's connections (0, no limit, if it has none)."""
    return max(1, max_connections // 4) if max_connections else 0


class ConnectionLimits:
    """
    :param max_connections: client connections open at once, all clients
        together (``None``: derived from ``RLIMIT_NOFILE`` and
        ``fds_per_connection``; ``0``: no limit).  Unless ``0``, a client is
        also refused when the descriptors in use (connections and splice
        pipes) leave no room for it.
    :param max_per_client: connections open at once from one client
        (``None``: a quarter of ``max_connections``, so that no one client
        holds every slot; ``0``: no limit).
    :param auth_failures: failed authentications from one client within
        ``auth_window`` seconds after which that client is refused until its
        failures age out (``0``: never throttle): at connect, and on
        connections it already has open, whatever the password.
    :param auth_checks_per_client: credential checks (bcrypt, a database)
        one client may have running at once; its other logins wait their
        turn, and meanwhile its failures are counted (``0``: no limit).
    :param ipv6_client_prefix: IPv6 addresses in one network of this prefix
        length are one client for every per-client limit (``128``: each
        address on its own); see :func:`client_key`.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        max_connections: Optional[int] = None,
        max_per_client: Optional[int] = None,
        auth_failures: int = 5,
        auth_window: float = 60.0,
        fds_per_connection: int = 3,
        auth_checks_per_client: int = 1,
        ipv6_client_prefix: int = DEFAULT_IPV6_CLIENT_PREFIX,
    ) -> None:
        if not 0 <= ipv6_client_prefix <= 128:
            raise ValueError(f"an IPv6 prefix length is 0 to 128: {ipv6_client_prefix}")
        self.clock = clock
        self.ipv6_client_prefix = ipv6_client_prefix
        if max_connections is None:
            max_connections = default_max_connections(fds_per_connection)
        self.max_connections = max_connections
        self.fds_per_connection = fds_per_connection
        #: Descriptors connections and pipes may use together.
        self.fd_budget = descriptor_budget()
        #: Tunnels holding splice pipes now.
        self.spliced = 0
        if max_per_client is None:
            max_per_client = default_max_per_client(max_connections)
        self.max_per_client = max_per_client
        #: Descriptors UDP associations hold beyond ``fds_per_connection``.
        self.extra_fds = 0
        self.udp_extra = max(0, UDP_FDS - fds_per_connection)
        self.auth_failures = auth_failures
        self.auth_window = auth_window
        self.auth_checks_per_client = auth_checks_per_client
        #: Credential checks running, by client key.
        self.checks: Dict[str, int] = {}
        self.total = 0
        self.per_client: Dict[str, int] = {}
        self._failures: collections.OrderedDict[str, collections.deque[float]] = (
            collections.OrderedDict()
        )

    def refusal(self, ip: Optional[str]) -> Optional[Tuple[str, str]]:
        """
        Why a new connection from ``ip`` must be refused, as a short kind
        (for metrics) and a sentence (for the log), or ``None``.  With
        ``ip`` ``None`` (a client a PROXY header has yet to name) only the
        limits of the whole server apply.
        """
        if self.max_connections and self.total >= self.max_connections:
            return "server_full", f"server full ({self.max_connections} connections)"
        if self.max_connections and not self._room_for(self.worst_case_fds):
            return "server_full", (
                f"server full (out of descriptors: {self.total} connections, "
                f"{self.spliced} with splice pipes)"
            )
        return None if ip is None else self.client_refusal(ip)

    def key(self, ip: str) -> str:
        """The client ``ip`` counts as (its IPv6 network): :func:`client_key`."""
        return client_key(ip, self.ipv6_client_prefix)

    def client_refusal(self, ip: str) -> Optional[Tuple[str, str]]:
        """The limits of one client address: its connections, its failed logins."""
        key = self.key(ip)
        if self.max_per_client and self.per_client.get(key, 0) >= self.max_per_client:
            return "client_limit", f"{self.max_per_client} connections already"
        if self.throttled(ip):
            return "throttled", f"throttled after {self.auth_failures} failed logins"
        return None

    def throttled(self, ip: str) -> bool:
        """Whether ``ip`` failed to log in too often lately to try again."""
        return bool(self.auth_failures) and (
            self._recent_failures(ip) >= self.auth_failures
        )

    def may_check(self, ip: str) -> bool:
        """Whether ``ip`` may start one more credential check now."""
        cap = self.auth_checks_per_client
        return not cap or self.checks.get(self.key(ip), 0) < cap

    def check_started(self, ip: str) -> None:
        key = self.key(ip)
        self.checks[key] = self.checks.get(key, 0) + 1

    def check_ended(self, ip: str) -> None:
        key = self.key(ip)
        left = self.checks.get(key, 1) - 1
        if left <= 0:
            self.checks.pop(key, None)
        else:
            self.checks[key] = left

    @property
    def worst_case_fds(self) -> int:
        """What a new client may come to hold: a UDP association's descriptors."""
        return self.fds_per_connection + self.udp_extra

    def _fds_in_use(self) -> int:
        return (
            self.total * self.fds_per_connection
            + self.extra_fds
            + self.spliced * PIPE_FDS
        )

    def _room_for(self, descriptors: int) -> bool:
        return self._fds_in_use() + descriptors <= self.fd_budget

    def may_splice(self) -> bool:
        """Whether one more tunnel may take two pipes without starving accept()."""
        return self._room_for(PIPE_FDS)

    def may_associate(self) -> bool:
        """Whether a connection may become a UDP association (its extra sockets)."""
        return not self.max_connections or self._room_for(self.udp_extra)

    def udp_started(self) -> None:
        self.extra_fds += self.udp_extra

    def udp_ended(self) -> None:
        self.extra_fds -= self.udp_extra

    def splice_started(self) -> None:
        self.spliced += 1

    def splice_ended(self) -> None:
        self.spliced -= 1

    def opened(self, ip: Optional[str]) -> None:
        """A connection is in; ``None``: its client is not known yet."""
        self.total += 1
        if ip is not None:
            self.identified(ip)

    def identified(self, ip: str) -> None:
        """A connection counted already is from ``ip``."""
        key = self.key(ip)
        self.per_client[key] = self.per_client.get(key, 0) + 1

    def closed(self, ip: Optional[str]) -> None:
        self.total -= 1
        if ip is None:
            return
        key = self.key(ip)
        left = self.per_client.get(key, 1) - 1
        if left <= 0:
            self.per_client.pop(key, None)
        else:
            self.per_client[key] = left

    def auth_failed(self, ip: str) -> None:
        if not self.auth_failures:
            return
        key = self.key(ip)
        times = self._failures.get(key)
        if times is None:
            times = collections.deque(maxlen=self.auth_failures)
            self._failures[key] = times
            while len(self._failures) > MAX_TRACKED_CLIENTS:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(key)
        times.append(self.clock())

    def _recent_failures(self, ip: str) -> int:
        key = self.key(ip)
        times = self._failures.get(key)
        if not times:
            return 0
        horizon = self.clock() - self.auth_window
        while times and times[0] < horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return 0
        return len(times)
