r"""
The ``socks5:`` client endpoint description, for ``clientFromString``.

Syntax (``[...]`` is optional; ``:`` inside a value is escaped as ``\:``)::

    socks5:HOST:PORT:PROXY[:username=NAME:password=SECRET][:timeout=SECONDS]
                          [:resolve=local][:tls=true[:trustRoot=PATH]]
    socks5:host=HOST:port=PORT:PROXY[...]

where PROXY, the way to the SOCKS5 server, is one of

``proxy=DESCRIPTION``
    any client endpoint description, its colons escaped once (and its
    backslashes doubled), e.g. ``proxy=tcp\:127.0.0.1\:1080``,
    ``proxy=tls\:proxy.example\:1080`` or ``proxy=unix\:/run/socks.sock``;
``proxyHost=HOST[:proxyPort=PORT]``
    a ``HostnameEndpoint``; the port defaults to 1080.  This shorter form
    avoids nested escaping: an IPv6 proxy is ``proxyHost=\:\:1``, where
    ``proxy=`` would need ``tcp\:\\\:\\\:1\:1080``.

Parameters are spelt as Twisted spells its own (``proxyHost``,
``proxyPort``, ``trustRoot``) or in the older snake_case (``proxy_host``,
``proxy_port``, ``trust_root``); ``username`` may also be ``user``.  Two
spellings of one parameter with different values are an error.

Examples::

    socks5:example.com:80:proxy=tcp\:127.0.0.1\:1080
    socks5:host=example.com:port=80:proxy=tcp\:127.0.0.1\:1080
    socks5:\:\:1:443:proxyHost=proxy.example:proxyPort=1081:timeout=30
    socks5:example.com:80:proxyHost=127.0.0.1:username=alice:password=s3cret
    socks5:example.com:443:proxyHost=127.0.0.1:tls=true:trustRoot=/etc/ca.pem

``HOST`` may be a name, an IPv4 or an (escaped) IPv6 literal.  Names are
resolved by the proxy unless ``resolve=local`` (then by the reactor's name
resolver).  ``timeout`` bounds the whole connection, proxy included.
``tls=true`` speaks TLS to HOST through the tunnel, its certificate verified
for HOST against ``trustRoot`` (a PEM file or a directory of ``*.pem``
files) or the platform's trust store.

Twisted imports every module here when it looks for any plugin, so this one
imports nothing of twisted_socks5 until a ``socks5:`` string is parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import (
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
)
from twisted.plugin import IPlugin
from zope.interface import implementer


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class SOCKS5ClientParser:
    """Parses ``socks5:`` descriptions into ``SOCKS5ClientEndpoint``\\ s."""

    prefix = "socks5"

    def parseStreamClient(
        self, reactor: Any, *args: object, **kwargs: object
    ) -> IStreamClientEndpoint:
        from twisted_socks5.client import endpoint_from_description

        return endpoint_from_description(reactor, *args, **kwargs)


socks5ClientParser = SOCKS5ClientParser()
