"""
IP addresses in their one canonical form, as text or as objects.

An IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a dual-stack socket
reports for an IPv4 peer) is the IPv4 address everywhere: in logs, in the
access rules, in the checks of BIND and UDP peers.  The names say what comes
back: :func:`canonical_ip_text` a string, :func:`parse_ip` an ``ipaddress``
object.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Dict, Optional, Union

from .codec import Address

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPLike = Union[IPAddress, str]

_CANONICAL: Dict[str, str] = {}


def canonical_ip_text(host: str) -> str:
    """
    ``::ffff:a.b.c.d`` becomes ``a.b.c.d``; other addresses are canonical
    (``::0:1`` is ``::1``); a string that is no IP address comes back as is.
    Cached: it runs for every UDP datagram and every connection.
    """
    text = _CANONICAL.get(host)
    if text is None:
        try:
            text = Address.from_host(host, 0).host
        except ValueError:
            text = host
        if len(_CANONICAL) >= 4096:
            _CANONICAL.clear()
        _CANONICAL[host] = text
    return text


def unmapped(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address as the IPv4 address; any other as is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_ip(ip: IPLike) -> IPAddress:
    """
    ``ip`` as an ``ipaddress`` object (parsed if text; ``ValueError`` if it
    is none), an IPv4-mapped IPv6 address as IPv4.
    """
    if isinstance(ip, str):
        ip = ipaddress.ip_address(ip)
    return unmapped(ip)


def address_of(ip_address: Any) -> Optional[Address]:
    """The SOCKS address of a Twisted IPv4Address/IPv6Address, or None."""
    host = getattr(ip_address, "host", None)
    port = getattr(ip_address, "port", None)
    if not isinstance(host, str) or not isinstance(port, int):
        return None
    try:
        return Address.from_host(host, port)
    except ValueError:
        return None


def by_family(addresses: Any) -> Dict[int, str]:
    """
    Addresses (``--udp-bind``, ``--udp-advertise``...) by family, 4 or 6,
    canonical (an IPv4-mapped one is IPv4); ``ValueError`` on a word that
    is no IP address or on two of one family.
    """
    chosen: Dict[int, str] = {}
    for text in addresses:
        ip = parse_ip(text.strip())
        if ip.version in chosen:
            other = chosen[ip.version]
            raise ValueError(f"one address per family, not {other} and {ip}")
        chosen[ip.version] = str(ip)
    return chosen


def family_of(ip: str) -> int:
    """4 or 6, for a canonical IP text."""
    return 6 if ":" in ip else 4
