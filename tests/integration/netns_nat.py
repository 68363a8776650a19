"""
UDP ASSOCIATE through real NAT, in network namespaces; run by
``test_udp_nat_netns.py`` as ``unshare -rn python netns_nat.py TWISTD``.

This namespace (A) holds the client, on 10.9.0.1, behind an nft
masquerade that gives every flow a port in 20000-20999 (the client's NAT),
and a DNAT of the "public" address 10.5.0.1 to the proxy (the proxy's
NAT).  A second namespace (B), joined by a veth pair, holds ``twistd
socks5`` on 10.0.0.2 with ``--udp-advertise 10.5.0.1``, a UDP echo on its
127.0.0.1 and a "who am I" UDP service.  Prints one JSON object.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from typing import Any, Dict, List

from twisted_socks5.codec import (
    Address,
    Command,
    Request,
    UDPDatagram,
    parse_reply,
    parse_udp_datagram,
)

CLIENT = "10.9.0.1"
PUBLIC = "10.5.0.1"
PROXY = "10.0.0.2"
NFT = """
table ip nat {
  chain post {
    type nat hook postrouting priority 100;
    oifname "a0" meta l4proto { tcp, udp } masquerade to :20000-20999
  }
  chain out {
    type nat hook output priority -100;
    ip daddr 10.5.0.1 dnat to 10.0.0.2
  }
}
"""
#: In B: echo on 127.0.0.1:7007, and 10.0.0.2:5555 answers with the source.
SERVICES = """
import socket, select
echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); echo.bind(("127.0.0.1", 7007))
who = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); who.bind(("10.0.0.2", 5555))
print("ready", flush=True)
while True:
    for s in select.select([echo, who], [], [])[0]:
        data, source = s.recvfrom(65535)
        s.sendto(data if s is echo else repr(source).encode(), source)
"""


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def in_b(holder: int, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["nsenter", f"--net=/proc/{holder}/ns/net", *argv], **kw)


def socks_associate(declared: Address) -> Any:
    tcp = socket.create_connection(
        (PUBLIC, 1080), timeout=10, source_address=(CLIENT, 0)
    )
    tcp.sendall(b"\x05\x01\x00" + Request(Command.UDP_ASSOCIATE, declared).to_bytes())
    data = b""
    while True:
        data += tcp.recv(1024)
        if data[:2] == b"\x05\x00":
            parsed = parse_reply(data[2:])
            if parsed is not None:
                return tcp, parsed[0]


def main(twistd: str) -> Dict[str, Any]:
    result: Dict[str, Any] = {}
    run("ip", "link", "set", "lo", "up")
    # B lives as long as this process that holds it (it says when it is in).
    holder = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", "echo in; exec sleep 600"], stdout=subprocess.PIPE
    )
    children: List[subprocess.Popen[bytes]] = []
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"in\n"
        run("ip", "link", "add", "a0", "type", "veth", "peer", "name", "b0")
        run("ip", "link", "set", "b0", "netns", str(holder.pid))
        run("ip", "addr", "add", "10.0.0.1/24", "dev", "a0")
        run("ip", "link", "set", "a0", "up")
        run("ip", "addr", "add", f"{CLIENT}/32", "dev", "lo")
        run("ip", "route", "add", f"{PUBLIC}/32", "dev", "a0")
        subprocess.run(["nft", "-f", "-"], input=NFT.encode(), check=True)
        setup = (
            "ip link set lo up && ip addr add 10.0.0.2/24 dev b0 && ip link set b0 up"
        )
        in_b(holder.pid, "sh", "-c", setup).wait()
        services = in_b(
            holder.pid, sys.executable, "-c", SERVICES, stdout=subprocess.PIPE
        )
        children.append(services)
        assert services.stdout is not None
        assert services.stdout.readline() == b"ready\n"
        server = in_b(
            holder.pid,
            twistd,
            "-n",
            "--pidfile=",
            "socks5",
            "--listen",
            f"tcp:1080:interface={PROXY}",
            "--allow-open-relay",
            "--allow-self-destinations",
            "--udp-advertise",
            PUBLIC,
            "--udp-ports",
            "31000-31009",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        children.append(server)
        assert server.stdout is not None
        for line in server.stdout:
            if b"listening on" in line:
                break
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.settimeout(10)
        udp.bind((CLIENT, 40000))
        # What the proxy's side sees of this socket: the NAT's port.
        udp.sendto(b"?", (PUBLIC, 5555))
        result["seen_from_b"] = udp.recvfrom(100)[0].decode()
        # The client names its own (private) address, as clients behind NAT do.
        tcp, reply = socks_associate(Address.from_host(CLIENT, 40000))
        result["reply"] = [reply.reply.value, reply.address.host, reply.address.port]
        target = Address.from_host("127.0.0.1", 7007)
        relay = (reply.address.host, reply.address.port)
        udp.sendto(UDPDatagram(target, b"through two NATs").to_bytes(), relay)
        data, source = udp.recvfrom(65535)
        answer = parse_udp_datagram(data)
        result["answer"] = [
            answer.data.decode(),
            answer.address.host,
            answer.address.port,
        ]
        result["answer_from"] = list(source)
        tcp.close()
    finally:
        for child in children:
            child.terminate()
            child.wait()
        holder.kill()
        holder.wait()
    return result


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1])))
