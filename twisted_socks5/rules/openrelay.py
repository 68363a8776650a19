"""
The open-relay analysis of a rule set: which clients the rules name on
purpose, and whether anyone else could use the proxy without a password,
checked over the whole IPv4 and IPv6 address spaces.
"""

from __future__ import annotations

import ipaddress
from typing import List, Optional, Tuple

from .names import _MAPPED, IPAddress, IPNetwork
from .rule import _in, _masks
from .ruleset import RuleSet

#: ``from`` networks of public addresses wider than this prefix length (by
#: IP version) name much of the Internet, not a list of clients.
WIDEST_CLIENT_LIST = {4: 8, 6: 32}

_SPACES = (ipaddress.IPv4Network("0.0.0.0/0"), ipaddress.IPv6Network("::/0"))


def client_allow_list(rules: RuleSet) -> List[IPNetwork]:
    """
    The client networks the rules name on purpose: the ``from`` networks of
    ``allow`` rules, less public ones wider than :data:`WIDEST_CLIENT_LIST`
    (``0.0.0.0/0`` is everyone; ``10.0.0.0/8`` or ``fc00::/7`` is a LAN).
    """
    return [
        net
        for rule in rules.rules
        if rule.allow
        for net in rule.clients or ()
        if net.prefixlen >= WIDEST_CLIENT_LIST[net.version] or net.is_private
    ]


def open_relay_clients(
    rules: RuleSet, explicit: bool = False
) -> Optional[Tuple[IPAddress, IPAddress]]:
    """
    The first range of client addresses outside :func:`client_allow_list`
    that some request without authentication could be allowed for (an open
    relay for them), or ``None`` when there is none.  ``explicit``: on a
    server that requires a password, where only SOCKS4 clients go without
    one, and only by an explicit rule.

    The rules see a client only through the ``from`` networks that contain
    it, so the answer is the same for every address between two network
    boundaries: cutting the IPv4 and IPv6 address spaces at every boundary
    and asking once per piece checks the whole space exactly.
    """
    listed = _masks(client_allow_list(rules))
    for space in _SPACES:
        cuts = {int(space.network_address), int(space.broadcast_address) + 1}
        nets = [net for rule in rules.rules for net in rule.clients or ()]
        if space.version == 6:
            nets.append(_MAPPED)  # IPv4 addresses: checked as such above
        for net in nets:
            if net.version == space.version:
                cuts.add(int(net.network_address))
                cuts.add(int(net.broadcast_address) + 1)
        bounds = sorted(cuts)
        make = type(space.network_address)
        for start, end in zip(bounds, bounds[1:]):
            first: IPAddress = make(start)
            if first in _MAPPED or _in(first, listed):
                continue
            if rules.check_anonymous_client(first, explicit).allowed:
                return first, make(end - 1)
    return None
