"""
The outgoing address: which local address an outbound connection leaves
from (``--outgoing``, ``--outgoing-rotation``).

A set holds addresses and prefixes, one list per family: an IPv4
destination gets an IPv4 source, an IPv6 one an IPv6 source, and a family
the set has nothing for gets the system's choice.  A prefix gives a random
address inside it per connection, bound with ``IP_FREEBIND`` (the prefix
must be routed to this host, e.g. ``ip -6 route add local PREFIX dev lo``).

Nothing here runs per connection unless a set is configured.
"""

from __future__ import annotations

import errno
import ipaddress
import random
import secrets
import socket
import sys
from typing import Dict, List, Optional, Sequence, Tuple, Union

from .addresses import canonical_ip_text

#: How a set picks an address for a connection.
ROTATIONS = ("none", "round-robin", "random", "same-as-listen")

#: ``IP_FREEBIND`` (Linux): bind an address not (yet) on an interface.  Its
#: ``SOL_IP`` form serves IPv6 sockets too.  ``None`` where there is none
#: (the number means something else on other systems).
IP_FREEBIND: Optional[int] = getattr(
    socket, "IP_FREEBIND", 15 if sys.platform.startswith("linux") else None
)

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Item = Union[str, Network]
#: A chosen source: the address, and whether binding it needs IP_FREEBIND.
Source = Tuple[str, bool]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def parse_item(text: str) -> Item:
    """
    One ``--outgoing`` entry: an IP address (IPv4-mapped IPv6 is IPv4) or a
    network whose host bits are zero; a one-address network is an address.
    """
    text = text.strip()
    if "/" not in text:
        return canonical_ip_text(str(ipaddress.ip_address(text)))
    network = ipaddress.ip_network(text, strict=True)
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_MAPPED):
        raise ValueError("an IPv4-mapped network: write it as IPv4")
    if network.num_addresses == 1:
        return canonical_ip_text(str(network.network_address))
    return network


def family_of(item: Item) -> int:
    """4 or 6."""
    if isinstance(item, str):
        return 6 if ":" in item else 4
    return item.version


def _random_in(network: Network) -> str:
    """A random host address of ``network`` (not its first, the subnet-router one)."""
    offset = 1 + secrets.randbelow(network.num_addresses - 1)
    return str(network.network_address + offset)


class OutgoingAddresses:
    """
    A named set of source addresses and how one is picked
    (:data:`ROTATIONS`); :meth:`pick` is called once per connection.
    """

    def __init__(self, entries: Sequence[str], rotation: str = "none") -> None:
        if rotation not in ROTATIONS:
            raise ValueError(
                f"unknown rotation {rotation!r}; use {', '.join(ROTATIONS)}"
            )
        self.rotation = rotation
        self.items: List[Item] = []
        for entry in entries:
            item = parse_item(entry)
            if item not in self.items:
                self.items.append(item)
        if not self.items:
            raise ValueError("no address")
        self._by_family: Dict[int, List[Item]] = {}
        for item in self.items:
            self._by_family.setdefault(family_of(item), []).append(item)
        self._turn: Dict[int, int] = {4: 0, 6: 0}

    def __repr__(self) -> str:
        return f"OutgoingAddresses({self.describe()!r}, {self.rotation!r})"

    def describe(self) -> str:
        return ",".join(str(item) for item in self.items)

    def pick(self, family: int, listen: Optional[str] = None) -> Optional[Source]:
        """
        The source for a connection of ``family`` (4 or 6); ``None``: the
        system's choice.  ``listen`` is the address the client connected
        to (``same-as-listen`` uses it when the set holds it: a client,
        or its PROXY header, never makes the proxy use another address).
        """
        items = self._by_family.get(family)
        if not items:
            return None
        rotation = self.rotation
        if rotation == "round-robin":
            turn = self._turn[family]
            self._turn[family] = turn + 1 if turn + 1 < len(items) else 0
            item = items[turn]
        elif rotation == "random":
            item = random.choice(items)  # noqa: S311 - spreading load, not a secret
        elif rotation == "same-as-listen" and listen is not None:
            source = self._held(items, listen)
            if source is not None:
                return source
            item = items[0]
        else:
            item = items[0]
        if isinstance(item, str):
            return item, False
        return _random_in(item), True

    @staticmethod
    def _held(items: List[Item], listen: str) -> Optional[Source]:
        """``listen`` as a source, if the set holds it."""
        try:
            ip = ipaddress.ip_address(listen)
        except ValueError:
            return None
        for item in items:
            if isinstance(item, str):
                if item == listen:
                    return item, False
            elif ip in item:
                return listen, True
        return None


def set_freebind(sock: socket.socket) -> None:
    """Let ``sock`` bind an address on no interface (OSError where it cannot)."""
    if IP_FREEBIND is None:
        raise OSError(errno.ENOPROTOOPT, "IP_FREEBIND is Linux only")
    sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)


def bind_source(sock: socket.socket, source: Source) -> None:
    """Bind ``sock`` to ``source`` (port 0), with IP_FREEBIND when it needs it."""
    if source[1]:
        set_freebind(sock)
    sock.bind((source[0], 0))


def check_on_host(entries: Sequence[str]) -> Optional[str]:
    """
    Why an ``--outgoing`` entry cannot be used here (a bind test of each
    address; a prefix is checked for IP_FREEBIND), or ``None``.
    """
    for entry in entries:
        try:
            item = parse_item(entry)
        except ValueError as e:
            return f"{entry!r}: {e}"
        family = socket.AF_INET6 if family_of(item) == 6 else socket.AF_INET
        source: Source = (
            (item, False) if isinstance(item, str) else (_random_in(item), True)
        )
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                bind_source(sock, source)
        except OSError as e:
            if isinstance(item, str):
                return f"{item} is not an address of this host ({e.strerror or e})"
            return f"{item}: cannot bind an address of the prefix ({e.strerror or e})"
    return None
