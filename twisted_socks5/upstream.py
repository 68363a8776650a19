"""
Deprecated alias of :mod:`twisted_socks5.outbound`, kept for one release.

The upstream connector moved to :mod:`twisted_socks5.outbound`, beside the
direct one.  Import from there.
"""

from .outbound import Upstream, UpstreamConnector, UpstreamUnavailable, parse_upstream

__all__ = ["Upstream", "UpstreamConnector", "UpstreamUnavailable", "parse_upstream"]
