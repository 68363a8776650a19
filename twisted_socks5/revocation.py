"""
Revocation: closing open connections that the configuration no longer
allows, and one connection on demand (the live console's buttons).

On reload (SIGHUP, or the console's reload, which calls the same
:meth:`~twisted_socks5.server.SOCKS5ServerFactory.reload`) :func:`sweep`
checks every open tunnel, UDP association and BIND wait again:

* **credentials**: at login the connection keeps a fingerprint (a keyed
  hash, never the password or the stored hash itself) of the user's entry
  in the password file (``htpasswd:``, ``file:``, ``memory:``); a user whose
  entry is gone or different after the reload is cut off.  Users checked by
  a back end that shows no entries (``unix``, PAM, plugins) are not.
* **rules**: the rules' decision is made again for the connection's client,
  user, command and destination, with the same checks as the request's
  (:func:`~twisted_socks5.commands.base.handler_for`'s ``check_request``,
  then :func:`~twisted_socks5.commands.base.resolved_decision` for the
  address used).  A destination that was a name is judged by its name and,
  when the rules need an address for it, by the address the tunnel
  actually reached, never by a new look-up: no DNS during a sweep.  Through
  an upstream that resolved the name itself only the name is judged.  A UDP
  association is judged as its request was (its datagrams meet the new
  rules one by one anyway); a BIND wait by the peer it expects.

The sweep touches each connection once, with no I/O: its cost is the rules'
matching per connection (the checks the request itself met), run in slices
of at most :data:`SLICE` connections and :data:`SLICE_SECONDS`, so the
reactor serves between them.  Connections still connecting are left to finish (the
connect timeout bounds them; a new request meets the new rules).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from typing import Any, Callable, Dict, Iterable, List, Optional

from twisted.cred.checkers import (
    FilePasswordDB,
    InMemoryUsernamePasswordDatabaseDontUse,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger

from .addresses import canonical_ip_text
from .codec import Address, AddressType, Command
from .commands.base import request_decision, resolved_decision
from .connection import State
from .htpasswd import HtpasswdChecker
from .logs import escape_word

log = Logger("twisted_socks5.server.SOCKS5ServerFactory")

#: Connections looked at per reactor turn during a sweep, at most...
SLICE = 2000
#: ...and for at most this many seconds: a long rules file costs more
#: per connection, never a longer stall of the relay.
SLICE_SECONDS = 0.005

#: The states of connections that hold something to revoke.
_LIVE = frozenset((State.RELAYING, State.BINDING, State.ASSOCIATED))


def _revocable(connection: Any) -> bool:
    """
    Holding something to revoke: a tunnel, association or BIND wait, or an
    HTTP keep-alive connection that has served (its accepted
    Proxy-Authorization serves its next requests unchecked).
    """
    if connection.request is None:
        return False
    return connection.state in _LIVE or (
        connection.state is State.REQUEST and connection.protocol == "http"
    )


#: Keys the fingerprints: a connection object holds no value a password
#: (or a stored hash) could be guessed from offline.
_KEY = os.urandom(32)


def _fingerprint(entry: bytes) -> bytes:
    return hmac.new(_KEY, entry, hashlib.sha256).digest()[:16]


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


def _file_entries(checker: FilePasswordDB) -> Dict[bytes, bytes]:
    """
    A ``file:`` checker's entries, read as it reads them (first line of a
    user wins, as ``getUser`` finds it).
    """
    entries: Dict[bytes, bytes] = {}
    delim = _as_bytes(checker.delim)
    with open(checker.filename, "rb") as f:
        for line in f:
            parts = line.rstrip().split(delim)
            if checker.ufield >= len(parts) or checker.pfield >= len(parts):
                continue
            user = parts[checker.ufield]
            if not checker.caseSensitive:
                user = user.lower()
            entries.setdefault(user, parts[checker.pfield])
    return entries


def stored_entries(checker: Any) -> Optional[Dict[bytes, bytes]]:
    """
    ``{user: stored entry}`` of a password checker whose entries can be
    read, or ``None`` (a back end that shows none: never revoked for it).
    """
    if isinstance(checker, HtpasswdChecker):
        return checker.entries()
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        return {_as_bytes(k): _as_bytes(v) for k, v in checker.users.items()}
    if isinstance(checker, FilePasswordDB):
        try:
            return _file_entries(checker)
        except OSError:
            return None
    return None


def _entry(checker: Any, key: bytes, user: str) -> Optional[bytes]:
    """One user's stored entry in a checker :func:`stored_entries` reads."""
    if isinstance(checker, HtpasswdChecker):
        return checker.entry(key)
    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        users: Dict[Any, Any] = checker.users
        found = users.get(key, users.get(user))
        return None if found is None else _as_bytes(found)
    try:
        return _as_bytes(checker.getUser(key)[1])
    except (KeyError, UnauthorizedLogin):
        return None


class Credentials:
    """
    The password checkers whose entries can be fingerprinted: one
    fingerprint per login (:meth:`fingerprint`), one snapshot per sweep
    (:meth:`current`).
    """

    def __init__(self, checkers: Iterable[Any]) -> None:
        self.checkers = [c for c in checkers if stored_entries(c) is not None]

    @classmethod
    def of(cls, authenticators: Iterable[Any]) -> Optional[Credentials]:
        """Those behind ``authenticators``' portals; ``None`` if none can be read."""
        checkers: List[Any] = []
        for authenticator in authenticators:
            portal = getattr(authenticator, "portal", None)
            checkers.extend(getattr(portal, "checkers", {}).values())
        found = cls(checkers)
        return found if found.checkers else None

    def _lookup(self, entries: Dict[bytes, bytes], checker: Any, key: bytes) -> Any:
        if isinstance(checker, FilePasswordDB) and not checker.caseSensitive:
            key = key.lower()
        return entries.get(key)

    def fingerprint(self, user: str) -> Optional[bytes]:
        """
        The fingerprint of ``user``'s entry now (``None``: not in any
        file): one look-up, as the login's own check made (a ``file:``
        checker reads its file again, as it does for each login).
        """
        key = user.encode("utf-8")
        for checker in self.checkers:
            entry = _entry(checker, key, user)
            if entry is not None:
                return _fingerprint(entry)
        return None

    def current(self) -> Callable[[str], Optional[bytes]]:
        """Each user's fingerprint as the files are now: read once."""
        tables = [(c, stored_entries(c) or {}) for c in self.checkers]
        seen: Dict[str, Optional[bytes]] = {}

        def lookup(user: str) -> Optional[bytes]:
            if user not in seen:
                key = user.encode("utf-8")
                found = None
                for checker, entries in tables:
                    entry = self._lookup(entries, checker, key)
                    if entry is not None:
                        found = _fingerprint(entry)
                        break
                seen[user] = found
            return seen[user]

        return lookup


# ----------------------------------------------------------------------
# One connection


def revoke(connection: Any, why: str) -> bool:
    """
    Close one connection now (a TCP tunnel, a UDP association, a BIND
    wait, or one still in its handshake): both ends of a tunnel, the
    association's sockets, the BIND port.  Its connection log line and
    access-log record say ``revoked: WHY`` (outcome ``revoked``).  False
    if it was closing already.
    """
    if connection.state is State.CLOSING or connection.transport.disconnected:
        return False
    connection.revoked = why
    pending, connection.pending = connection.pending, None
    if pending is not None:
        pending.cancel()  # a connect under way: it says nothing more
    connection.outcome = f"revoked: {why}"
    connection.log.info(
        "{client} {user} revoked: {why}",
        client=escape_word(connection.client_ip),
        user=escape_word(connection.user),
        why=why,
        event="socks5.revoked",
    )
    connection.state = State.CLOSING
    connection.setTimeout(None)
    # Aborted, not closed: a revoked client gets nothing more, even what
    # is still queued for it; its connectionLost closes the rest.
    connection.transport.abortConnection()
    return True


# ----------------------------------------------------------------------
# The sweep


def _address_used(connection: Any) -> Optional[str]:
    """
    The IP a connection's destination check used: a BIND's peer, a
    CONNECT's IP or the address its name reached (a direct connection's
    peer; through an upstream, only when this server resolved it).
    """
    if connection.peer is not None:
        return str(connection.peer.host)
    request = connection.request
    if request.command is not Command.CONNECT:
        return None
    if request.address.type is not AddressType.DOMAIN:
        return str(request.address.host)
    if connection.resolved is not None:
        return str(connection.resolved.host)
    tunnel = connection.tunnel
    outbound = tunnel.outbound if tunnel is not None else None
    if outbound is None or isinstance(
        getattr(outbound.transport, "bound", None), Address
    ):
        return None
    host = getattr(outbound.transport.getPeer(), "host", None)
    return canonical_ip_text(host) if isinstance(host, str) else None


def rules_verdict(connection: Any) -> Optional[str]:
    """The rule that denies this connection now, or ``None``."""
    factory = connection.factory
    request = connection.request
    handler = factory.handlers.get(request.command)
    if handler is None:
        return None
    destination = handler.rules_destination(request)
    if factory.policy is not None:
        # SOCKS4 and HTTP clients as when they asked (their protocol, and
        # whether they came without the password the server requires).
        decision = request_decision(connection, request.command, destination)
        if not decision.allowed:
            return str(decision.rule)
    ip = _address_used(connection)
    if ip is None:
        return None
    decision = resolved_decision(connection, destination, ip)
    return None if decision.allowed else str(decision.rule)


def credentials_verdict(
    connection: Any, current: Optional[Callable[[str], Optional[bytes]]]
) -> Optional[str]:
    """Why this connection's login no longer holds, or ``None``."""
    held = connection.credential
    if held is None or current is None:
        return None
    now = current(connection.user)
    if now is None:
        return "user removed from the password file"
    if not hmac.compare_digest(now, held):
        return "password file entry changed"
    return None


def verdict(
    connection: Any, current: Optional[Callable[[str], Optional[bytes]]]
) -> Optional[str]:
    """Why to revoke ``connection`` under the configuration now, or ``None``."""
    why = credentials_verdict(connection, current)
    if why is not None:
        return why
    rule = rules_verdict(connection)
    return None if rule is None else f"denied by {rule}"


def sweep(
    factory: Any, slice_size: int = SLICE, slice_seconds: float = SLICE_SECONDS
) -> defer.Deferred[int]:
    """
    Revoke the open connections the configuration (just reloaded) no
    longer allows; fires with how many were, once all were looked at.
    The first slice runs now, the next ones on later reactor turns.
    """
    credentials: Optional[Credentials] = factory.credentials
    current = credentials.current() if credentials is not None else None
    live = [c for c in factory.active if _revocable(c)]
    done: defer.Deferred[int] = defer.Deferred()
    revoked = [0]

    def look(start: int) -> None:
        deadline = time.perf_counter() + slice_seconds
        index, end = start, min(len(live), start + slice_size)
        while index < end:
            connection = live[index]
            index += 1
            if _revocable(connection):  # else closed meanwhile
                try:
                    why = verdict(connection, current)
                    if why is not None and revoke(connection, why):
                        revoked[0] += 1
                except Exception:  # noqa: BLE001 - one bad check stops no sweep
                    log.failure("revocation check of {c!r} failed", c=connection)
            if time.perf_counter() >= deadline:
                break
        if index < len(live):
            factory.reactor.callLater(0, look, index)
            return
        log.info(
            "reload: {revoked} of {count} open connection(s) revoked",
            revoked=revoked[0],
            count=len(live),
            event="socks5.revocation_sweep",
        )
        done.callback(revoked[0])

    look(0)
    return done
