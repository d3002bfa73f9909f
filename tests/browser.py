"""A small driver for a real headless Chromium over the DevTools protocol, and a JupyterLab server to point it at.

Used by ``tests/test_browser.py``. Chromium is Debian's ``chromium`` package (``.ci/run`` installs it);
the protocol is spoken over a websocket (``websocket-client``, which Jupyter's server already depends on).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import websocket

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """One headless Chromium with one page; ``evaluate`` runs JavaScript in it, ``errors`` collects what the
    console reported as an error (console.error, uncaught exceptions, failed loads)."""

    def __init__(self, executable: str, profile: Path):
        arguments = [executable, "--headless=new", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
                     "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={profile}",
                     "--window-size=1400,1000", "about:blank"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            arguments.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        self.process = subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        url = None
        deadline = time.monotonic() + 60
        while url is None and time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.process.returncode} before it listened")
            match = re.search(r"DevTools listening on (ws://\S+)", line)
            url = match.group(1) if match else None
        if url is None:
            raise RuntimeError("chromium did not report its DevTools address within 60 s")
        self.socket = websocket.create_connection(url, timeout=120, suppress_origin=True)
        self.ids = itertools.count(1)
        self.errors: list[str] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page"):
            self.call(f"{domain}.enable", session=True)

    def _record(self, message: dict) -> None:
        method, params = message.get("method"), message.get("params", {})
        if method == "Page.javascriptDialogOpening":  # JupyterLab's "leave the page?" when we navigate on
            self.socket.send(json.dumps({"id": next(self.ids), "method": "Page.handleJavaScriptDialog",
                                         "params": {"accept": True}, "sessionId": self.session}))
        elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                           for a in params.get("args", [])))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            self.errors.append("exception: " + str(details.get("exception", {}).get("description", details.get("text"))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())

    def call(self, method: str, *, session: bool = False, wait: float = 120, **params) -> dict:
        ident = next(self.ids)
        self.socket.settimeout(wait)
        message = {"id": ident, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == ident:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._record(reply)

    def evaluate(self, expression: str, *, timeout: float = 120):
        """The value of a JavaScript expression (awaited if it is a promise)."""
        result = self.call("Runtime.evaluate", session=True, wait=timeout + 30, expression=expression,
                           awaitPromise=True, returnByValue=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails'].get('exception', {}).get('description')}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, *, timeout: float = 120, poll: float = 0.25):
        """Poll ``expression`` until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(poll)
        raise TimeoutError(f"not true within {timeout} s: {expression[:120]}")

    def open(self, url: str) -> None:
        self.call("Page.navigate", session=True, url=url)

    def drag(self, x: float, y: float, dx: float) -> None:
        """Press the left mouse button at (x, y), move it dx pixels to the right in steps, release."""
        self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x, y=y)
        self.call("Input.dispatchMouseEvent", session=True, type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for step in range(1, 11):
            self.call("Input.dispatchMouseEvent", session=True, type="mouseMoved", x=x + dx * step / 10, y=y,
                      button="left", buttons=1)
        self.call("Input.dispatchMouseEvent", session=True, type="mouseReleased", x=x + dx, y=y, button="left",
                  clickCount=1)

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()


class JupyterLab:
    """``jupyter lab`` on 127.0.0.1 with its own token and its own temporary config, data, runtime and
    settings folders, serving ``root``; the app object is exposed to the page (``window.jupyterapp``)."""

    def __init__(self, root: Path, home: Path):
        self.port, self.token = free_port(), secrets.token_hex(16)
        env = {key: value for key, value in os.environ.items() if key != "MPLBACKEND"}  # kernels draw inline
        for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                     "JUPYTERLAB_WORKSPACES_DIR", "IPYTHONDIR"):
            folder = home / name.lower()
            folder.mkdir(parents=True)
            env[name] = str(folder)
        env["JUPYTER_PLATFORM_DIRS"] = "1"
        self._settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]))
        arguments = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
                     f"--ServerApp.port={self.port}", f"--IdentityProvider.token={self.token}",
                     f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
                     "--LabApp.news_url=", "--LabServerApp.extension_manager=readonly"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            arguments.append("--allow-root")  # JupyterLab refuses to run as root without it
        self.log = (home / "jupyterlab.log").open("w")
        self.process = subprocess.Popen(arguments, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}api/status?token={self.token}", timeout=2):
                    break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"JupyterLab did not start: {(home / 'jupyterlab.log').read_text()[-2000:]}")
                time.sleep(0.5)

    @staticmethod
    def _settings(folder: Path) -> None:
        """No news fetched, no update check: the server is offline, and a failed fetch is a console error."""
        plugin = folder / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
        plugin.parent.mkdir(parents=True)
        plugin.write_text(json.dumps({"checkForUpdates": False, "fetchNews": "false"}))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def notebook_url(self, relative: str) -> str:
        return f"{self.url}lab/tree/{relative}?token={self.token}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
