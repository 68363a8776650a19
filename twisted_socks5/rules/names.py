"""
How the rules spell clients and destinations: IP networks (IPv4-mapped ones
are IPv4), the ASCII forms of a domain name, and host patterns.  Shared by
the parser and the checks.
"""

from __future__ import annotations

import ipaddress
import unicodedata
from typing import Callable, List, Tuple, Union

from ..addresses import parse_ip

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
#: IP addresses may be passed as ``ipaddress`` objects or as text.
IPLike = Union[IPAddress, str]

_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")

#: The ``to`` item naming the proxy host (a name, not a host pattern).
SELF = "self"


#: Deprecated name of :func:`~twisted_socks5.addresses.parse_ip` (it returns
#: an ``ipaddress`` object, unlike BIND's ``normalize_ip``), kept for one release.
normalise_ip = parse_ip


def normalise_network(net: IPNetwork) -> IPNetwork:
    """``::ffff:a.b.c.d/N`` (N >= 96) is the IPv4 network ``a.b.c.d/(N-96)``."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network(
            (int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96)
        )
    return net


def _idna2003(name: str) -> str:
    return name.encode("idna").decode("ascii")


_ENCODERS: List[Callable[[str], str]] = [_idna2003]
try:  # Twisted's HostnameEndpoint uses the idna package (IDNA 2008) if present.
    import idna as _idna_package
except ImportError:  # pragma: no cover - idna is usually installed
    pass
else:
    _ENCODERS.append(lambda name: _idna_package.encode(name).decode("ascii"))


def name_forms(name: str) -> Tuple[str, ...]:
    """
    The ASCII forms a resolver may look ``name`` up as: lower case, no
    trailing dot, IDNA encoded.  An ASCII name has one form.  A few
    internationalised names have two, because IDNA 2003 (Python's codec) and
    IDNA 2008 (the ``idna`` package) disagree on them (``straße.de`` is
    ``strasse.de`` or ``xn--strae-oqa.de``): rules then judge both forms,
    the stricter way (see :meth:`Rule.match_names`).
    """
    name = name.rstrip(".").lower()
    if name.isascii():
        return (name,)
    name = unicodedata.normalize("NFC", name)
    forms: List[str] = []
    for encode in _ENCODERS:
        try:
            form = encode(name).rstrip(".")
        except UnicodeError:
            continue
        if form not in forms:
            forms.append(form)
    return tuple(forms) or (name,)


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


def _canonical_pattern(pattern: str) -> str:
    """Validate a host pattern; return it normalised. Raises ValueError."""
    prefix = next(p for p in ("*.", ".", "") if pattern.startswith(p))
    forms = name_forms(pattern[len(prefix) :])
    if len(forms) > 1:
        raise ValueError(
            f"ambiguous internationalised name in {pattern!r}: write it as "
            + " or ".join(prefix + form for form in forms)
        )
    name = forms[0]
    if not prefix and name == SELF:
        # "self." or "SELF" spelled as a name would be a host called self,
        # not the proxy host: "deny to self." must not silently mean that.
        raise ValueError(
            f"{pattern!r} would name a host called 'self'; write self (no dot) "
            "for the proxy host"
        )
    labels = name.split(".")
    if (
        not name
        or _looks_like_ip(name)
        or len(name) > 253
        or not all(0 < len(label) <= 63 for label in labels)
        or not all(char in _NAME_CHARS for char in name.replace(".", ""))
    ):
        raise ValueError(
            f"invalid host pattern {pattern!r} (expected name, *.name or .name)"
        )
    return prefix + name


def _parse_network(text: str) -> IPNetwork:
    try:
        network = ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        if "has host bits set" in str(e):
            loose = ipaddress.ip_network(text, strict=False)
            raise ValueError(
                f"{text} has host bits set (did you mean {loose}?)"
            ) from None
        raise ValueError(f"invalid IP network {text!r}") from None
    return normalise_network(network)


def _looks_like_ip(text: str) -> bool:
    return ":" in text or "/" in text or all(c in "0123456789." for c in text)
