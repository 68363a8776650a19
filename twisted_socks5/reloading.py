"""
Re-reading configuration files while serving (SIGHUP): what a server can
reload, and the reload itself, which never touches open tunnels and keeps a
file's old contents, saying why, when its new ones fail to load.
"""

from __future__ import annotations

from typing import Any, Iterable, List, Optional

from twisted.logger import Logger


def reloadables(
    protect_host: Optional[Any],
    policy: Optional[Any],
    authenticators: Iterable[Any],
    resolver: Optional[Any] = None,
) -> List[Any]:
    """
    Everything with a ``reload()``: the proxy host's addresses, the access
    rules, authenticators (plugins included), the credential checkers
    behind them, and the name resolver (its hosts file, its cache).
    """
    found: List[Any] = []
    if resolver is not None and hasattr(resolver, "reload"):
        found.append(resolver)
    if protect_host is not None:
        found.append(protect_host)
    if policy is not None and hasattr(policy, "reload"):
        found.append(policy)
    for authenticator in authenticators:
        if hasattr(authenticator, "reload"):
            found.append(authenticator)
        portal = getattr(authenticator, "portal", None)
        for checker in getattr(portal, "checkers", {}).values():
            if hasattr(checker, "reload") and checker not in found:
                found.append(checker)
    return found


def reload_all(items: Iterable[Any], log: Logger) -> None:
    """Reload each of ``items``; one that fails keeps its old contents."""
    for item in items:
        try:
            item.reload()
        except (ValueError, OSError) as e:  # a broken file: RulesError says where
            log.warn(
                "reload of {item!r} failed, keeping it as it was: {error}",
                item=item,
                error=str(e),
                event="socks5.reload_failed",
            )
        except Exception:  # noqa: BLE001 - keep serving with the old one
            log.failure("reload of {item!r} failed; keeping it as it was", item=item)
        else:
            log.info("reloaded {item!r}", item=item, event="socks5.reloaded")
