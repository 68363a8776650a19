"""
The live console in a real browser: headless Chromium, driven by Selenium,
logs in, sees the tunnels a SOCKS client (python-socks) opened through the
real server, closes one with its button and sees it gone; the client's
socket is closed.  Selenium blocks, so every call of it runs in a thread
(``deferToThread``) and the reactor keeps serving the proxy and the console.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, List

import pytest
import pytest_twisted
from conftest import Echo, listen
from test_clients import userpass
from test_console import HOSTILE, SOCKS_USERS, admin_checker
from twisted.internet import threads

from twisted_socks5.admin import console_site

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

webdriver = pytest.importorskip(
    "selenium.webdriver", reason="selenium is not installed (pip install selenium)"
)
pytestmark = pytest.mark.skipif(
    not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)),
    reason=f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian: chromium chromium-driver)",
)

#: Bounds every wait of the browser (it polls; never a measure).
WAIT = 60


def open_tunnel(proxy_port: int, echo_port: int, user: str) -> socket.socket:
    """A tunnel through the proxy to the echo server, by python-socks."""
    from python_socks import ProxyType
    from python_socks.sync import Proxy

    proxy = Proxy.create(
        ProxyType.SOCKS5, "127.0.0.1", proxy_port, user, SOCKS_USERS[user]
    )
    sock = proxy.connect("127.0.0.1", echo_port, timeout=WAIT)
    sock.settimeout(WAIT)
    sock.sendall(b"hello")
    received = b""
    while len(received) < 5:
        received += sock.recv(5 - len(received))
    return sock


def ended(sock: socket.socket) -> bool:
    """Whether the proxy closed the tunnel (EOF or reset), waiting for it."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def start_browser() -> Any:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # as root in a container
        "--disable-dev-shm-usage",
        "--window-size=1500,700",
        "--no-proxy-server",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def use_the_console(driver: Any, base: str, shots: Path) -> List[str]:
    """Log in, close the hostile user's tunnel; the users left listed."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, WAIT)
    driver.get(base + "/")
    wait.until(lambda d: d.current_url.endswith("/login"))
    driver.find_element(By.ID, "user").send_keys("root")
    driver.find_element(By.ID, "password").send_keys("toor")
    driver.find_element(By.ID, "login").click()

    def rows(d: Any) -> Any:
        return d.find_elements(By.CSS_SELECTOR, "#tunnels tbody tr")

    def users_shown(d: Any) -> Any:
        # The page redraws its table on every poll: an element found just
        # before may be gone (stale); then look again.
        try:
            return [r.find_element(By.CSS_SELECTOR, "td.user").text for r in rows(d)]
        except StaleElementReferenceException:
            return None

    def close_hostile(d: Any) -> bool:
        try:
            for r in rows(d):
                if r.find_element(By.CSS_SELECTOR, "td.user").text == HOSTILE:
                    r.find_element(By.TAG_NAME, "button").click()
                    return True
        except StaleElementReferenceException:
            pass
        return False

    wait.until(lambda d: len(users_shown(d) or ()) == 3)
    users = wait.until(users_shown)
    # The name is shown as text: no element came out of it.
    assert sorted(users) == sorted(["alice", "alice", HOSTILE])
    assert driver.find_elements(By.CSS_SELECTOR, "img") == []
    assert driver.find_element(By.ID, "admin").text == "root"
    driver.save_screenshot(str(shots / "console.png"))

    wait.until(close_hostile)
    wait.until(lambda d: len(users_shown(d) or ()) == 2)
    driver.save_screenshot(str(shots / "console-after-close.png"))
    left: Any = wait.until(users_shown)
    return left


@pytest_twisted.ensureDeferred
async def test_a_browser_logs_in_sees_a_tunnel_and_closes_it(
    make_proxy: Any, tcp_target: Any, tmp_path: Path
) -> None:
    factory, port = make_proxy(authenticators=[userpass(**SOCKS_USERS)])
    echo = tcp_target(Echo)
    site_port = listen(console_site(factory, [admin_checker(root="toor")]))
    base = f"http://127.0.0.1:{site_port.getHost().port}"
    socks = []
    driver = None
    try:
        for user in ("alice", HOSTILE, "alice"):
            socks.append(await threads.deferToThread(open_tunnel, port, echo, user))
        driver = await threads.deferToThread(start_browser)
        left = await threads.deferToThread(use_the_console, driver, base, tmp_path)
        assert left == ["alice", "alice"]
        assert await threads.deferToThread(ended, socks[1])
        assert len(factory.active) == 2
        assert (tmp_path / "console.png").stat().st_size > 0
    finally:
        if driver is not None:
            await threads.deferToThread(driver.quit)
        for sock in socks:
            sock.close()
        await site_port.stopListening()
