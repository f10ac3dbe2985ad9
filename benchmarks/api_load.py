"""Load test of the HTTP API over a real socket: many clients at once, good and bad bodies mixed.

    uv run python -m benchmarks.api_load [--clients 16] [--requests 400] [--json out.json]

Starts ``uvicorn api:app`` on a free local port with the shipped model, then ``--clients`` threads send
``--requests`` requests in all, cycling through: real films as raw bodies and as multipart uploads, one
with a heatmap (``cam=gradcam++``), a 2000 px original, a truncated JPEG, a non-image, a DICOM header
with no pixels, and a body over the size cap (``Content-Length`` only: 413 before it is read). Reports
status codes per kind (there must be no 5xx), latency p50/p95 per kind, throughput, and the server's peak
RSS. Asserts nothing; prints a table and JSON.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from benchmarks.harness import ROOT, _status_kb, free_port

DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))


def bodies() -> list[tuple[str, str, bytes, dict]]:
    """(kind, path+query, body, headers) cycled through by the clients."""
    films = sorted((DATA / "val" / "NORMAL").iterdir())[:2] + sorted((DATA / "val" / "PNEUMONIA").iterdir())[:2]
    raw = [f.read_bytes() for f in films]
    big = io.BytesIO()
    Image.open(films[0]).convert("L").resize((2000, 1700)).save(big, format="JPEG", quality=90)
    boundary = uuid.uuid4().hex
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpeg\"\r\n"
                 f"Content-Type: image/jpeg\r\n\r\n").encode() + raw[1] + f"\r\n--{boundary}--\r\n".encode()
    octet = {"Content-Type": "application/octet-stream"}
    return [
        ("film (raw body)", "/predict", raw[0], octet),
        ("film (raw body)", "/predict", raw[2], octet),
        ("film (multipart)", "/predict", multipart, {"Content-Type": f"multipart/form-data; boundary={boundary}"}),
        ("film + heatmap", "/predict?cam=gradcam%2B%2B", raw[3], octet),
        ("2000 px original", "/predict", big.getvalue(), octet),
        ("truncated JPEG", "/predict", raw[1][: len(raw[1]) // 3], octet),
        ("not an image", "/predict", b"%PDF-1.4 not an x-ray" * 50, octet),
        ("DICOM without pixels", "/predict", b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x001.2\0", octet),
        ("over the size cap", "/predict", b"", {**octet, "Content-Length": str(300 * 2**20)}),
    ]


def one(port: int, path: str, body: bytes, headers: dict) -> tuple[int, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    t = time.perf_counter()
    try:
        if "Content-Length" in headers and not body:  # announce a huge body, send none: the cap must answer first
            conn.putrequest("POST", path)
            for k, v in headers.items():
                conn.putheader(k, v)
            conn.endheaders()
        else:
            conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t
    finally:
        conn.close()


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "api:app", "--port", str(port), "--log-level", "warning"],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.wait(0.2):
            try:
                peak[0] = max(peak[0], _status_kb(server.pid, "VmRSS"))
            except OSError:
                return

    try:
        for _ in range(600):  # the first /health loads the model
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            raise RuntimeError("the API did not start: " + (server.stderr.read() if server.poll() is not None else ""))
        threading.Thread(target=watch, daemon=True).start()
        jobs = bodies()
        by_kind: dict[str, dict] = defaultdict(lambda: {"status": defaultdict(int), "seconds": []})
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            futures = [(jobs[i % len(jobs)][0], pool.submit(one, port, *jobs[i % len(jobs)][1:])) for i in range(args.requests)]
            for kind, fut in futures:
                try:
                    status, seconds = fut.result()
                except OSError as err:  # a dropped connection counts against the server
                    status, seconds = f"connection error ({type(err).__name__})", float("nan")
                by_kind[kind]["status"][status] += 1
                by_kind[kind]["seconds"].append(seconds)
        wall = time.perf_counter() - t0
    finally:
        stop.set()
        server.terminate()
        server.wait(timeout=30)

    result = {"clients": args.clients, "requests": args.requests, "wall_s": wall, "requests_per_s": args.requests / wall,
              "server_peak_rss_mb": peak[0] / 1024, "cpus": os.cpu_count(),
              "server_errors_5xx": sum(n for r in by_kind.values() for s, n in r["status"].items() if isinstance(s, int) and s >= 500),
              "kinds": {k: {"status": dict(r["status"]), "p50_s": statistics.median(r["seconds"]),
                            "p95_s": sorted(r["seconds"])[int(0.95 * (len(r["seconds"]) - 1))]} for k, r in by_kind.items()}}
    print(f"{args.requests} requests from {args.clients} clients in {wall:.1f} s ({result['requests_per_s']:.1f}/s); "
          f"5xx: {result['server_errors_5xx']}; server peak RSS {result['server_peak_rss_mb']:.0f} MB")
    print(f"{'kind':<22} {'status':<18} {'p50 s':>7} {'p95 s':>7}")
    for k, r in result["kinds"].items():
        print(f"{k:<22} {json.dumps(r['status']):<18} {r['p50_s']:7.2f} {r['p95_s']:7.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
