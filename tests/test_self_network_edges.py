"""
The ``self`` network at its edges: an address of this host with a zone
(``getaddrinfo`` gives link-local answers as ``fe80::1%eth0``) is still this
host, and a text that is no address is not.  In memory.
"""

from __future__ import annotations

import ipaddress

import pytest

from twisted_socks5.selfnet import (
    HostAddresses,
    local_literal,
    reached_from_outside,
    unspecified,
)


def _host() -> HostAddresses:
    return HostAddresses(read=lambda: [ipaddress.ip_address("fe80::1")])


@pytest.mark.parametrize("text", ["fe80::1%eth0", "fe80::1%2", "fe80::1"])
def test_a_host_address_with_a_zone_is_the_host(text: str) -> None:
    host = _host()
    assert text in host
    assert text in host  # answered again from the table of texts seen


@pytest.mark.parametrize("text", ["fe80::2%eth0", "not an address", "", "%eth0"])
def test_other_texts_are_not_the_host(text: str) -> None:
    assert text not in _host()


def test_the_table_of_texts_seen_is_bounded() -> None:
    # Every datagram's target is asked: a client picking fresh addresses
    # must not grow the table without end.
    host = _host()
    for n in range(5000):
        assert f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}" not in host
    assert len(host._seen) <= 4096
    assert "fe80::1%eth0" in host


@pytest.mark.parametrize("thing", [None, 0, b"::1", ("127.0.0.1", 80)])
def test_what_is_no_address_is_not_the_host(thing: object) -> None:
    assert thing not in _host()


@pytest.mark.parametrize(
    ("name", "ip"), [("::1%lo", "::1"), ("fe80::1%eth0", "fe80::1"), ("%lo", None)]
)
def test_a_literal_with_a_zone_stands_for_its_address(name: str, ip: str) -> None:
    # An upstream would read "::1%lo" as its own loopback: it is checked
    # as ::1, never handed on as a name.
    assert local_literal(name) == ip


@pytest.mark.parametrize(
    ("local", "outside"), [("::1%lo", False), ("fe80::1%eth0", True)]
)
def test_a_local_address_with_a_zone(local: str, outside: bool) -> None:
    assert reached_from_outside(local) is outside


@pytest.mark.parametrize(
    ("text", "expected"),
    [("::%eth0", True), ("::ffff:0.0.0.0%1", True), ("fe80::1%eth0", False),
     ("not-an-address", False), ("", False)],
)  # fmt: skip
def test_unspecified_with_a_zone_or_no_address(text: str, expected: bool) -> None:
    assert unspecified(text) is expected
