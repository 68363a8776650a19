"""
Deprecated alias of :mod:`twisted_socks5.outbound` and
:mod:`twisted_socks5.replies`, kept for one release.

The outbound connectors moved to :mod:`twisted_socks5.outbound` (a name that
says what they are; this module never held the CONNECT command), and the
reply-code table to :mod:`twisted_socks5.replies`.  Import from there.
"""

from .outbound import (
    DirectConnector,
    IOutboundConnector,
    first_allowed,
)
from .replies import PolicyDenied, reply_for_failure

__all__ = [
    "DirectConnector",
    "IOutboundConnector",
    "PolicyDenied",
    "first_allowed",
    "reply_for_failure",
]
