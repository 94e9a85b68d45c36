"""A real headless Chromium driven over the DevTools protocol (websocket-client, no browser
download): what the browser tests and the template-card screenshots use to open ComfyUI's real
frontend as a user does.

Chromium comes from Debian's packages (``apt-get install -y chromium``; `.ci/run` installs it).
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

# The flags the probe of these machines measured to work headless and offline (no Google lookups,
# no background connections refused many at a time).
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def chromium_path() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def unavailable_reason() -> str | None:
    """None when a browser test can run here; else why it skips (and how to enable it)."""
    if chromium_path() is None:
        return "no Chromium: install Debian's package (apt-get install -y chromium) or set CHROMIUM to a browser"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (pip install -e '.[test]')"
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript in it and returns the value."""

    def __init__(self, width: int = 1600, height: int = 1000):
        import websocket

        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.process = subprocess.Popen(
            [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        browser_ws = self._devtools_address(timeout=60)
        port = re.search(r":(\d+)/", browser_ws).group(1)
        page_ws = self._page_address(port)
        self.ws = websocket.create_connection(page_ws, timeout=120, suppress_origin=True)
        self._ids = itertools.count(1)
        self.events: list[dict] = []
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def _devtools_address(self, timeout: float) -> str:
        deadline = time.time() + timeout
        seen = []
        while time.time() < deadline:
            line = self.process.stderr.readline()
            if not line:
                if self.process.poll() is not None:
                    raise BrowserError("Chromium exited: " + "".join(seen)[-2000:])
                continue
            seen.append(line)
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            if match:
                return match.group(1)
        raise BrowserError("Chromium did not open its DevTools port: " + "".join(seen)[-2000:])

    @staticmethod
    def _page_address(port: str) -> str:
        import urllib.request

        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
                pages = [t for t in json.loads(response.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]["webSocketDebuggerUrl"]
            time.sleep(0.1)
        raise BrowserError("Chromium has no page to drive")

    def send(self, method: str, **params):
        """One DevTools command; returns its result (events that arrive meanwhile are kept)."""
        message_id = next(self._ids)
        self.ws.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for k, event in enumerate(self.events):
                if event["method"] == method:
                    return self.events.pop(k)["params"]
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                reply = json.loads(self.ws.recv())
            except Exception:  # websocket's timeout
                break
            finally:
                self.ws.settimeout(120)
            if "method" in reply:
                self.events.append(reply)
        raise BrowserError(f"no {method} within {timeout} s")

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JavaScript expression (promises awaited), or BrowserError with the page's
        exception text."""
        result = self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True,
                           userGesture=True,
                           timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"JavaScript failed: {text}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60, interval: float = 0.25):
        """Poll a JavaScript expression until it is truthy; returns its value."""
        deadline = time.time() + timeout
        last = None
        while time.time() < deadline:
            try:
                last = self.evaluate(expression)
            except BrowserError as error:
                last = str(error)
            else:
                if last:
                    return last
            time.sleep(interval)
        raise BrowserError(f"timed out waiting for {expression!r} (last: {last!r})")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def screenshot(self, path: Path, *, quality: int = 85) -> Path:
        data = self.send("Page.captureScreenshot", format="jpeg", quality=quality)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
