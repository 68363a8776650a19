"""
UDP ASSOCIATE through real NAT (nft masquerade and DNAT) in network
namespaces the test creates with ``unshare -rn`` (see ``netns_nat.py``);
skipped, saying why, where the machine does not allow it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from typing import Optional

import pytest

HERE = pathlib.Path(__file__).parent
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


def _why_not() -> Optional[str]:
    for tool in ("unshare", "nsenter", "ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (util-linux, iproute2, nftables)"
    if not os.path.exists(TWISTD):
        return "twistd is not installed next to python"
    probe = subprocess.run(
        [
            "unshare",
            "-rn",
            "sh",
            "-c",
            "ip link add v0 type veth peer name v1 && nft add table ip probe",
        ],
        capture_output=True,
        check=False,
    )
    if probe.returncode:
        why = probe.stderr.decode(errors="replace").strip()
        return f"no user and network namespaces with veth and nft here: {why}"
    return None


WHY_NOT = _why_not()


@pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))
def test_udp_associate_through_masquerade_and_dnat() -> None:
    """
    The client (10.9.0.1:40000, behind a masquerade that changes its port)
    names its private address; the proxy (10.0.0.2, behind a DNAT from
    10.5.0.1) advertises 10.5.0.1: the association is pinned to the NAT's IP
    and learns the NAT's port, and the datagram makes the round trip.
    """
    root = HERE.parent.parent
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(root), env.get("PYTHONPATH")])
    )
    done = subprocess.run(
        ["unshare", "-rn", sys.executable, str(HERE / "netns_nat.py"), TWISTD],
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    result = json.loads(done.stdout)
    # The NAT did change the client's port (it sent from 40000).
    seen_ip, seen_port = result["seen_from_b"].strip("()").replace("'", "").split(", ")
    assert seen_ip == "10.0.0.1" and 20000 <= int(seen_port) <= 20999
    code, host, port = result["reply"]
    assert (code, host) == (0, "10.5.0.1") and 31000 <= port <= 31009
    assert result["answer"] == ["through two NATs", "127.0.0.1", 7007]
    assert result["answer_from"] == ["10.5.0.1", port]
