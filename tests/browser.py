"""A headless Chromium from Debian's packages driven by Selenium through /usr/bin/chromedriver, so
nothing is downloaded at test time. `scripts/install_browser.sh` installs both (scripts/test.sh
runs it). A missing browser fails the tests with that advice; set MOSSSERVE_SKIP_BROWSER_TESTS=1
to skip them deliberately on a machine without one."""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "playground"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--autoplay-policy=no-user-gesture-required", "--use-fake-ui-for-media-stream",
         "--use-fake-device-for-media-stream", "--window-size=1100,1000"]


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if not missing:
        return
    message = f"the playground tests need {', '.join(missing)}: run scripts/install_browser.sh"
    if os.environ.get("MOSSSERVE_SKIP_BROWSER_TESTS") == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@contextmanager
def chromium() -> Iterator[Browser]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    with tempfile.TemporaryDirectory(prefix="mossserve-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
        downloads = Path(profile) / "downloads"
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        try:
            yield Browser(driver, downloads)
        finally:
            driver.quit()


class Browser:
    """The few things the tests do with a page: find, type, click, wait for a JS condition, screenshot."""

    def __init__(self, driver, downloads: Path) -> None:
        self.driver, self.downloads = driver, downloads

    def open(self, url: str) -> None:
        self.driver.get(url)
        self.wait("window.playground && window.playground.ready")

    def el(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return self.el(css).text

    def fill(self, css: str, value: str) -> None:
        element = self.el(css)
        element.clear()
        element.send_keys(value)

    def click(self, css: str) -> None:
        self.el(css).click()

    def select(self, css: str, value: str) -> None:
        from selenium.webdriver.support.ui import Select

        Select(self.el(css)).select_by_value(value)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition: str, timeout: float = 60) -> None:
        """Until the JS expression `condition` is truthy (the page's own state, never a sleep)."""
        from selenium.webdriver.support.ui import WebDriverWait

        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: d.execute_script(f"return !!({condition})"),
            message=f"waited {timeout} s for {condition}; page errors: {self.errors()}")

    def downloaded_after(self, css: str, name: str, timeout: float = 60) -> bytes:
        """Click `css` and return the file the page saves as `name` (Chromium writes it under a
        temporary name first)."""
        from selenium.webdriver.support.ui import WebDriverWait

        path = self.downloads / name
        path.unlink(missing_ok=True)
        self.click(css)
        WebDriverWait(self.driver, timeout, poll_frequency=0.05).until(
            lambda d: path.is_file() and not list(self.downloads.glob("*.crdownload")), message=f"no download {name}")
        data = path.read_bytes()
        path.unlink()
        return data

    def errors(self) -> str:
        return json.dumps(self.js("return document.getElementById('error')?.textContent || ''"))

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path
