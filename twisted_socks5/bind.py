"""
BIND's old home: :class:`BindWaiter` now lives in
:mod:`twisted_socks5.commands.bind` with the BIND handler, and
:func:`normalize_ip` in :mod:`twisted_socks5.selfnet`; both are still
importable from here.
"""

from __future__ import annotations

from .commands.bind import BindWaiter
from .selfnet import normalize_ip

__all__ = ["BindWaiter", "normalize_ip"]
