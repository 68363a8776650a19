"""
treq through a SOCKS5 proxy: :func:`twisted_socks5.agent.socks5_agent` is
the ``IAgent``, for ``http`` and ``https`` (TLS through the tunnel, verified
against the platform's trust store, or ``trust_root``).  The proxy resolves
the host names.

Run it::

    python docs/examples/socks5_client.py https://example.com/ tcp:127.0.0.1:1080
    python docs/examples/socks5_client.py https://intranet.test/ tcp:127.0.0.1:1080 \
        ca.pem
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import treq

from twisted_socks5.agent import socks5_agent


async def fetch(
    reactor: Any, url: str, proxy: str, trust_root: Optional[str] = None
) -> bytes:
    agent = socks5_agent(reactor, proxy, trust_root=trust_root)
    response = await treq.get(url, agent=agent)
    body: bytes = await response.content()
    return body


def main(reactor: Any, url: str, proxy: str = "tcp:127.0.0.1:1080", *rest: str) -> Any:
    from twisted.internet.defer import ensureDeferred

    d = ensureDeferred(fetch(reactor, url, proxy, *rest))
    return d.addCallback(lambda body: sys.stdout.buffer.write(body))


if __name__ == "__main__":
    from twisted.internet.task import react

    react(main, sys.argv[1:])
