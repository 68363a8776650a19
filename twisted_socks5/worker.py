"""
Deprecated alias of :mod:`twisted_socks5.workerprocess`, kept for one
release: ``python -m twisted_socks5.worker`` still starts a worker process.
The new name keeps it apart from :mod:`twisted_socks5.workers`, the
supervisor.
"""

from __future__ import annotations

import sys

from .workerprocess import main

__all__ = ["main"]

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
