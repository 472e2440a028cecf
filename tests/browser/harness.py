"""Real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium) against a
live daphne, for the web client (webclient/).

Each browser reaches the server through its own CuttableProxy, a TCP relay the test can cut: its
open connections (the WebSocket included) die at once and new ones are refused until it is
restored, which is what a phone going through a tunnel does to the client. Nothing is downloaded
at run time: Selenium is pointed at /usr/bin/chromedriver, which runs /usr/bin/chromium.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHAT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHAT_CHROMEDRIVER", "/usr/bin/chromedriver")
# Where the screenshots of a failed browser test go (one per step and browser).
ARTIFACTS = Path(os.environ.get("CHAT_BROWSER_ARTIFACTS", ROOT / ".browser-artifacts"))


def browser_available() -> bool:
    return all(os.access(path, os.X_OK) for path in (CHROMIUM, CHROMEDRIVER))


def collect_static(env: dict[str, str]) -> None:
    """What `make run` does before serving: the client's files into STATIC_ROOT for WhiteNoise."""
    subprocess.run(
        [sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"], cwd=ROOT, env=env, check=True
    )


class CuttableProxy:
    """127.0.0.1:<port> relayed to 127.0.0.1:<target>; cut() drops every connection and refuses new
    ones until restore()."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.cut_off = False
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self.lock:
            self.cut_off = True
            doomed, self.connections = self.connections, set()
        for sock in doomed:
            _close(sock)

    def restore(self) -> None:
        with self.lock:
            self.cut_off = False

    def close(self) -> None:
        self.closed = True
        self.cut()
        _close(self.listener)

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                refused = self.cut_off
            if refused:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                _close(client)
                continue
            with self.lock:
                self.connections.update((client, upstream))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                _close(sock)
            with self.lock:
                self.connections.discard(source)
                self.connections.discard(sink)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


def new_chromium(profile: Path, width: int = 1100, height: int = 800):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",  # no request to anyone but the server under test
        "--disable-component-update",
        "--disable-sync",
        "--disable-features=Translate,MediaRouter,OptimizationHints",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(argument)
    # Every request the page makes, read back from the performance log (see requests_made).
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(profile.parent / f"{profile.name}-chromedriver.log"))
    return webdriver.Chrome(options=options, service=service)


def requests_made(driver, origin: str) -> list[str]:
    """The URLs that pages of `origin` asked for (HTTP and WebSocket), from the performance log
    (Chromium's own pages, such as the first blank tab, are not the client's doing)."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message["method"] == "Network.requestWillBeSent" and params.get("documentURL", "").startswith(origin + "/"):
            urls.append(params["request"]["url"])
        elif message["method"] == "Network.webSocketCreated":
            urls.append(params["url"])
    return urls


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
