"""`twistd socks5` refusing to start: one line that says why, no traceback."""

from __future__ import annotations

import os
import socket
from typing import Any, Iterator, List

import pytest
import pytest_twisted
from test_twistd import TWISTD, _env
from twisted.internet import utils

pytestmark = pytest.mark.skipif(
    not os.path.exists(TWISTD), reason="twistd is not installed next to python"
)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port someone else listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


async def _twistd(tmp_path: Any, *args: str) -> tuple[str, int]:
    out, err, code = await utils.getProcessOutputAndValue(
        TWISTD, ["-n", "--pidfile=", "socks5", *args], env=_env(), path=str(tmp_path)
    )
    return (out + err).decode(), code


def _errors(output: str) -> List[str]:
    return [line for line in output.splitlines() if "error]" in line]


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
@pytest_twisted.ensureDeferred
async def test_a_port_in_use_is_one_line(
    tmp_path: Any, taken_port: int, workers: List[str]
) -> None:
    output, code = await _twistd(
        tmp_path, "--listen", f"tcp:{taken_port}:interface=127.0.0.1", *workers
    )
    assert code != 0
    assert "Traceback" not in output
    (line,) = _errors(output)
    assert line.endswith(
        f"twistd socks5: Couldn't listen on 127.0.0.1:{taken_port}: "
        "[Errno 98] Address already in use."
    )


@pytest_twisted.ensureDeferred
async def test_a_metrics_port_in_use_is_one_line(
    tmp_path: Any, taken_port: int
) -> None:
    pytest.importorskip("prometheus_client")
    output, code = await _twistd(
        tmp_path,
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--metrics",
        f"tcp:{taken_port}:interface=127.0.0.1",
    )
    assert code != 0 and "Traceback" not in output
    (line,) = _errors(output)
    assert f"Couldn't listen on 127.0.0.1:{taken_port}" in line


@pytest_twisted.ensureDeferred
async def test_a_bad_value_is_one_line_after_a_short_usage(tmp_path: Any) -> None:
    output, code = await _twistd(tmp_path, "--handshake-timeout", "-1")
    assert code == 1 and "Traceback" not in output
    assert (
        output.strip()
        .splitlines()[-1]
        .endswith("--handshake-timeout: must be positive")
    )
    assert len(output.strip().splitlines()) <= 4


@pytest_twisted.ensureDeferred
async def test_version_is_ours_and_twisteds(tmp_path: Any) -> None:
    from twisted_socks5.tap import version_line

    output, code = await _twistd(tmp_path, "--version")
    assert code == 0
    assert output == version_line() + "\n"
