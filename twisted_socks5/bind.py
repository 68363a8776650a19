"""
BIND's old home: :class:`BindWaiter` now lives in
:mod:`twisted_socks5.commands.bind` with the BIND handler, and
:func:`normalize_ip` is :func:`twisted_socks5.addresses.canonical_ip_text`;
both are still importable from here.
"""

from __future__ import annotations

from .addresses import canonical_ip_text as normalize_ip
from .commands.bind import BindWaiter

__all__ = ["BindWaiter", "normalize_ip"]
