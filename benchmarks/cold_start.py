"""Cold start: a fresh interpreter's first prediction, import costs, and ``streamlit run`` to a page.

    uv run python -m benchmarks.cold_start [--reps 3] [--no-streamlit] [--browser] [--json out.json]

Every variant runs in a fresh subprocess, interleaved (A, B, C, A, B, C, ...), so drift from the other
jobs on a shared CPU hits all of them alike; compare the ratios more than the absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREDICT = "import numpy as np; import model; model.load_model().predict_proba(np.full((256, 256), 128, np.uint8))"
VARIANTS = {
    "python": "pass",
    "import torch": "import torch",
    "import torch, torchvision": "import torch, torchvision",
    "import sklearn.metrics": "import sklearn.metrics",
    "import pytorch_grad_cam": "import torch, pytorch_grad_cam",
    "predict (now)": PREDICT,
    "predict (old path: + torchvision, grad-cam, sklearn)": "import torchvision, pytorch_grad_cam, sklearn.metrics; " + PREDICT,
}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(code: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of a fresh interpreter running ``code``. On a CPU shared with other
    jobs the CPU seconds are the steadier figure (import is single-threaded: ~wall time when idle)."""
    t, c = time.perf_counter(), _children_cpu()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t, _children_cpu() - c


def streamlit_once(browser: bool = False) -> dict:
    """Seconds from ``streamlit run`` to /_stcore/health answering and to the page's HTML (and, with
    ``browser``, to the uploader being drawn and to the app being usable)."""
    from benchmarks.harness import StreamlitServer

    server = StreamlitServer()
    t0 = time.perf_counter()
    with server:
        out = {"health_s": server.ready_after}
        with urllib.request.urlopen(server.url + "/", timeout=30) as r:
            assert r.status == 200 and b"<html" in r.read(4096).lower()
        out["page_html_s"] = time.perf_counter() - t0
        if browser:
            from benchmarks.harness import chromium, wait_app_ready, wait_first_paint

            with chromium() as b:
                page = b.new_page()
                page.goto(server.url)
                wait_first_paint(page)
                out["first_paint_s"] = time.perf_counter() - t0
                wait_app_ready(page)
                out["usable_s"] = time.perf_counter() - t0
    return out


def summarize(xs: list[float]) -> dict:
    return {"median_s": round(statistics.median(xs), 2), "min_s": round(min(xs), 2), "max_s": round(max(xs), 2),
            "n": len(xs)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-streamlit", action="store_true")
    ap.add_argument("--browser", action="store_true", help="also time first paint and usable app (Playwright)")
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)

    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    cpu: dict[str, list[float]] = {k: [] for k in VARIANTS}
    streamlit: list[dict] = []
    run_once("pass")  # warm the file cache once
    for _ in range(args.reps):
        for name, code in VARIANTS.items():
            wall, cpu_s = run_once(code)
            times[name].append(wall)
            cpu[name].append(cpu_s)
        if not args.no_streamlit:
            streamlit.append(streamlit_once(args.browser))
    result = {"subprocess": {k: summarize(v) for k, v in times.items()},
              "subprocess_cpu": {k: summarize(v) for k, v in cpu.items()}, "cpu_count": os.cpu_count(),
              "loadavg_1min": os.getloadavg()[0]}
    if streamlit:
        result["streamlit"] = {k: summarize([s[k] for s in streamlit]) for k in streamlit[0]}
    for kind in ("subprocess", "subprocess_cpu"):
        base = result[kind]["python"]["median_s"]
        print(f"-- {'wall' if kind == 'subprocess' else 'CPU'} seconds, median of {args.reps}")
        for name, st in result[kind].items():
            print(f"{name:55s} {st['median_s']:6.2f} s  (min {st['min_s']:.2f}, minus bare python {st['median_s'] - base:.2f})")
        new, old = (result[kind][k]["median_s"] for k in ("predict (now)", "predict (old path: + torchvision, grad-cam, sklearn)"))
        print(f"first prediction, fresh interpreter: {new:.2f} s now vs {old:.2f} s old path ({old / new:.1f}x)")
    for name, s in result.get("streamlit", {}).items():
        print(f"streamlit run -> {name:12s} {s['median_s']:6.2f} s  (min {s['min_s']:.2f}, max {s['max_s']:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
