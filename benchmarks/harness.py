"""Run the real app: ``streamlit run`` on a free localhost port, and Debian's Chromium via Playwright.

Shared by the end-to-end tests and the benchmark so both measure the same thing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CXR_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StreamlitServer:
    def __init__(self, model_dir: str | Path | None = None, port: int | None = None, root: str | Path | None = None,
                 env: dict | None = None):
        self.root = Path(root) if root else ROOT  # another checkout of the app (e.g. a before/after comparison)
        self.extra_env = env or {}
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = model_dir
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after = 0.0

    def start(self, timeout: float = 120.0) -> "StreamlitServer":
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        if self.model_dir is not None:
            env["CXR_MODEL_DIR"] = str(self.model_dir)
        cmd = [sys.executable, "-m", "streamlit", "run", str(self.root / "streamlit_app.py"), "--server.port", str(self.port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited early:\n{self.proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        self.ready_after = time.perf_counter() - self.started_at
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"streamlit did not become healthy within {timeout:.0f}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def peak_rss_bytes(self) -> int:
        """Peak resident memory of the server process (Linux)."""
        return _status_kb(self.proc.pid, "VmHWM") * 1024

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextmanager
def chromium(headless: bool = True):
    """A Playwright browser on Debian's Chromium (Playwright's own download is not available offline)."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} not found: apt-get install -y chromium")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=headless, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# ---- page helpers (Streamlit DOM) -------------------------------------------------------------------

DECISION_RE = r"Decision:\s*(PNEUMONIA|NORMAL|UNCERTAIN|NOT ASSESSED)"


def wait_first_paint(page, timeout_ms: int = 120_000) -> None:
    """The page's title and uploader are visible (drawn before the model is imported)."""
    page.wait_for_selector('[data-testid="stFileUploaderDropzone"]', timeout=timeout_ms)


def wait_app_ready(page, timeout_ms: int = 120_000) -> None:
    """Fully usable: the model is loaded and the sidebar threshold controls are drawn."""
    page.wait_for_selector('[data-testid="stSidebar"] [data-testid="stSlider"]', timeout=timeout_ms)
    wait_idle(page, timeout_ms)


def upload_files(page, files) -> None:
    """``files``: paths or Playwright file payload dicts {name, mimeType, buffer}."""
    page.locator('[data-testid="stFileUploaderDropzone"] input[type="file"]').first.set_input_files(files)


def read_decision(page, timeout_ms: int = 60_000) -> str:
    import re

    wait_idle(page, timeout_ms)
    loc = page.get_by_text(re.compile(DECISION_RE)).first
    loc.wait_for(timeout=timeout_ms)
    return re.search(DECISION_RE, loc.inner_text()).group(1)


def slider(page, label: str):
    return page.locator('[data-testid="stSlider"]').filter(has_text=label).get_by_role("slider")


def set_slider_extreme(page, label: str, key: str) -> None:
    """Press Home/End on a Streamlit slider (keyboard is robust to layout)."""
    s = slider(page, label)
    s.focus()
    s.press(key)


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the script run triggered by the last interaction has finished and no stale
    (previous-run) elements remain. Streamlit marks both in the DOM."""
    page.wait_for_timeout(250)  # let the interaction reach the server and a rerun start
    page.wait_for_function(
        """() => {
            const app = document.querySelector('[data-testid="stApp"]');
            return app && app.getAttribute('data-test-script-state') !== 'running'
                && !document.querySelector('[data-stale="true"]');
        }""",
        timeout=timeout_ms,
    )


# ---- timing without fixed sleeps: a poller inside the page records when things appear -----------

_POLLER = """([name]) => {
  const b = window.__bench = {t0: performance.now(), name, decision: null, heatmap: null};
  const fresh = (el) => !el.closest('[data-stale="true"]');
  const tick = () => {
    const now = performance.now();
    const h3 = [...document.querySelectorAll('h3')].filter(fresh);
    const named = h3.some((h) => h.innerText.includes(name));
    if (b.decision === null && named && h3.some((h) => /Decision:\\s*(PNEUMONIA|NORMAL|UNCERTAIN|NOT ASSESSED)/.test(h.innerText)))
      b.decision = now - b.t0;
    if (b.decision !== null && b.heatmap === null) {
      for (const plot of document.querySelectorAll('.js-plotly-plot')) {
        if (!fresh(plot) || plot.querySelectorAll('.imagelayer image').length < 2) continue;
        const wantsHeat = (plot._fullData || []).some((t) => t.type === 'heatmap');
        if (!wantsHeat || plot.querySelector('.hm image')) { b.heatmap = now - b.t0; break; }
      }
    }
    if (b.heatmap === null) setTimeout(tick, 5);
  };
  tick();
}"""


def timed_upload(page, path: str, timeout_ms: int = 120_000) -> dict:
    """Upload one file and return seconds from the upload to (a) its decision shown and (b) its
    X-ray + heatmap drawn by plotly, both measured in the page (polling every 5 ms, no fixed sleep).
    The file's name must differ from the one on screen (the poller waits for its subheader)."""
    page.evaluate(_POLLER, [Path(path).name])
    upload_files(page, [str(path)])
    page.wait_for_function("() => window.__bench && window.__bench.heatmap !== null", timeout=timeout_ms, polling=20)
    b = page.evaluate("() => window.__bench")
    return {"decision_s": b["decision"] / 1000, "heatmap_s": b["heatmap"] / 1000}


class WebsocketMeter:
    """Bytes the browser receives over Streamlit's websocket (the script's deltas: figures, images, text)."""

    def __init__(self, page):
        self.bytes = 0
        page.on("websocket", lambda ws: ws.on("framereceived", self._add))

    def _add(self, payload) -> None:
        self.bytes += len(payload) if payload is not None else 0
