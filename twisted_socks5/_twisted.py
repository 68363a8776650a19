"""
Every use of Twisted's private attributes, in one place.

The fast paths (:mod:`~twisted_socks5.writenow`, the stall watch) read
Twisted's write buffer and write-side state, ``--workers`` reads a TCP
endpoint's address, and the server asks the HAProxy wrapper whether the
PROXY header has come.  None of that is public API, so it lives here: the
``typing.Protocol`` classes below name each attribute relied on, every
function has a fallback for a Twisted that renamed one, and
``tests/test_twisted_internals.py`` (the canary) fails loudly, naming the
attribute, when an upgrade changes any of them.

Names are resolved once, at import, never per call.  Where a rename would
otherwise go unnoticed the fallback is safe, not silent: the stall watch
falls back to Twisted's public flow-control flag, a client behind HAProxy
is taken as unnamed until its first data, an endpoint whose address cannot
be read counts as exposed, and ``--workers`` refuses to start.
"""

from __future__ import annotations

import socket
from typing import Any, Dict, Optional, Protocol, Tuple

from twisted.internet import abstract, tcp
from twisted.protocols.policies import ProtocolWrapper

try:
    from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper
except ImportError:  # pragma: no cover - moved: recognised by its package below
    HAProxyProtocolWrapper = None  # type: ignore[assignment,misc]


class TCPTransportInternals(Protocol):
    """What a Twisted TCP transport (``tcp.Connection``) is relied on for."""

    # Public by name (no underscore) but not in any interface:
    socket: socket.socket
    connected: int
    disconnecting: int
    TLS: bool
    #: The write buffer: ``dataBuffer[offset:]`` plus ``_tempDataLen``
    #: bytes written since it was last joined.
    dataBuffer: bytes
    offset: int
    # Private:
    _tempDataLen: int
    _writeDisconnecting: bool
    _writeDisconnected: bool
    #: Whether closing calls ``shutdown(SHUT_RDWR)`` first.
    _shouldShutdown: bool

    def _closeWriteConnection(self) -> None:
        """``shutdown(SHUT_WR)`` and the protocol's ``writeConnectionLost``."""


class HAProxyWrapperInternals(Protocol):
    """The ``haproxy:`` endpoint's wrapper: ``None`` until the header is read."""

    _proxyInfo: Optional[object]


class TCPServerEndpointInternals(Protocol):
    """A ``TCP4ServerEndpoint``/``TCP6ServerEndpoint``'s address."""

    _interface: str
    _port: int
    _backlog: int


def _members(cls: type) -> Tuple[str, ...]:
    """The attribute and method names a ``typing.Protocol`` declares."""
    names = list(getattr(cls, "__annotations__", {}))
    names += [n for n, v in vars(cls).items() if callable(v) and n[:2] != "__"]
    return tuple(names)


#: The names relied on, for the checks here and the canary test.
TRANSPORT_ATTRIBUTES = _members(TCPTransportInternals)
PROXY_HEADER_ATTRIBUTE = "_proxyInfo"
ENDPOINT_ATTRIBUTES = _members(TCPServerEndpointInternals)

_supported: Dict[type, bool] = {}


def supported(transport: Any) -> bool:
    """Whether ``transport``'s class is a plain Twisted TCP connection we know."""
    cls = type(transport)
    known = _supported.get(cls)
    if known is None:
        known = _supported[cls] = issubclass(cls, tcp.Connection) and all(
            hasattr(transport, name) for name in TRANSPORT_ATTRIBUTES
        )
    return known


def write_idle(transport: Any) -> bool:
    """
    A transport we know (:func:`supported`), connected, writable by us, not
    TLS, and with nothing queued in Twisted's buffers: a ``send`` now goes
    out in order.  Anything else answers ``False`` (use the public API).
    """
    known = _supported.get(type(transport))  # supported(), one call fewer
    if known is None:
        known = supported(transport)
    return bool(
        known
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport.TLS
        and not transport._tempDataLen
        and transport.offset == len(transport.dataBuffer)
    )


def shut_write(transport: TCPTransportInternals) -> None:
    """
    What Twisted's ``doWrite`` does for ``loseWriteConnection()`` once the
    buffer is empty: the state first, then ``shutdown(SHUT_WR)`` and the
    protocol's ``writeConnectionLost``.  Only after :func:`write_idle`.
    """
    transport._writeDisconnecting = True
    transport._writeDisconnected = True
    transport._closeWriteConnection()


def write_shut(transport: Any) -> bool:
    """Whether our FIN went out through Twisted (a :func:`supported` transport)."""
    known = _supported.get(type(transport))
    if known is None:
        known = supported(transport)
    return bool(known and transport._writeDisconnected)


def skip_shutdown(transport: Any) -> None:
    """Close without the ``shutdown(SHUT_RDWR)`` Twisted makes first."""
    known = _supported.get(type(transport))
    if known or (known is None and supported(transport)):
        transport._shouldShutdown = False


def write_buffered(transport: Any) -> int:
    """
    Bytes in a transport's write buffer, for the stall watch (0 if unknown).

    Duck-typed, so that a test double with the same attributes is measured.
    A Twisted socket transport that lost the attributes (a rename) answers
    with its public flow-control flag instead: 1 while it has paused its
    producer because its buffer is full, which is when a tunnel stalls.
    """
    try:
        waiting: int = (
            len(transport.dataBuffer) - transport.offset + transport._tempDataLen
        )
    except (AttributeError, TypeError):
        if isinstance(transport, abstract.FileDescriptor):
            return int(bool(transport.producerPaused))
        return 0
    return waiting


def unregister_producer(transport: Any) -> None:
    """``unregisterProducer()`` if one is registered (test doubles raise if not)."""
    if getattr(transport, "producer", None):
        transport.unregisterProducer()


def awaiting_proxy_header(transport: Any) -> bool:
    """
    Whether ``transport`` is the ``haproxy:`` endpoint's wrapper and has
    not read the PROXY header yet, so ``getPeer()`` is still HAProxy.

    A wrapper without the attribute (renamed) is taken as still waiting:
    the client is then named when its first data arrives, which the
    wrapper passes on only after the header.  Rules never see HAProxy.
    """
    if not isinstance(transport, ProtocolWrapper):
        return False
    if not (
        (
            HAProxyProtocolWrapper is not None
            and isinstance(transport, HAProxyProtocolWrapper)
        )
        or type(transport).__module__.startswith("twisted.protocols.haproxy")
    ):
        return False
    return getattr(transport, PROXY_HEADER_ATTRIBUTE, None) is None


def endpoint_address(endpoint: Any) -> Optional[Tuple[str, int, int]]:
    """
    The (interface, port, backlog) a TCP server endpoint will listen on, or
    ``None`` if it is no TCP endpoint or its attributes cannot be read.
    """
    try:
        interface, port, backlog = (
            endpoint._interface,
            endpoint._port,
            endpoint._backlog,
        )
    except AttributeError:
        return None
    if not (
        isinstance(interface, str)
        and isinstance(port, int)
        and isinstance(backlog, int)
    ):
        return None
    return interface, port, backlog


class LogFileInternals(Protocol):
    """
    ``twisted.python.logfile.LogFile``'s open file and the method that
    opens it (on start, on ``reopen()`` and after each rotation).
    """

    _file: Any

    def _openFile(self) -> None: ...


#: The names relied on, for the canary test.
LOGFILE_ATTRIBUTES = _members(LogFileInternals)


def append_only(logfile: Any) -> bool:
    """
    Make the file a ``LogFile`` has just opened append-only (``O_APPEND``):
    Twisted opens it ``rb+`` and seeks to the end once, so after a
    ``copytruncate`` (or beside another process's appends) its writes would
    land at a stale offset.  False when the attribute is gone (a rename):
    the file is then written as Twisted writes it.
    """
    import fcntl
    import os

    stream = getattr(logfile, "_file", None)
    if stream is None or not hasattr(stream, "fileno"):
        return False
    fd = stream.fileno()
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_APPEND)
    return True


def appending_log_file(cls: type) -> type:
    """
    A subclass of ``LogFile`` or ``DailyLogFile`` whose file is made
    append-only each time Twisted opens it (:func:`append_only`).
    """

    class Appending(cls):  # type: ignore[valid-type,misc]
        def _openFile(self) -> None:
            super()._openFile()
            append_only(self)

    Appending.__name__ = Appending.__qualname__ = f"Appending{cls.__name__}"
    return Appending
