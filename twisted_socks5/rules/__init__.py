"""
Access rules: who may connect, and where to.

The server asks an :class:`IPolicy` three questions, each at the earliest
moment it can be answered:

1. :meth:`IPolicy.check_client` when a TCP client connects, before any SOCKS
   byte is read;
2. :meth:`IPolicy.check_request` for every request (CONNECT, BIND, UDP
   ASSOCIATE, and every UDP datagram), with the destination as sent: an IP
   address or a domain name;
3. :meth:`IPolicy.check_resolved` for every IP address the server is about to
   use: each address a name resolves to, the peer that connects to a BIND, the
   destination of each UDP datagram.

:class:`AllowAll` is the policy when no rules are configured; :class:`RuleSet`
reads a rules file.

Rules file
==========

One rule per line; ``#`` starts a comment, blank lines are ignored.  The
rules are tried from the top and the **first rule that matches decides**.
When none matches, the ``default`` line decides; without one the default is
``deny``: a rules file exists to restrict access, and a forgotten last line
must not silently open the proxy (fail closed).  Example::

    deny  from 198.51.100.7           # refused before any SOCKS byte
    # Never reach the proxy host or private networks, whatever the name used.
    deny  to self, 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16
    deny  to 169.254.0.0/16, 100.64.0.0/10, fc00::/7, fe80::/10
    # The office may browse these sites; alice may also use UDP for DNS.
    allow from 192.0.2.0/24 to .example.com, *.example.net port 80, 443
    allow user alice command udp to 9.9.9.9 port 53
    allow user *                      # any authenticated user, anywhere else
    default deny

Grammar (ABNF-like; keywords and host names are case-insensitive, user names
are not; items of a list are separated by commas, with optional spaces around
the commas)::

    file        = *( [ statement ] [ "#" comment ] newline )
    statement   = rule / default
    rule        = action *condition          ; each keyword at most once
    default     = "default" action           ; at most once, after every rule
    action      = "allow" / "deny"
    condition   = "from"    cidr *( "," cidr )
                / "to"      target *( "," target )
                / "port"    ports *( "," ports )
                / "command" command *( "," command )
                / "user"    user *( "," user )
                / "protocol" protocol *( "," protocol )
                / "via"     route              ; allow rules only
    cidr        = ip-address [ "/" prefix-length ]  ; host bits must be zero
    target      = cidr / host-pattern / "self"
    host-pattern = name                ; exactly this name
                / "*." name            ; any name below it, not the name itself
                / "." name             ; the name and any name below it
    ports       = port / port "-" port ; 0 to 65535, first <= last; inclusive
    command     = "connect" / "bind" / "udp"
    user        = user-name            ; exactly this authenticated user
                / "*"                  ; any authenticated user
                / "-"                  ; an anonymous client (no authentication)
    protocol    = "socks5" / "socks4" / "http"   ; what the client speaks
    route       = "direct" / route-name  ; --upstream NAME=URL, --outgoing NAME=ADDRESS

A rule matches when **all** its conditions match; a rule without conditions
matches everything.  Within one condition, **any** item may match.

``from``
    The client's IP address.
``to``
    The destination.  A CIDR matches an IP destination, and each address a
    domain name resolves to: ``deny to 127.0.0.0/8, ::1/128`` also refuses
    ``localhost`` and any name pointing into those networks, so rules cannot be
    bypassed with DNS.  A host pattern matches a destination given as a domain
    name (compared in lower case, IDNA encoded, without a trailing dot); it
    never matches an IP destination, nor a name that is an IP literal.  An
    item made of digits and dots only, or containing ``:`` or ``/``, is read
    as a CIDR.  Write internationalised names whose IDNA 2003 and IDNA 2008
    encodings differ (``straße.de``) in their ``xn--`` form; a client sending
    such a name is judged on both encodings, the stricter way.  A host has
    many names: protect networks with CIDRs, not with ``deny to NAME``.
    ``self`` is the proxy host: loopback, the unspecified addresses and the
    host's own interface addresses (see :mod:`twisted_socks5.selfnet`).
``port``
    The destination port.
``command``
    The SOCKS command; ``udp`` is UDP ASSOCIATE.
``user``
    The name the client authenticated as.  Names may not contain spaces,
    commas or ``#``.
``protocol``
    What the client speaks (``--protocols``), known from its first byte on:
    undecided when it connects.  On a server that requires a password, a
    client without one (SOCKS4) is allowed only by an ``allow`` rule naming
    both its protocol and ``from`` networks (the checks' ``explicit``), and
    never by the default.
``via``
    Not a condition but a route, on ``allow`` rules: a CONNECT this rule
    allows leaves through the upstream server named ``NAME`` (``twistd socks5
    --upstream NAME=URL``), or straight to the destination from the source
    addresses named ``NAME`` (``--outgoing NAME=ADDRESS``, also used by UDP
    ASSOCIATE's outbound sockets), or straight to the destination with
    ``direct``.
    The rule that finally allows the request decides, after name resolution
    when it needs the addresses.  Requests allowed by a rule without ``via``
    take the default route.

IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``) are IPv4 addresses
everywhere: clients, destinations, resolved addresses and networks written in
the file (``::ffff:10.0.0.0/104`` is read as ``10.0.0.0/8``).  An IPv6 network
therefore never matches an IPv4 address, even ``::/0``.  Other IPv6 forms that
embed an IPv4 address (NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``) are plain
IPv6 addresses: deny them explicitly if your network routes them.

What each check knows
=====================

A rule is decided on what is known at the time of a check; a condition that
cannot be decided yet makes the rule *undecided*:

* ``check_client`` knows only ``from``.  It denies a client when **every**
  request it could make would be denied (for instance ``deny from 198.51.100.7``,
  or ``allow from 192.0.2.0/24`` followed by ``default deny`` for any other
  client), so refusing early never changes an outcome.  Put ``deny from``
  lines first: a rule above them that some request could match (``allow user
  alice``) keeps the client connected until its request is known.
* ``check_request`` knows everything but, for a domain name, the addresses it
  resolves to: host patterns decide, CIDRs are undecided.  For BIND and UDP
  ASSOCIATE, an unspecified address (``0.0.0.0``, ``::``) leaves ``to`` and
  ``port`` undecided, and port 0 leaves ``port`` undecided: such requests do
  not name a destination yet.
* ``check_resolved`` knows everything: it is the final word.

When an undecided rule comes before the rule that decides, and the two would
answer differently, the answer depends on the address: the check returns a
provisional ``Decision(allowed=True, final=False)`` and the server must call
``check_resolved`` for each address before using it.  A ``final`` decision can
be relied on: ``check_resolved`` will agree with it.

First match wins across both steps: with ``allow to .example.com`` above
``deny to 10.0.0.0/8``, ``example.com`` is allowed even when it resolves to
``10.0.0.1``.  Put the ``deny to`` lines that protect internal networks first.
"""

from .decision import AllowAll, Decision, IPolicy, RulesError, allows
from .file import RulesFile
from .limit import BandwidthLimit, LimitLine
from .names import (
    SELF,
    IPAddress,
    IPLike,
    IPNetwork,
    name_forms,
    normalise_ip,
    normalise_network,
)
from .openrelay import WIDEST_CLIENT_LIST, client_allow_list, open_relay_clients
from .rule import ANONYMOUS, ANY_USER, Rule
from .ruleset import RuleSet

__all__ = [
    "Decision",
    "allows",
    "IPolicy",
    "RulesError",
    "AllowAll",
    "IPAddress",
    "IPNetwork",
    "IPLike",
    "normalise_ip",
    "normalise_network",
    "name_forms",
    "ANY_USER",
    "ANONYMOUS",
    "SELF",
    "Rule",
    "RuleSet",
    "WIDEST_CLIENT_LIST",
    "client_allow_list",
    "open_relay_clients",
    "RulesFile",
    "LimitLine",
    "BandwidthLimit",
]
