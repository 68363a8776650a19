"""
UDP ASSOCIATE (RFC 1928 section 7): one relay per TCP control connection.

The client side is a DatagramProtocol bound on the control connection's
local address (or ``--udp-bind``'s, on a port of ``--udp-ports``); only
the client's IP may use it, from the port its request declared when it
declared its own IP, otherwise from the port of its first datagram (behind
NAT a client knows neither its public address nor its public port).  Each
datagram's header is parsed by the codec; FRAG != 0 is dropped (no
reassembly: almost no client fragments, and reassembly buffers are an easy
memory attack).  Destinations are reached from one outbound
socket per address family; answers come back only from destinations the
client has sent to (unless ``allow_unknown_sources``), wrapped in a header
naming their source.  Everything lives exactly as long as the control
connection.
"""

from __future__ import annotations

import collections
import socket
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from twisted.internet import defer, error, udp
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from .addresses import canonical_ip_text
from .codec import (
    MAX_UDP_PAYLOAD,
    Address,
    AddressType,
    ProtocolError,
    parse_udp_datagram,
)
from .outgoing import OutgoingAddresses, Source, bind_source
from .rules import Decision, allows

#: Read buffer for datagrams: larger than any UDP payload, so none is cut.
MAX_PACKET_SIZE = 65535
#: Destinations remembered per association (for answers), oldest forgotten.
MAX_PEERS = 4096
#: Names cached per association, and datagrams held while a name resolves.
MAX_NAMES = 256
#: How long an association uses a name's addresses before it asks again
#: (a long-lived association follows DNS changes; ``--resolver``'s cache
#: answers the repeat within the record's TTL without a query).
NAME_CACHE_SECONDS = 60.0
MAX_PENDING_PER_NAME = 16

DROP_REASONS = (
    "foreign_source",
    "malformed",
    "fragmented",
    "unresolvable",
    "pending_overflow",
    "unknown_source",
    "oversize",
    "send_error",
    "denied",
    "bandwidth",
)

Sendable = Tuple[str, int]


class PortRange:
    """
    The ports of ``--udp-ports`` relay sockets take, oldest freed first (so a
    port freed a moment ago, which late datagrams may still reach, is the
    last one reused).  A port another process holds is skipped and tried
    again later; with none left, :meth:`listen` raises
    ``CannotListenError`` and logs once until a port is freed.
    """

    log = Logger()

    def __init__(self, low: int, high: int) -> None:
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"udp_ports: not a port range: {low}-{high}")
        self.low = low
        self.high = high
        self._free: Deque[int] = collections.deque(range(low, high + 1))
        self._warned = False

    def listen(self, bind: Callable[[int], Any]) -> Any:
        """``bind(port)`` on the first free port that works; its result."""
        for _ in range(len(self._free)):
            port = self._free.popleft()
            try:
                return bind(port)
            except error.CannotListenError:
                self._free.append(port)
        if not self._warned:
            self._warned = True
            self.log.warn(
                "UDP ASSOCIATE refused (0x01): every port of --udp-ports "
                "{low}-{high} is in use",
                event="socks5.udp_ports_exhausted",
                low=self.low,
                high=self.high,
            )
        raise error.CannotListenError(
            None, f"{self.low}-{self.high}", "no free port in --udp-ports"
        )

    def release(self, port: int, stopped: Any = None) -> None:
        """``port`` is free again once ``stopped`` (a Deferred, if any) fires."""
        if isinstance(stopped, defer.Deferred):
            stopped.addBoth(lambda _: self.release(port))
            return
        self._free.append(port)
        self._warned = False


class UDPCounters:
    """Per-association counters, reported in the connection's log event."""

    def __init__(self) -> None:
        self.datagrams_up = 0
        self.datagrams_down = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.drops: Dict[str, int] = dict.fromkeys(DROP_REASONS, 0)

    def as_dict(self) -> Dict[str, Any]:
        return {
            "datagrams_up": self.datagrams_up,
            "datagrams_down": self.datagrams_down,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "drops": {k: v for k, v in self.drops.items() if v},
        }


class _ClientSide(DatagramProtocol):
    def __init__(self, association: UDPAssociation) -> None:
        self.association = association

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.association.from_client(datagram, addr)


class _TargetSide(DatagramProtocol):
    def __init__(self, association: UDPAssociation) -> None:
        self.association = association

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.association.from_target(datagram, addr)


def sender_for(port: Any) -> Callable[[bytes, Sendable], Any]:
    """
    How to send a datagram on ``port``.  Twisted's ``udp.Port.write()``
    validates the address with ``isIPAddress``/``isIPv6Address`` (up to five
    calls) on every datagram, a tenth of the relay's CPU; the addresses here
    are already IP strings of the port's family (parsed by the codec, the
    port chosen by family), so a real port's socket sends directly.  Anything
    else (a test double) gets ``write()``.  Errors are the caller's: a drop.
    """
    if isinstance(port, udp.Port):
        sendto: Callable[[bytes, Sendable], Any] = port.getHandle().sendto
        return sendto
    write: Callable[[bytes, Sendable], Any] = port.write
    return write


class UDPAssociation:
    """
    The relay of one UDP ASSOCIATE.

    :param client_ip: the TCP control connection's peer IP.
    :param declared: the DST.ADDR/DST.PORT of the request: the address the
        client says it will send from (zeros when it does not know).  Its port
        binds only when its address is ``client_ip``: zeros, a name or an
        address not the client's (its own behind NAT) leave the port to the
        first datagram.
    :param resolve: resolves a name to IP strings without blocking.
    :param check_destination: a policy hook: its
        :class:`~twisted_socks5.rules.Decision` on a datagram to an IP (one
        that does not allow drops the datagram).  A hook answering a bool,
        as before 0.1.0, is still understood.
    :param on_activity: called on each relayed datagram (idle timeout).
    :param sources: the ``--outgoing`` set the outbound sockets bind from
        (by family; ``None``, or a family it lacks: the wildcard address),
        and ``listen``, where the client came in (``same-as-listen``).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        client_ip: str,
        declared: Address,
        resolve: Callable[[str], defer.Deferred[List[str]]],
        *,
        allow_unknown_sources: bool = False,
        check_destination: Optional[Callable[[Address, str], Decision]] = None,
        on_activity: Optional[Callable[[], None]] = None,
        sources: Optional[OutgoingAddresses] = None,
        listen: Optional[str] = None,
    ) -> None:
        self.reactor = reactor
        self.client_ip = canonical_ip_text(client_ip)
        self.client_port: Optional[int] = None
        if declared.port and canonical_ip_text(declared.host) == self.client_ip:
            self.client_port = declared.port
        self.declared = declared
        self.resolve = resolve
        self.allow_unknown_sources = allow_unknown_sources
        self.check_destination = check_destination
        self.on_activity = on_activity
        self.sources = sources
        self.listen_host = listen
        #: The addresses ``sources`` gave the outbound sockets (for the log).
        self.outgoing: List[str] = []
        self.counters = UDPCounters()
        self.client_port_listener: Any = None
        #: The --udp-ports range the client-side port came from, if any.
        self._range: Optional[PortRange] = None
        self._client_addr: Optional[Sendable] = None
        self._outbound: Dict[int, Any] = {}
        #: How to send on the client-side port and, by family, the outbound ones.
        self._to_client: Optional[Callable[[bytes, Sendable], Any]] = None
        self._senders: Dict[int, Callable[[bytes, Sendable], Any]] = {}
        self._peers: collections.OrderedDict[Sendable, None] = collections.OrderedDict()
        #: A name's addresses, as resolved (each datagram picks its own).
        #: A name's addresses, and until when they are used.
        self._names: collections.OrderedDict[str, Tuple[List[str], float]] = (
            collections.OrderedDict()
        )
        self._pending: Dict[str, Deque[Tuple[bytes, int]]] = {}
        self._lookups: List[defer.Deferred[List[str]]] = []
        self._headers: Dict[Tuple[str, int], bytes] = {}
        self.closed = False
        #: Its bandwidth limits' ``bandwidth.Meter``, if any.
        self.meter: Any = None

    # ------------------------------------------------------------------

    def listen(self, host: str, ports: Optional[PortRange] = None) -> Address:
        """
        Bind the client-side socket on ``host``, on a port of ``ports`` if
        given (else one the system picks); the address bound.
        """

        def bind(port: int) -> Any:
            return self.reactor.listenUDP(
                port, _ClientSide(self), interface=host, maxPacketSize=MAX_PACKET_SIZE
            )

        if ports is None:
            self.client_port_listener = bind(0)
        else:
            self.client_port_listener = ports.listen(bind)
            self._range = ports
        self._to_client = sender_for(self.client_port_listener)
        bound = self.client_port_listener.getHost()
        return Address.from_host(bound.host, bound.port)

    def close(self) -> None:
        """End the association: ports, look-ups and queues all go."""
        if self.closed:
            return
        self.closed = True
        if self.meter is not None:
            self.meter.stop()  # its share of a user's budget
        listener, self.client_port_listener = self.client_port_listener, None
        if listener is not None:
            if self._range is None:
                listener.stopListening()
            else:
                port = listener.getHost().port
                self._range.release(port, listener.stopListening())
        ports = list(self._outbound.values())
        self._outbound.clear()
        self._senders.clear()
        self._to_client = None
        for port in ports:
            port.stopListening()
        lookups, self._lookups = self._lookups, []
        for d in lookups:
            d.cancel()
        self._pending.clear()
        self._names.clear()
        self._peers.clear()
        self._headers.clear()

    # ------------------------------------------------------------------
    # Client → destination

    def from_client(self, datagram: bytes, addr: Any) -> None:
        host, port = canonical_ip_text(addr[0]), addr[1]
        if host != self.client_ip or (
            self.client_port is not None and port != self.client_port
        ):
            self.counters.drops["foreign_source"] += 1
            return
        if self.client_port is None:
            # The first datagram pins the client's port: no other process on
            # the client's host can use the association afterwards.
            self.client_port = port
        self._client_addr = addr
        try:
            message = parse_udp_datagram(datagram)
        except (ProtocolError, ValueError):
            self.counters.drops["malformed"] += 1
            return
        if message.fragment != 0:
            self.counters.drops["fragmented"] += 1
            return
        destination = message.address
        if destination.type is AddressType.DOMAIN:
            self._send_to_name(destination.host, destination.port, message.data)
        else:
            self._send(destination, destination.host, message.data)

    def _send_to_name(self, name: str, port: int, data: bytes) -> None:
        key = name.lower().rstrip(".")
        known = self._names.get(key)
        if known is not None:
            if known[1] > self.reactor.seconds():
                self._names.move_to_end(key)
                self._send_to(Address(AddressType.DOMAIN, name, port), known[0], data)
                return
            del self._names[key]  # stale: ask again, queueing meanwhile
        queue = self._pending.get(key)
        if queue is not None:
            if len(queue) >= MAX_PENDING_PER_NAME:
                self.counters.drops["pending_overflow"] += 1
            else:
                queue.append((data, port))
            return
        if len(self._pending) >= MAX_NAMES:
            self.counters.drops["pending_overflow"] += 1
            return
        self._pending[key] = collections.deque([(data, port)])
        d = self.resolve(name)
        self._lookups.append(d)
        d.addCallbacks(
            self._resolved,
            self._unresolved,
            callbackArgs=(name, key),
            errbackArgs=(key,),
        )
        d.addBoth(self._lookup_done, d)

    def _lookup_done(self, result: Any, d: defer.Deferred[List[str]]) -> Any:
        if d in self._lookups:
            self._lookups.remove(d)
        return None

    def _resolved(self, addresses: List[str], name: str, key: str) -> None:
        if self.closed:
            return
        self._names[key] = (addresses, self.reactor.seconds() + NAME_CACHE_SECONDS)
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)
        for data, port in self._pending.pop(key, ()):
            self._send_to(Address(AddressType.DOMAIN, name, port), addresses, data)

    def _unresolved(self, failure: Failure, key: str) -> None:
        dropped = len(self._pending.pop(key, ()))
        self.counters.drops["unresolvable"] += dropped

    def _send_to(self, destination: Address, addresses: List[str], data: bytes) -> None:
        """
        Send to the first of a name's addresses that the policy allows,
        checked again for every datagram (the rules may have been reloaded).
        """
        check = self.check_destination
        for ip in addresses:
            ip = canonical_ip_text(ip)
            if check is None or allows(check(destination, ip)):
                self._deliver(destination, ip, data)
                return
        self.counters.drops["denied"] += 1

    def _send(self, destination: Address, ip: str, data: bytes) -> None:
        ip = canonical_ip_text(ip)
        if self.check_destination is not None and not allows(
            self.check_destination(destination, ip)
        ):
            self.counters.drops["denied"] += 1
            return
        self._deliver(destination, ip, data)

    def _deliver(self, destination: Address, ip: str, data: bytes) -> None:
        if len(data) > MAX_UDP_PAYLOAD:
            self.counters.drops["oversize"] += 1
            return
        meter = self.meter
        if meter is not None and not meter.admit(1, len(data)):  # bandwidth.UP
            self.counters.drops["bandwidth"] += 1
            return
        family = 6 if ":" in ip else 4
        try:
            send = self._senders.get(family) or self._outbound_port(family)
            send(data, (ip, destination.port))
        except Exception:  # noqa: BLE001 - EMSGSIZE, ENOBUFS, EACCES...: a drop
            self.counters.drops["send_error"] += 1
            return
        self.counters.datagrams_up += 1
        self.counters.bytes_up += len(data)
        peer = (ip, destination.port)
        peers = self._peers
        if peer in peers:
            peers.move_to_end(peer)
        else:
            peers[peer] = None
            if len(peers) > MAX_PEERS:
                peers.popitem(last=False)
        if self.on_activity is not None:
            self.on_activity()

    def _outbound_port(self, family: int) -> Callable[[bytes, Sendable], Any]:
        """Open the outbound socket of a family; how to send on it."""
        sources = self.sources
        source = None if sources is None else sources.pick(family, self.listen_host)
        if source is None:
            interface = "::" if family == 6 else "0.0.0.0"
            port = self.reactor.listenUDP(
                0, _TargetSide(self), interface=interface, maxPacketSize=MAX_PACKET_SIZE
            )
        else:
            port = self._adopt(family, source)
        self._outbound[family] = port
        send = self._senders[family] = sender_for(port)
        return send

    def _adopt(self, family: int, source: Source) -> Any:
        """An outbound socket bound to ``source`` (IP_FREEBIND if need be)."""
        address_family = socket.AF_INET6 if family == 6 else socket.AF_INET
        with socket.socket(address_family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            bind_source(sock, source)
            port = self.reactor.adoptDatagramPort(
                sock.fileno(), address_family, _TargetSide(self), MAX_PACKET_SIZE
            )
        self.outgoing.append(source[0])
        return port

    # ------------------------------------------------------------------
    # Destination → client

    def from_target(self, datagram: bytes, addr: Any) -> None:
        host, port = canonical_ip_text(addr[0]), addr[1]
        if not self.allow_unknown_sources and (host, port) not in self._peers:
            self.counters.drops["unknown_source"] += 1
            return
        client, send = self._client_addr, self._to_client
        if client is None or send is None:
            self.counters.drops["unknown_source"] += 1
            return
        meter = self.meter
        if meter is not None and not meter.admit(0, len(datagram)):  # bandwidth.DOWN
            self.counters.drops["bandwidth"] += 1
            return
        header = self._headers.get((host, port))
        if header is None:
            # The header naming a source is the same for all its datagrams.
            header = b"\x00\x00\x00" + Address.from_host(host, port).to_bytes()
            if len(self._headers) >= MAX_PEERS:
                self._headers.clear()
            self._headers[(host, port)] = header
        packet = header + datagram
        try:
            send(packet, client)
        except Exception:  # noqa: BLE001 - EMSGSIZE when header + data > 64 KiB
            self.counters.drops[
                "oversize" if len(packet) > MAX_UDP_PAYLOAD else "send_error"
            ] += 1
            return
        self.counters.datagrams_down += 1
        self.counters.bytes_down += len(datagram)
        if self.on_activity is not None:
            self.on_activity()
