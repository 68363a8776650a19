"""
Write-through for Twisted TCP transports.

``ITransport.write`` never sends at once: it queues the bytes, registers the
socket for writability (an ``epoll_ctl``), and sends on the next reactor turn,
then unregisters (another ``epoll_ctl``).  For a proxy that forwards small
messages (a SOCKS reply, a request, an answer) that is two system calls and
a reactor turn per message, about a quarter of the round-trip time on
loopback.  :func:`write_now` sends at once when Twisted holds nothing for
the socket, which is what the kernel would do with a blocking ``send``, and
hands whatever the socket did not take to ``transport.write`` as before.

:func:`shut_write_now` does the same for ``loseWriteConnection()`` (a FIN):
Twisted would register for writability only to send nothing and then shut
down, two ``epoll_ctl``, an empty ``send`` and a reactor turn.
:func:`close_ended` (and :func:`connection_done`, for the splice relay)
spare a tunnel that ended cleanly both ways a failing ``shutdown(2)`` and a
new ``Failure`` per socket at close (4-5 % of a short connection's cost).

They read Twisted's write-buffer attributes, which are not public API,
through :mod:`twisted_socks5._twisted`: the check :func:`supported` runs
once per class, and any transport it does not recognise (TLS, UNIX, a test
double, a Twisted that renamed them) simply gets ``transport.write``.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import error, main
from twisted.python.failure import Failure

from ._twisted import shut_write, skip_shutdown, supported, write_idle, write_shut

__all__ = ["close_ended", "connection_done", "shut_write_now", "supported", "write_now"]


def write_now(transport: Any, data: bytes) -> Optional[OSError]:
    """
    ``transport.write(data)``, sending at once if nothing is queued before it.

    A send that fails (the peer reset) aborts the transport at once and
    returns the error, for the caller's log.  It must not be left to
    Twisted's next write: the failed send has consumed the socket's pending
    error, so Twisted's next read would see a clean EOF and a reset tunnel
    would be passed on as a complete one.
    """
    if write_idle(transport):
        try:
            sent = transport.socket.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0  # nothing fits now: Twisted sends it when it can
        except OSError as e:
            transport.abortConnection()
            return e
        if sent == len(data):
            return None
        data = data[sent:]
    transport.write(data)
    return None


def shut_write_now(transport: Any) -> None:
    """
    ``transport.loseWriteConnection()``, shutting down at once if nothing is
    queued: what Twisted's next ``doWrite`` would do, in the same order
    (state first, then ``shutdown(SHUT_WR)``, then the protocol's
    ``writeConnectionLost``), without the reactor turn.
    """
    if write_idle(transport) and (
        # Twisted's doWrite would resume a paused producer instead.
        transport.producer is None or not transport.producerPaused
    ):
        transport.stopWriting()  # a no-op unless a stray registration is left
        shut_write(transport)
        return
    transport.loseWriteConnection()


#: The reason a cleanly ended socket is lost with: one for all, its class
#: names looked up once (Twisted's ``reason.check`` would otherwise walk the
#: MRO of a fresh Failure for every socket).
_CLEAN_CLOSE = Failure(main.CONNECTION_DONE)
_CLEAN_CLOSE.check(error.ConnectionAborted)  # what tcp.Connection asks


def connection_done(transport: Any) -> None:
    """
    End ``transport``, whose socket ended both ways (our FIN sent, the
    peer's read), as the reactor ends a cleanly closed socket:
    ``connectionLost`` at once, with one shared ``ConnectionDone`` reason
    instead of a new ``Failure`` per socket, and without the
    ``shutdown(SHUT_RDWR)`` Twisted makes before closing (only "to be safe",
    its comment says), which could only fail with ``ENOTCONN``.
    """
    skip_shutdown(transport)
    transport.connectionLost(_CLEAN_CLOSE)


def close_ended(transport: Any) -> None:
    """
    ``transport.loseConnection()`` for a tunnel that ended both ways: at
    once through :func:`connection_done` when Twisted's state agrees (our
    FIN went out through it, so nothing can be queued), which is what its
    ``loseConnection`` would come to; Twisted's own way otherwise (TLS,
    other transports, a write side still open).
    """
    if (
        write_shut(transport)
        and transport.connected
        and not transport.disconnecting
        and not transport.TLS
    ):
        connection_done(transport)
        return
    transport.loseConnection()
