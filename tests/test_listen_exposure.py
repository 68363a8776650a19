"""
Whether a listener counts as exposed: an IPv6 address with a zone is judged
by its address.  (Found by mutation testing: docs/reliability.rst.)
"""

from __future__ import annotations

import pytest
from twisted.python import usage

from twisted_socks5.tap import Options


def test_loopback_with_a_zone_is_not_exposed() -> None:
    Options().parseOptions(["--listen", "tcp:1080:interface=::1%lo"])


def test_link_local_with_a_zone_is_exposed() -> None:
    with pytest.raises(usage.UsageError, match="open proxy"):
        Options().parseOptions(["--listen", "tcp:1080:interface=fe80::1%lo"])
