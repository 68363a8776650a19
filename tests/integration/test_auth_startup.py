"""``twistd socks5`` refuses credentials that cannot work, in one line."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import utils

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


@pytest.mark.skipif(not os.path.exists(TWISTD), reason="no twistd next to python")
@pytest_twisted.ensureDeferred
async def test_twistd_refuses_a_missing_password_file(tmp_path: Any) -> None:
    missing = tmp_path / "nowhere.htpasswd"
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    out, err, code = await utils.getProcessOutputAndValue(
        TWISTD,
        ["-n", "--pidfile=", "socks5", "--auth", f"htpasswd:{missing}"],
        env=env,
        path=str(tmp_path),
    )
    text = (out + err).decode()
    assert code != 0
    assert "Traceback" not in text
    assert (
        text.strip()
        .splitlines()[-1]
        .endswith(f"--auth htpasswd: no such file: '{missing}'")
    )
