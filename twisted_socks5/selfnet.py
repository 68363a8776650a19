"""
The proxy host itself as a destination: the unspecified addresses that are
never a destination, and the ``self`` network of the access rules (loopback,
unspecified, and the addresses of this host's interfaces).

On Linux a connection to ``0.0.0.0`` or ``::`` (or any ``0.0.0.0/8`` address)
reaches the host's own loopback services, so rules written against
``127.0.0.0/8`` alone would not protect them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import socket
import sys
from typing import Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple, Union

from twisted.logger import Logger

from .addresses import canonical_ip_text, unmapped

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

log = Logger()

#: Networks that are the host itself whatever its interfaces: loopback and
#: unspecified (IPv4-mapped forms are read as IPv4 everywhere).
BUILT_IN: Tuple[IPNetwork, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv4Network("0.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
    ipaddress.IPv6Network("::/128"),
)

#: The rule quoted when an unspecified destination is refused.
UNSPECIFIED_RULE = "built-in: an unspecified address (0.0.0.0/8, ::) is no destination"
#: The rule quoted when the exposed-server protection refuses ``self``.
SELF_RULE = (
    "built-in: the proxy host itself (self) on a server listening beyond "
    "loopback; allow it with 'allow ... to self' or --allow-self-destinations"
)


def unspecified(ip: Union[IPAddress, str]) -> bool:
    """
    Whether ``ip`` is unspecified: ``0.0.0.0/8`` or ``::``, also IPv4-mapped.
    Never a valid destination, whatever the rules say.
    """
    if isinstance(ip, str):
        # Canonical texts first (every datagram comes here): no parsing.
        if ip.startswith("0."):
            return True
        if "." in ip and ":" not in ip:
            return False
        try:
            ip = ipaddress.ip_address(ip.split("%", 1)[0])
        except ValueError:
            return False
    ip = unmapped(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return int(ip) >> 24 == 0
    return ip.is_unspecified


# --------------------------------------------------------------------------
# The host's interface addresses


class _SockAddr(ctypes.Structure):
    _fields_ = [("sa_family", ctypes.c_ushort), ("sa_data", ctypes.c_ubyte * 14)]


class _IfAddrs(ctypes.Structure):
    pass


_IfAddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_IfAddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.POINTER(_SockAddr)),
    ("ifa_netmask", ctypes.POINTER(_SockAddr)),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]


def _family(raw: bytes) -> int:
    """sa_family: 16 bits on Linux; BSD and macOS put sa_len first."""
    if sys.platform.startswith("linux"):
        return int.from_bytes(raw[:2], sys.byteorder)
    return raw[1]


def getifaddrs_addresses() -> List[IPAddress]:
    """The interfaces' addresses from the C library's ``getifaddrs``."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    head = ctypes.POINTER(_IfAddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: List[IPAddress] = []
    try:
        node = head
        while node:
            entry = node.contents
            if entry.ifa_addr:
                raw = ctypes.string_at(entry.ifa_addr, 28)
                family = _family(raw)
                if family == socket.AF_INET:
                    found.append(ipaddress.IPv4Address(raw[4:8]))
                elif family == socket.AF_INET6:
                    found.append(ipaddress.IPv6Address(raw[8:24]))
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found


def parse_proc_if_inet6(text: str) -> List[IPAddress]:
    """Addresses from ``/proc/net/if_inet6`` (32 hex digits first per line)."""
    found: List[IPAddress] = []
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.append(ipaddress.IPv6Address(bytes.fromhex(fields[0])))
            except ValueError:
                continue
    return found


def parse_proc_fib_trie(text: str) -> List[IPAddress]:
    """Local IPv4 addresses from ``/proc/net/fib_trie`` (``/32 host LOCAL``)."""
    found: List[IPAddress] = []
    last: Optional[str] = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] in ("|--", "+--"):
            last = fields[1]
        elif "/32 host LOCAL" in line and last is not None:
            try:
                ip = ipaddress.IPv4Address(last)
            except ValueError:
                continue
            if ip not in found:
                found.append(ip)
    return found


def proc_addresses() -> List[IPAddress]:
    """The interfaces' addresses from Linux's ``/proc/net`` (no C calls)."""
    found: List[IPAddress] = []
    for path, parse in (
        ("/proc/net/fib_trie", parse_proc_fib_trie),
        ("/proc/net/if_inet6", parse_proc_if_inet6),
    ):
        try:
            with open(path, encoding="ascii", errors="replace") as f:
                found.extend(parse(f.read()))
        except OSError:
            continue
    if not found:
        raise OSError("no address in /proc/net")
    return found


def interface_addresses() -> List[IPAddress]:
    """
    This host's interface addresses: ``getifaddrs`` (Linux, BSD, macOS),
    else ``/proc/net``; an empty list, with a warning, when neither works
    (``self`` is then loopback and unspecified only).
    """
    error: Exception = OSError("no reader")
    for reader in (getifaddrs_addresses, proc_addresses):
        try:
            return reader()
        except (OSError, AttributeError, TypeError, ValueError) as e:
            error = e
    log.warn(
        "cannot read this host's interface addresses ({error}); 'self' is "
        "loopback and unspecified only",
        error=error,
    )
    return []


class HostAddresses:
    """
    The ``self`` network: :data:`BUILT_IN` plus this host's interface
    addresses, read when built and again on :meth:`reload` (SIGHUP).

    :param read: returns the interface addresses (tests inject their own).
    """

    def __init__(
        self, read: Callable[[], Iterable[IPAddress]] = interface_addresses
    ) -> None:
        self._read = read
        self.addresses: FrozenSet[IPAddress] = frozenset()
        #: Answers by address text: every UDP datagram asks.
        self._seen: Dict[str, bool] = {}
        self.reload()

    def reload(self) -> None:
        """Read the interface addresses again (a reader that raises keeps the old)."""
        self.addresses = frozenset(unmapped(ip) for ip in self._read())
        self._seen = {}

    @property
    def networks(self) -> Tuple[IPNetwork, ...]:
        """Everything in ``self``, as networks (the rules' view)."""
        own: List[IPNetwork] = [ipaddress.ip_network(ip) for ip in self.addresses]
        return BUILT_IN + tuple(own)

    def __contains__(self, ip: object) -> bool:
        if isinstance(ip, str):
            known = self._seen.get(ip)
            if known is None:
                try:
                    parsed = ipaddress.ip_address(ip.split("%", 1)[0])
                except ValueError:
                    return False
                known = self._contains(parsed)
                if len(self._seen) >= 4096:
                    self._seen.clear()
                self._seen[ip] = known
            return known
        if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
            return self._contains(ip)
        return False

    def _contains(self, ip: IPAddress) -> bool:
        ip = unmapped(ip)
        if ip in self.addresses:
            return True
        if isinstance(ip, ipaddress.IPv4Address):
            return int(ip) >> 24 in (0, 127)  # BUILT_IN, as integers
        return int(ip) <= 1  # :: and ::1

    def __repr__(self) -> str:
        return f"<self: loopback, unspecified and {len(self.addresses)} addresses>"


#: Names every resolver answers with loopback (RFC 6761, /etc/hosts).
_LOOPBACK_NAMES = frozenset(["localhost", "ip6-localhost", "ip6-loopback"])


def local_literal(name: str) -> Optional[str]:
    """
    The address a name stands for on any resolver, without asking one: an
    IP literal in any form ``inet_aton`` reads (``127.1``, ``0x7f.1``,
    ``2130706433``), an IPv6 literal, or a loopback name (``localhost``,
    ``*.localhost``).  ``None`` for other names: only a resolver knows.
    For routes that hand names to another host (an upstream), whose
    resolver would read these the same way.
    """
    lowered = name.rstrip(".").lower()
    if lowered in _LOOPBACK_NAMES or lowered.endswith(".localhost"):
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(lowered.split("%", 1)[0]))
    except ValueError:
        pass
    try:
        return socket.inet_ntoa(socket.inet_aton(lowered))
    except (OSError, ValueError):
        return None


def reached_from_outside(local_ip: object) -> bool:
    """
    Whether a connection accepted on ``local_ip`` (the server's end) may
    come from another host: any address but loopback.  ``None`` (a UNIX
    socket) is local.
    """
    if not isinstance(local_ip, str):
        return False
    try:
        ip = ipaddress.ip_address(local_ip.split("%", 1)[0])
    except ValueError:
        return True
    return not unmapped(ip).is_loopback


_default: Optional[HostAddresses] = None


def default_host() -> HostAddresses:
    """The process's :class:`HostAddresses`, read on first use."""
    global _default
    if _default is None:
        _default = HostAddresses()
    return _default


#: The old name of :func:`twisted_socks5.addresses.canonical_ip_text`, kept
#: for one release.
normalize_ip = canonical_ip_text
