"""
``--auth htpasswd:FILE``: a ``twisted.cred`` checker for bcrypt htpasswd files
(``htpasswd -B``: ``$2y$``, ``$2b$``, ``$2a$`` hashes).

bcrypt is slow on purpose (milliseconds to seconds), so every check runs in
a :class:`HashPool`: a few threads of its own, never the reactor thread and
never the reactor's shared pool, where name resolution waits its turn.  The
file is re-read when its modification time changes, so credentials change
without a restart.  Unknown users are checked against a dummy hash of the
file's own bcrypt cost, so that their answer takes as long as a wrong
password.  As ``htpasswd`` does, only a password's first 72 bytes count.
"""

from __future__ import annotations

import collections
import os
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.strcred import ICheckerFactory
from twisted.internet import defer
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from ._extras import optional_import
from .auth import CheckerBusy
from .limits import checking_client

_BCRYPT_PREFIXES = (b"$2y$", b"$2b$", b"$2a$")
#: bcrypt of a random string; its cost field is replaced by the file's cost.
_DUMMY_HASH = b"$2b$12$eUrmJJnmTS/TtgXfaX9I/..8bKyuzIk.TZmnhrIvNZCW03epEou/u"
#: The cost of ``htpasswd -B``, used for the dummy hash of an empty file.
DEFAULT_COST = 5
#: bcrypt uses the first 72 bytes of a password (bcrypt 5 refuses more).
BCRYPT_MAX_PASSWORD = 72
#: Threads of the default :class:`HashPool`.
DEFAULT_HASH_THREADS = 2
#: Checks the default :class:`HashPool` keeps waiting before it refuses more.
DEFAULT_HASH_QUEUE = 256
#: Checks one client may have waiting in a :class:`HashPool`, so that no
#: one client fills its queue.
DEFAULT_HASH_QUEUE_PER_CLIENT = 4


def _bcrypt() -> Any:
    return optional_import("bcrypt", "htpasswd checking needs")


def check_bcrypt(password: bytes, hashed: bytes) -> bool:
    """
    Constant-time bcrypt check of the password's first 72 bytes, as
    ``htpasswd`` hashes them; ``$2y$`` is read as ``$2b$`` (same algorithm).
    """
    if hashed.startswith(b"$2y$"):
        hashed = b"$2b$" + hashed[4:]
    try:
        return bool(_bcrypt().checkpw(password[:BCRYPT_MAX_PASSWORD], hashed))
    except ValueError:
        return False


def bcrypt_cost(hashed: bytes) -> Optional[int]:
    """The cost (log2 rounds) of a bcrypt hash, or ``None`` if unreadable."""
    field = hashed[4:7]
    if len(field) != 3 or field[2:] != b"$" or not field[:2].isdigit():
        return None
    cost = int(field[:2])
    return cost if 4 <= cost <= 31 else None


def mixed_costs(users: Dict[bytes, bytes]) -> List[bytes]:
    """The users whose hash cost differs from the dummy hash's (the usual one)."""
    usual = bcrypt_cost(dummy_hash(users))
    return [user for user, hashed in users.items() if bcrypt_cost(hashed) != usual]


def dummy_hash(users: Dict[bytes, bytes]) -> bytes:
    """
    A hash no password matches, of the cost most of ``users`` have (the
    higher on a tie): checking it costs what checking a real user costs.
    """
    costs = collections.Counter(
        cost for cost in map(bcrypt_cost, users.values()) if cost is not None
    )
    cost = max(costs, key=lambda c: (costs[c], c)) if costs else DEFAULT_COST
    return b"%s%02d%s" % (_DUMMY_HASH[:4], cost, _DUMMY_HASH[6:])


class HashPoolFull(CheckerBusy):
    """
    Too many checks are waiting for a hashing thread (or too many of this
    client's): this one is refused, and not counted as a failed login.
    """


_Job = Tuple["defer.Deferred[Any]", Callable[..., Any], Tuple[Any, ...], Optional[str]]


class HashPool:
    """
    Threads of their own for slow password hashes, with a bounded queue.

    The reactor's shared pool also runs ``getaddrinfo``: a flood of bcrypt
    checks there would make every name lookup wait.  Here at most
    ``threads`` checks run at once and ``max_queued`` wait, at most
    ``max_queued_per_client`` of them for one client (more fail with
    :class:`HashPoolFull`); cancelling the Deferred of a waiting check (its
    client went away) drops it unrun.  The client is the server's
    :data:`~twisted_socks5.limits.checking_client` when it asks for a check.

    :ivar started: checks handed to a thread so far.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any = None,
        threads: int = DEFAULT_HASH_THREADS,
        max_queued: int = DEFAULT_HASH_QUEUE,
        max_queued_per_client: int = DEFAULT_HASH_QUEUE_PER_CLIENT,
    ) -> None:
        if threads < 1 or max_queued < 0 or max_queued_per_client < 0:
            raise ValueError("a hash pool needs a thread and queue bounds >= 0")
        self._reactor = reactor
        self.threads = threads
        self.max_queued = max_queued
        self.max_queued_per_client = max_queued_per_client
        #: Checks waiting, by client key (those without a client are not).
        self.queued_by_client: Dict[str, int] = {}
        self.running = 0
        self.started = 0
        self.queued: Deque[_Job] = collections.deque()
        self._executor: Optional[ThreadPoolExecutor] = None
        self._full = False

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor

            return reactor
        return self._reactor

    def run(self, f: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``f(*args)`` in a hashing thread, after those queued before it."""
        client = checking_client.get()
        if (
            client is not None
            and self.running >= self.threads
            and self.queued_by_client.get(client, 0) >= self.max_queued_per_client
        ):  # the server logs each refusal: no line of our own
            return defer.fail(HashPoolFull(f"{client}: too many checks waiting"))
        if len(self.queued) >= self.max_queued:
            if not self._full:
                self._full = True
                self.log.warn(
                    "{waiting} password checks waiting: refusing more logins "
                    "unchecked until they drain",
                    waiting=len(self.queued),
                )
            return defer.fail(HashPoolFull(f"{len(self.queued)} checks waiting"))
        self._full = False
        d: defer.Deferred[Any] = defer.Deferred(self._drop)
        self.queued.append((d, f, args, client))
        if client is not None:
            self.queued_by_client[client] = self.queued_by_client.get(client, 0) + 1
        self._dispatch()
        return d

    def _dequeued(self, client: Optional[str]) -> None:
        if client is None:
            return
        left = self.queued_by_client[client] - 1
        if left:
            self.queued_by_client[client] = left
        else:
            del self.queued_by_client[client]

    def _drop(self, d: defer.Deferred[Any]) -> None:
        """Cancelled: forget the check if it has not started."""
        for job in self.queued:
            if job[0] is d:
                self.queued.remove(job)
                self._dequeued(job[3])
                return

    def _dispatch(self) -> None:
        while self.running < self.threads and self.queued:
            d, f, args, client = self.queued.popleft()
            self._dequeued(client)
            self.running += 1
            self.started += 1
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    self.threads, thread_name_prefix="socks5-hash"
                )
            future = self._executor.submit(f, *args)
            future.add_done_callback(partial(self._finished, d))

    def _finished(self, d: defer.Deferred[Any], future: Future[Any]) -> None:
        """In the hashing thread: hand the answer to the reactor thread."""
        self.reactor.callFromThread(self._done, d, future)

    def _done(self, d: defer.Deferred[Any], future: Future[Any]) -> None:
        self.running -= 1
        if not d.called:  # else cancelled while it ran: the answer is moot
            error = future.exception()
            if error is None:
                d.callback(future.result())
            else:
                d.errback(error)
        self._dispatch()

    def stop(self) -> None:
        """Stop the threads once the running checks end (tests, shutdown)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


_default_pool: Optional[HashPool] = None


def default_pool() -> HashPool:
    """The process's hash pool, made on first use, shared by every checker."""
    global _default_pool
    if _default_pool is None:
        _default_pool = HashPool()
    return _default_pool


def parse_htpasswd(data: bytes) -> Tuple[Dict[bytes, bytes], int]:
    """
    Parse htpasswd content into ``{user: bcrypt hash}``.  Returns the entries
    and the count of lines skipped (not bcrypt, or malformed).
    """
    users: Dict[bytes, bytes] = {}
    skipped = 0
    for line in data.splitlines():
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, hashed = line.partition(b":")
        if not sep or not user or not hashed.startswith(_BCRYPT_PREFIXES):
            skipped += 1
            continue
        users[user] = hashed
    return users, skipped


@implementer(ICredentialsChecker)
class HtpasswdChecker:
    """Checks :class:`IUsernamePassword` credentials against an htpasswd file."""

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self, path: str, reactor: Any = None, pool: Optional[HashPool] = None
    ) -> None:
        _bcrypt()
        self.path = path
        if pool is None:
            pool = default_pool() if reactor is None else HashPool(reactor)
        #: Where bcrypt runs; by default one pool for the whole process.
        self.pool = pool
        self._mtime: Optional[float] = None
        self._users: Dict[bytes, bytes] = {}
        #: Checked for unknown users: the cost of the file's hashes.
        self.dummy_hash = dummy_hash({})
        self._load()

    @property
    def reactor(self) -> Any:
        return self.pool.reactor

    def reload(self) -> None:
        """Re-read the file now (SIGHUP), changed or not."""
        self._load(force=True)

    def _load(self, force: bool = False) -> None:
        """(Re)read the file if it changed; a broken file keeps the old users."""
        try:
            mtime = os.stat(self.path).st_mtime
            if mtime == self._mtime and not force:
                return
            with open(self.path, "rb") as f:
                users, skipped = parse_htpasswd(f.read())
        except OSError as e:
            if self._mtime is None or force:
                raise
            self.log.warn("cannot re-read {path}: {error}", path=self.path, error=e)
            return
        if skipped:
            self.log.warn(
                "{path}: {skipped} line(s) without a bcrypt hash were ignored",
                path=self.path,
                skipped=skipped,
            )
        self._users = users
        self.dummy_hash = dummy_hash(users)
        self._mtime = mtime
        odd = mixed_costs(users)
        if odd:
            # Unknown users cost what most users cost: the others can be
            # told apart (and found to exist) by how long a wrong password takes.
            self.log.warn(
                "{path}: {count} user(s) have a bcrypt cost other than the "
                "file's usual {cost} ({users}): rehash them with that cost, "
                "or their existence shows in how long a login takes",
                path=self.path,
                count=len(odd),
                cost=bcrypt_cost(self.dummy_hash),
                users=", ".join(
                    sorted(u.decode("utf-8", "backslashreplace") for u in odd)[:10]
                ),
                event="socks5.htpasswd_mixed_costs",
            )

    def entry(self, username: bytes) -> Optional[bytes]:
        """The stored hash of ``username`` (revocation fingerprints it)."""
        return self._users.get(username)

    def entries(self) -> Dict[bytes, bytes]:
        """Every user's stored hash, as last read."""
        return dict(self._users)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred[bytes]:  # type: ignore[override]
        self._load()
        username = credentials.username
        if isinstance(username, str):
            username = username.encode("utf-8")
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        # An exact lookup: "Alice" and "alice " are not "alice".
        hashed = self._users.get(username)
        d = self.pool.run(check_bcrypt, password, hashed or self.dummy_hash)

        def decide(ok: bool) -> bytes:
            if ok and hashed is not None:
                return username  # type: ignore[no-any-return]
            raise UnauthorizedLogin()

        return d.addCallback(decide)


@implementer(ICheckerFactory, IPlugin)
class HtpasswdCheckerFactory:
    """The ``htpasswd`` entry of ``--auth`` (``twisted.cred.strcred``)."""

    authType = "htpasswd"
    authHelp = (
        "Username/password checked against an htpasswd file of bcrypt hashes "
        "(as written by 'htpasswd -B').  The file is re-read when it changes; "
        "bcrypt runs in a small thread pool of its own, off the reactor."
    )
    argStringFormat = "Path to the htpasswd file"
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str) -> HtpasswdChecker:
        if not argstring:
            raise ValueError("htpasswd needs a file name: --auth htpasswd:FILE")
        return HtpasswdChecker(argstring)
