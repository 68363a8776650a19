"""
twistd plugin ``socks5`` and the project's ``twisted.cred`` checker factory
``htpasswd``.  Kept tiny: twistd imports every plugin module at start-up.
"""

from typing import Any

from twisted.application.service import ServiceMaker

from twisted_socks5.htpasswd import HtpasswdCheckerFactory


class _SOCKS5ServiceMaker(ServiceMaker):
    @property
    def options(self) -> Any:
        """``tap.TwistdOptions``: a usage error exits 1 on every Twisted."""
        from twisted_socks5.tap import TwistdOptions

        return TwistdOptions


socks5 = _SOCKS5ServiceMaker(
    "twisted-socks5",
    "twisted_socks5.tap",
    "A SOCKS5 proxy server (RFC 1928/1929)",
    "socks5",
)

htpasswd = HtpasswdCheckerFactory()
