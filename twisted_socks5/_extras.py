"""
Optional dependencies (the ``[bcrypt]`` and ``[metrics]`` extras): imported
when first needed, with one message that says which extra installs them.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: Optional module -> the extra of twisted-socks5 that installs it.
EXTRAS = {"bcrypt": "bcrypt", "prometheus_client": "metrics"}


def missing(module: str, needed_by: str) -> str:
    """``"{needed_by} {module}: pip install 'twisted-socks5[extra]'"``."""
    return f"{needed_by} {module}: pip install 'twisted-socks5[{EXTRAS[module]}]'"


def available(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    return importlib.util.find_spec(module) is not None


def optional_import(module: str, needed_by: str) -> Any:
    """``module``, or a ``RuntimeError`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:  # pragma: no cover - depends on the install
        raise RuntimeError(missing(module, needed_by)) from None
