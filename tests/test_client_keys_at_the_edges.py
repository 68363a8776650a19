"""
What the per-client limits count an IPv6 client as, at the edges of the
prefix: every prefix below 128 groups the network, 128 is the address.
"""

from __future__ import annotations

import pytest

from twisted_socks5.limits import client_key


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        (127, "2001:db8::/127"),
        (126, "2001:db8::/126"),
        (128, "2001:db8::1"),
        (64, "2001:db8::/64"),
        (0, "::/0"),
    ],
)
def test_an_ipv6_client_counts_as_its_network(prefix: int, key: str) -> None:
    assert client_key("2001:db8::1", prefix) == key


def test_a_mapped_client_counts_as_its_ipv4_address() -> None:
    assert client_key("::ffff:192.0.2.1", 64) == "192.0.2.1"
