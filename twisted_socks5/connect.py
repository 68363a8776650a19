"""
Deprecated alias of :mod:`twisted_socks5.outbound` and
:mod:`twisted_socks5.replies`, kept for one release.

The outbound connectors moved to :mod:`twisted_socks5.outbound` (a name that
says what they are; this module never held the CONNECT command), and the
reply-code table to :mod:`twisted_socks5.replies`.  Import from there.
"""

from .outbound import (
    MAX_ADDRESSES_PER_FAMILY,
    DirectConnector,
    IOutboundConnector,
    first_allowed,
    interleave_families,
)
from .replies import PolicyDenied, reply_for_failure

__all__ = [
    "MAX_ADDRESSES_PER_FAMILY",
    "DirectConnector",
    "IOutboundConnector",
    "PolicyDenied",
    "first_allowed",
    "interleave_families",
    "reply_for_failure",
]
