"""
twistd plugin ``socks5`` and the project's ``twisted.cred`` checker factory
``htpasswd``.  Kept tiny: twistd imports every plugin module at start-up.
"""

from twisted.application.service import ServiceMaker

from twisted_socks5.htpasswd import HtpasswdCheckerFactory

socks5 = ServiceMaker(
    "twisted-socks5",
    "twisted_socks5.tap",
    "A SOCKS5 proxy server (RFC 1928/1929)",
    "socks5",
)

htpasswd = HtpasswdCheckerFactory()
