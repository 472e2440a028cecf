from __future__ import annotations

import re

import pytest

from tests.browser.harness import ARTIFACTS, CuttableProxy, browser_available, collect_static, new_chromium, remove_tree
from tests.live import running_server, server_env
from tests.services import require


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """One daphne serving the client, as `make run` does (static files collected first)."""
    require("Chromium and chromedriver", browser_available())
    directory = tmp_path_factory.mktemp("webclient")
    collect_static(server_env(directory / "db.sqlite3"))
    with running_server(directory) as server:
        yield server


class Browser:
    """One person's browser, reaching the server through a proxy the test can cut."""

    def __init__(self, name: str, driver, proxy: CuttableProxy) -> None:
        self.name, self.driver, self.proxy = name, driver, proxy

    @property
    def url(self) -> str:
        return self.proxy.url + "/"


@pytest.fixture
def browsers(request, live, tmp_path):
    """open_browser(name, width=, height=) -> Browser; step(label) records a screenshot of every
    open browser, written to ARTIFACTS/<test>/ only if the test fails."""
    opened: list[Browser] = []
    shots: list[tuple[str, bytes]] = []

    def open_browser(name: str, width: int = 1100, height: int = 800) -> Browser:
        proxy = CuttableProxy(live.port)
        driver = new_chromium(tmp_path / f"profile-{name}", width, height)
        driver.set_page_load_timeout(20)
        browser = Browser(name, driver, proxy)
        opened.append(browser)
        driver.get(browser.url)
        return browser

    def step(label: str) -> None:
        for browser in opened:
            try:
                shots.append((f"{len(shots):03d}-{label}-{browser.name}", browser.driver.get_screenshot_as_png()))
            except Exception:  # a screenshot must never be why a test fails
                pass

    open_browser.step = step
    yield open_browser
    failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False) for when in ("setup", "call"))
    if failed:
        step("at-failure")
        target = ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.nodeid)
        remove_tree(target)
        target.mkdir(parents=True, exist_ok=True)
        for name, png in shots:
            (target / (re.sub(r"[^\w.-]+", "_", name) + ".png")).write_bytes(png)
        for browser in opened:
            try:
                console = browser.driver.get_log("browser")
            except Exception:
                continue
            lines = [f"{entry['level']} {entry['message']}" for entry in console]
            (target / f"console-{browser.name}.log").write_text("\n".join(lines) + "\n")
        print(f"\nbrowser screenshots of each step: {target}")
    for browser in opened:
        try:
            browser.driver.quit()
        finally:
            browser.proxy.close()
