"""The web page in headless Chromium (WebDriver over plain HTTP to chromedriver): open it on a
phone-sized window, submit, watch the progress bar move and the image appear, save a screenshot.
``SERVE_SCREENSHOT=path`` also keeps the screenshot there (docs/images/serve-page.png is made so)."""

import base64
import os
import shutil
import subprocess
import time

import httpx
import pytest

from diffusekit.serving.app import create_app
from diffusekit.serving.service import Settings
from servers import TIMEOUT_S, free_port, thread_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="no chromium and chromedriver on this machine "
                                                                  "(Debian: apt-get install chromium chromium-driver)")


class Browser:
    """A minimal WebDriver client: one session of headless Chromium."""

    def __init__(self, driver_url: str) -> None:
        self.http = httpx.Client(base_url=driver_url, timeout=TIMEOUT_S)
        options = {"binary": CHROMIUM, "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                                                 "--disable-dev-shm-usage", "--window-size=412,915"]}
        answer = self.http.post("/session", json={"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}}).json()["value"]
        self.session = f"/session/{answer['sessionId']}"

    def command(self, path: str, payload: dict | None = None, method: str = "POST"):
        answer = self.http.request(method, self.session + path, json=payload if method == "POST" else None)
        value = answer.json()["value"]
        if answer.status_code != 200:
            raise RuntimeError(f"WebDriver {path}: {value}")
        return value

    def script(self, code: str):
        return self.command("/execute/sync", {"script": code, "args": []})

    def wait_for(self, code: str, timeout: float = TIMEOUT_S):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.script(code)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"never true in the page: {code}")

    def close(self) -> None:
        self.http.delete(self.session)
        self.http.close()


@pytest.fixture
def browser():
    port = free_port()
    driver = subprocess.Popen([DRIVER, f"--port={port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.TransportError, ValueError, KeyError):
                time.sleep(0.1)
        session = Browser(url)
        try:
            yield session
        finally:
            session.close()
    finally:
        driver.terminate()
        driver.wait(TIMEOUT_S)


def test_page_submits_shows_progress_and_the_image(digits_models, tmp_path, browser):
    app = create_app(Settings(data_dir=tmp_path / "data"), digits_models)
    with thread_server(app) as url:
        browser.command("/url", {"url": url + "/"})
        browser.wait_for("return document.getElementById('class_label').options.length === 10")
        browser.script("document.getElementById('class_label').value = '7';"
                       "document.getElementById('steps').value = '30';"
                       "document.getElementById('seed').value = '3';"
                       "document.getElementById('n').value = '2';")
        submit = browser.command("/element", {"using": "css selector", "value": "#submit"})
        browser.command(f"/element/{next(iter(submit.values()))}/click", {})
        browser.wait_for("return document.querySelectorAll('#images img').length === 2 && "
                         "[...document.querySelectorAll('#images img')].every(i => i.complete && i.naturalWidth)")
        steps = browser.script("return window.progressLog")
        text = browser.script("return document.getElementById('progress-text').textContent")
        history = browser.wait_for("return document.querySelector('#history .status') && "
                                   "document.querySelector('#history .status').textContent")
        shot = base64.b64decode(browser.command("/screenshot", method="GET"))
    moving = [step for step, total in steps if total == 30 and 0 < step < 30]
    assert len(set(moving)) >= 2 and moving == sorted(moving), steps  # the bar moved forward step by step
    assert text == "done" and history == "succeeded"
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "serve-page.png").write_bytes(shot)
    if os.environ.get("SERVE_SCREENSHOT"):
        with open(os.environ["SERVE_SCREENSHOT"], "wb") as handle:
            handle.write(shot)
