"""
Who gets in: the connection gate and the login gate of a server.

The connection gate runs at accept (and again once a PROXY header names the
client): the connection limits, shutdown, and the rules' client check.  The
login gate runs around each credential check: the cap on concurrent checks
per client (a login over it waits its turn), the failed-login throttle
(checked before a check starts and again after it succeeds), and the busy
refusal of a checker whose queue is full, which is not counted as a failure.

One :class:`Admission` per factory holds what is shared (the logins waiting
for a check); a connection's own part (its address, whether it waits or
checks) lives on the connection (:class:`Applicant`), which the functions
below receive: nothing here is allocated per connection.
"""

from __future__ import annotations

import collections
import ipaddress
from typing import Any, Deque, Dict, Optional, Protocol, Tuple, Union

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from .addresses import address_of, canonical_ip_text
from .auth import STATUS_FAILURE
from .codec import Address, Method, UserPassStatus
from .handshake import (
    AuthContinue,
    Authenticated,
    AuthFailed,
    AuthPending,
    Event,
    ServerHandshake,
)
from .limits import ConnectionLimits
from .logs import escape_word

#: Why a client is refused: (the log event's ``kind``, the reason).
Refusal = Tuple[str, str]


class Server(Protocol):
    """What the gates read of their factory."""

    #: Its logger: refusals are logged as the factory's, as they always were.
    log: Logger
    limits: ConnectionLimits
    #: The access rules (an :class:`~twisted_socks5.rules.IPolicy`), or None.
    policy: Any
    draining: bool
    metrics: Any


class Applicant(Protocol):
    """A client connection (the server protocol), as the gates see it."""

    @property
    def log(self) -> Logger: ...

    #: Its factory (whose ``admission`` is the gate it passes).
    factory: Any
    transport: Any
    handshake: ServerHandshake
    client_ip: str
    client: Optional[Address]
    #: Counted by the limits as from ``client_ip``.
    identified: bool
    method: Optional[int]
    user: Optional[str]
    outcome: str
    #: Its credential check under way (dropped if the client goes).
    checking: Optional[defer.Deferred[Any]]
    #: Waiting for a check from the same client to end.
    parked: bool

    @property
    def closing(self) -> bool: ...

    def hold(self) -> None:
        """Stop parsing while something asynchronous runs; keep reading."""

    def unwait(self, result: Any) -> Any:
        """Read and parse again (a Deferred callback: passes ``result`` on)."""

    def close(self) -> None:
        """Close after what is queued has been written."""

    def refuse(self) -> None:
        """Drop the connection unanswered (refused, already logged)."""

    def handle_event(self, event: Event) -> None:
        """Act on a handshake event."""


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Admission:
    """A server's gates, and the logins waiting for a credential check."""

    def __init__(self, server: Server) -> None:
        self.server = server
        #: Connections waiting for their client's credential checks, by the
        #: limits' client key (an IPv6 client is its network).
        self.check_waiters: Dict[str, Deque[Applicant]] = {}
        self._waking: set[str] = set()

    # ------------------------------------------------------------------
    # The connection gate

    def admit(self, ip: Optional[str]) -> bool:
        """
        Whether a new client from ``ip`` may go on: the connection limits,
        shutdown, and the rules' client check (``ip`` ``None``: a client a
        PROXY header has yet to name, checked again by :meth:`identify`).
        A refusal is logged here.
        """
        server = self.server
        refusal = server.limits.refusal(ip)
        if refusal is None and server.draining:
            refusal = ("draining", "server is shutting down")
        if refusal is None and ip is not None:
            refusal = self._rules_refusal(ip)
        return self._admitted(ip, refusal)

    def identify(self, ip: str) -> bool:
        """
        A client counted since accept was named ``ip`` by its PROXY header:
        its own limits and the rules now (the caller uncounts a refusal).
        """
        limits = self.server.limits
        if _is_ip(ip):
            refusal = limits.client_refusal(ip) or self._rules_refusal(ip)
        else:
            # Twisted's PROXY v1 parser takes any text as the source: a
            # header that names no IP address names no client.
            refusal = ("bad_proxy_header", "the PROXY header names no IP address")
        if self._admitted(ip, refusal):
            limits.identified(ip)
            return True
        return False

    def _rules_refusal(self, ip: str) -> Optional[Refusal]:
        policy = self.server.policy
        if policy is not None:
            decision = policy.check_client(ip or "127.0.0.1")
            if not decision.allowed:
                return ("rules", f"denied by {decision.rule}")
        return None

    def _admitted(self, ip: Optional[str], refusal: Optional[Refusal]) -> bool:
        if refusal is not None:
            kind, why = refusal
            self.server.log.info(
                "refused {client}: {reason}",
                event="socks5.refused",
                client=escape_word(ip),
                kind=kind,
                reason=why,
            )
            self._count_refusal(kind)
            access_log = getattr(self.server, "access_log", None)
            if access_log is not None:  # i16-log
                access_log.refused_client(ip, kind, why)
            return False
        return True

    def _count_refusal(self, kind: str) -> None:
        metrics = self.server.metrics
        if metrics is not None:
            metrics.refused_connection(kind)

    # ------------------------------------------------------------------
    # The login gate

    def authentication_failed(self, applicant: Applicant) -> None:
        self.server.limits.auth_failed(applicant.client_ip)
        metrics = self.server.metrics
        if metrics is not None:
            metrics.auth_failed()

    def login_throttled(self, applicant: Applicant) -> None:
        """A login on an open connection refused: its address is throttled."""
        self.server.log.info(
            "refused login from {client}: throttled",
            event="socks5.refused",
            client=escape_word(applicant.client_ip),
            kind="throttled",
            reason=f"throttled after {self.server.limits.auth_failures} failed logins",
        )
        self._count_refusal("throttled")

    def login_busy(self, applicant: Applicant) -> None:
        """A login refused unchecked (the checker's queue is full): not a failure."""
        self.server.log.info(
            "refused login from {client}: busy",
            event="socks5.refused",
            client=applicant.client_ip,
            kind="busy",
            reason="too many credential checks waiting",
        )
        self._count_refusal("busy")

    def wait_for_check(self, applicant: Applicant) -> None:
        """Park ``applicant`` until a check from its address ends."""
        applicant.parked = True
        key = self.server.limits.key(applicant.client_ip)
        self.check_waiters.setdefault(key, collections.deque()).append(applicant)

    def stop_waiting_for_check(self, applicant: Applicant) -> None:
        applicant.parked = False
        key = self.server.limits.key(applicant.client_ip)
        waiters = self.check_waiters.get(key)
        if waiters is not None:
            waiters.remove(applicant)
            if not waiters:
                del self.check_waiters[key]

    def check_ended(self, ip: str) -> None:
        """A credential check from ``ip`` ended: parked ones go on in turn."""
        limits = self.server.limits
        limits.check_ended(ip)
        key = limits.key(ip)  # the same client as the limits count
        if key in self._waking:
            return  # a woken connection's own quick check: the loop goes on
        self._waking.add(key)
        try:
            while limits.may_check(ip):
                waiters = self.check_waiters.get(key)
                if not waiters:
                    break
                applicant = waiters.popleft()
                if not waiters:
                    del self.check_waiters[key]
                applicant.parked = False
                applicant.unwait(None)
        finally:
            self._waking.discard(key)


# ----------------------------------------------------------------------
# A connection's steps through the connection gate.


def admit_connection(applicant: Applicant, identified: bool = True) -> bool:
    """
    At accept: the limits and the rules' client check; False if refused.
    ``identified`` False: a PROXY header is still to name the client, who
    is counted against the server's limits only until then.
    """
    peer = applicant.handshake.client = applicant.transport.getPeer()
    if identified:
        applicant.client_ip = canonical_ip_text(getattr(peer, "host", "") or "")
    factory = applicant.factory
    if not factory.admission.admit(applicant.client_ip if identified else None):
        applicant.refuse()
        return False
    if identified:
        applicant.client = address_of(peer)
    applicant.identified = identified
    factory.connection_opened(applicant)
    return True


def identify_connection(applicant: Applicant) -> bool:
    """The PROXY header named the client: its own limits and the rules."""
    peer = applicant.handshake.client = applicant.transport.getPeer()
    applicant.client_ip = canonical_ip_text(getattr(peer, "host", "") or "")
    if not applicant.factory.identify(applicant):
        applicant.refuse()
        return False
    applicant.identified = True
    applicant.client = address_of(peer)
    return True


# ----------------------------------------------------------------------
# A connection's steps through the login gate (the server protocol's
# handlers of the handshake's authentication events).


def may_check(applicant: Applicant) -> bool:
    """The login limits of this address, before a method sees its bytes."""
    limits = applicant.factory.limits
    if not limits.may_check(applicant.client_ip):
        # As many checks from this address as it may have run already:
        # wait for one to end (and be counted) before this one starts.
        applicant.hold()
        applicant.factory.admission.wait_for_check(applicant)
        return False
    if limits.throttled(applicant.client_ip):
        refuse_throttled(applicant)
        return False
    return True


def auth_said(
    applicant: Applicant, event: Union[AuthContinue, Authenticated, AuthFailed]
) -> None:
    """The method's answer to the client, and whom it named."""
    if event.data:
        applicant.transport.write(event.data)
    if event.user is not None:
        applicant.user = event.user


def auth_pending(applicant: Applicant, event: AuthPending) -> None:
    """The method is checking: wait for its answer (or act on it now)."""
    result = event.result
    if not isinstance(result, defer.Deferred):
        applicant.handle_event(applicant.handshake.auth_result(result))
        return
    # Held, not paused: a client that goes away is noticed, and its
    # check is dropped if it has not started (see connectionLost).
    applicant.hold()
    applicant.checking = result
    applicant.factory.limits.check_started(applicant.client_ip)
    result.addCallbacks(
        auth_result, auth_error, callbackArgs=(applicant,), errbackArgs=(applicant,)
    )
    # Only once a failure is counted may the next check begin.
    result.addBoth(_check_ended, applicant)
    result.addBoth(applicant.unwait)


def _check_ended(result: Any, applicant: Applicant) -> Any:
    applicant.checking = None
    applicant.factory.admission.check_ended(applicant.client_ip)
    return result


def auth_result(result: Any, applicant: Applicant) -> None:
    """A method's asynchronous check answered."""
    if applicant.closing or applicant.transport.disconnected:
        return
    applicant.handle_event(applicant.handshake.auth_result(result))


def auth_error(failure: Failure, applicant: Applicant) -> None:
    if applicant.closing or applicant.transport.disconnected:
        return  # the check was dropped with the connection
    applicant.log.failure("authenticator failed", failure)
    applicant.handshake.auth_error(failure.value)  # type: ignore[arg-type]
    _failed(applicant, "authenticator error")


def authenticated(applicant: Applicant, event: Authenticated) -> bool:
    """A method accepted the client: False if it is refused all the same."""
    # Failures from other connections may have throttled this address
    # while this check ran: a right password is refused too.
    if applicant.factory.limits.throttled(applicant.client_ip):
        refuse_throttled(applicant)
        return False
    auth_said(applicant, event)
    return True


def auth_failed(applicant: Applicant, event: AuthFailed) -> None:
    if event.error is not None:
        applicant.log.failure("authenticator failed", Failure(event.error))
        _failed(applicant, "authenticator error")
        return
    auth_said(applicant, event)
    if event.busy:  # not the client's fault: not counted
        applicant.outcome = "login refused: busy, too many checks waiting"
        applicant.factory.admission.login_busy(applicant)
        applicant.close()
        return
    _failed(applicant, "authentication failed")


def _failed(applicant: Applicant, outcome: str) -> None:
    applicant.outcome = outcome
    applicant.factory.admission.authentication_failed(applicant)
    applicant.close()


def refuse_throttled(applicant: Applicant) -> None:
    """Refuse a login from an address over its failed-login budget."""
    applicant.outcome = "login refused: too many failed logins"
    if applicant.method == Method.USERNAME_PASSWORD:
        applicant.transport.write(UserPassStatus(STATUS_FAILURE).to_bytes())
    applicant.factory.admission.login_throttled(applicant)
    applicant.close()
