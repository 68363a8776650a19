"""
The CONNECT filter on its own: a name given to the connector with a check
connects only to an address the check allows, and fails with PolicyDenied
naming the rule when it allows none.  (The server checks resolved addresses
too; this holds the connector's own layer.  Found by mutation testing:
docs/reliability.rst.)
"""

from __future__ import annotations

from typing import Any, List, Optional

import pytest
import pytest_twisted
from conftest import LoopbackResolver, listen
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from twisted_socks5.codec import Address, AddressType
from twisted_socks5.connect import DirectConnector, PolicyDenied


@pytest_twisted.ensureDeferred
async def test_a_name_connects_only_to_an_allowed_address() -> None:
    port = listen(Factory.forProtocol(Protocol))
    try:
        number = port.getHost().port
        connector = DirectConnector(reactor, 5, resolver=LoopbackResolver(v6=False))
        name = Address(AddressType.DOMAIN, "service.test", number)
        asked: List[str] = []

        def allow_v4(ip: str) -> Optional[str]:
            asked.append(ip)
            return None if ip == "127.0.0.1" else "deny to ::1/128"

        protocol: Any = await connector.connect(
            name, Factory.forProtocol(Protocol), allow_v4
        )
        assert protocol.transport.getPeer().host == "127.0.0.1"
        assert asked == ["127.0.0.1"]
        protocol.transport.abortConnection()

        with pytest.raises(PolicyDenied) as denied:
            await connector.connect(
                name, Factory.forProtocol(Protocol), lambda ip: "deny to 127.0.0.0/8"
            )
        assert denied.value.rule == "deny to 127.0.0.0/8"
    finally:
        await port.stopListening()
