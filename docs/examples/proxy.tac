# Run with:  PYTHONPATH=docs/examples twistd -ny docs/examples/proxy.tac
# (a .tac file is Python that twistd runs to find `application`).  It needs
# users.txt in the current directory, one user:password a line, e.g.
#   printf 'alice:change-me\n' > users.txt && chmod 600 users.txt
from twisted.application.service import Application
from twisted.cred.checkers import FilePasswordDB
from twisted.internet import reactor

from socks5_connectors import PortAllowListConnector
from socks5_embedding import make_proxy_service
from twisted_socks5 import DirectConnector

application = Application("socks5-proxy")

connector = PortAllowListConnector(DirectConnector(reactor, timeout=10), [80, 443])
proxy = make_proxy_service(
    reactor,
    ["tcp:1080:interface=127.0.0.1", "tcp:1080:interface=::1"],
    checkers=[FilePasswordDB("users.txt", cache=True)],
    connector=connector,
)
proxy.setServiceParent(application)
