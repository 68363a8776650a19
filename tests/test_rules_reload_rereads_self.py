"""
A rules file's reload reads the host's addresses again for its ``self``
network, also on a server without host protection (listening on loopback
only), where nothing else re-reads them: ``deny to self`` keeps covering an
address the host gained.  In memory.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any, List

from twisted.internet.testing import MemoryReactorClock

from twisted_socks5.codec import Address, Command
from twisted_socks5.selfnet import HostAddresses
from twisted_socks5.server import SOCKS5ServerFactory
from twisted_socks5.tap import RulesFile


def test_deny_to_self_covers_an_address_gained_before_a_reload(tmp_path: Path) -> None:
    addresses = ["192.0.2.10"]

    def read() -> List[Any]:
        return [ipaddress.ip_address(a) for a in addresses]

    path = tmp_path / "rules.conf"
    path.write_text("deny to self\ndefault allow\n")
    rules = RulesFile(str(path), HostAddresses(read=read))
    factory = SOCKS5ServerFactory(
        reactor=MemoryReactorClock(), policy=rules, protect_host=None
    )
    new = Address.from_host("192.0.2.11", 80)
    assert rules.check_resolved(
        "127.0.0.1", None, Command.CONNECT, new, "192.0.2.11"
    ).allowed
    addresses.append("192.0.2.11")
    factory.reload()
    decision = rules.check_resolved(
        "127.0.0.1", None, Command.CONNECT, new, "192.0.2.11"
    )
    assert not decision.allowed
