"""
JSON logs: ``twistd --logger socks5_json_log.observer socks5 ...`` writes one
JSON object per log event, one per line, on standard output (for journald,
Loki, Elasticsearch...).  Every connection's event carries
``"event": "socks5.connection"`` and its fields.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def observer() -> ILogObserver:
    """The observer factory ``twistd --logger`` calls, with no arguments."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
