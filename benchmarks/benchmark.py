"""Performance figures for the shipped model and app. Prints a table and JSON; asserts nothing.

    uv run python -m benchmarks.benchmark [--model assets/model] [--json out.json] [--no-browser] [--no-model]
        [--against /tmp/before] [--compare-threads]

Targets (2-core CPU): predict <= 40 ms, predict + Grad-CAM <= 150 ms, batch >= 60 img/s, app RSS <= 1.5 GB;
in the browser (issue #13): upload -> heatmap visible <= 0.5 s p50 for a 224 px and a 2000 px JPEG, first upload
of a session <= 1 s, `streamlit run` -> an upload's decision and heatmap on screen <= 6 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import model
from benchmarks.harness import ROOT, StreamlitServer, chromium, wait_app_ready, wait_first_paint

DATA = Path(os.environ.get("CXR_DATA_DIR", ROOT.parent / "shared" / "data" / "chest_xray"))
TARGETS = {"predict_ms_p50": 40, "predict_gradcam_ms_p50": 150, "batch32_img_s": 60, "app_peak_rss_mb": 1536,
           "app_cold_start_usable_s": 6, "browser_upload_to_heatmap_s_p50": 0.5, "browser_first_upload_s": 1}


def interleaved(fn_a, fn_b, n: int, warmup: int = 2) -> tuple[dict, dict]:
    """Time two functions alternately, so drift (clock boost, cache state) hits both alike."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(n):
        for fn, ts in ((fn_a, ta), (fn_b, tb)):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
    return _stats(ta), _stats(tb)


def timeit(fn, n: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1000)
    return _stats(ts)


def _stats(ts: list[float]) -> dict:
    return {"p50": float(np.percentile(ts, 50)), "p95": float(np.percentile(ts, 95)), "n": len(ts)}


def sample_files(k: int = 8) -> list[Path]:
    files = sorted((DATA / "val" / "NORMAL").iterdir())[: k // 2] + sorted((DATA / "val" / "PNEUMONIA").iterdir())[: k // 2]
    if not files:
        raise SystemExit(f"no images under {DATA}/val (set CXR_DATA_DIR)")
    return files


def large_original(files) -> bytes:
    """A stand-in for a real upload: the shared copies are 224 px, users send ~2000 px originals."""
    import io

    from PIL import Image

    im = Image.open(files[0]).convert("L").resize((2000, 1800), Image.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------
# model-level figures
# ------------------------------------------------------------------------------------------------


def bench_model(model_dir: Path, n: int) -> dict:
    files = sample_files()
    blobs = [f.read_bytes() for f in files]
    out: dict = {}
    t = time.perf_counter()
    clf = model.load_model(model_dir)
    out["model_load_s"] = time.perf_counter() - t
    i = iter(range(10**9))
    pick = lambda: blobs[next(i) % len(blobs)]  # noqa: E731

    out["predict_ms"] = timeit(lambda: clf.predict_proba(pick()), n)
    big = large_original(files)
    out["predict_2000px_jpeg_ms"] = timeit(lambda: clf.predict_proba(big), max(5, n // 4))
    out["predict_cam_ms"] = {m: timeit(lambda m=m: clf.analyze(pick(), method=m), max(5, n // 2)) for m in model.CAM_METHODS}
    # the Diagnose page's re-export check, on request: the film and 11 re-exports of its display copy, one batched pass
    small, large = model.decode_image(blobs[0]), model.decode_image(big)
    out["export_stability_ms"] = {"224px": timeit(lambda: model.export_stability(clf, small), max(5, n // 4)),
                                  "2000px": timeit(lambda: model.export_stability(clf, large), max(5, n // 4))}
    meta = clf.meta
    x = torch.stack([clf.to_tensor(model.decode_image(b)) for b in blobs])
    out["batch_img_s"] = {}
    for bs in (1, 8, 32):
        batch = x.repeat((bs + len(x) - 1) // len(x), 1, 1, 1)[:bs]
        r = timeit(lambda: clf.predict_tensor(batch, batch_size=bs), max(3, 24 // bs + 2))
        out["batch_img_s"][bs] = bs / (r["p50"] / 1000)
    naive_predict, naive_cam = naive_functions(model_dir, meta, blobs)
    ours_p, naive_p = interleaved(lambda: clf.predict_proba(pick()), naive_predict, n)
    ours_c, naive_c = interleaved(lambda: clf.analyze(pick(), method="gradcam"), naive_cam, max(5, n // 2))
    out["naive"] = {"predict_ms": naive_p, "predict_gradcam_ms": naive_c, "ours_predict_ms": ours_p, "ours_gradcam_ms": ours_c}
    out["fold"] = bench_fold(model_dir, blobs, x, n)
    out["precision"] = bench_precision(model_dir, blobs, x, n)
    out["input_steps"] = bench_input_steps(model_dir, blobs, x, n)
    return out


def versus(clfs: dict, blobs: list[bytes], x: torch.Tensor, n: int) -> dict:
    """Two classifiers (name -> Classifier), interleaved: one-file predict, batch 32, and how far their scores differ."""
    (a_name, a), (b_name, b) = clfs.items()
    i = iter(range(10**9))
    pick = lambda: blobs[next(i) % len(blobs)]  # noqa: E731
    a1, b1 = interleaved(lambda: a.predict_proba(pick()), lambda: b.predict_proba(pick()), n)
    batch = x.repeat((32 + len(x) - 1) // len(x), 1, 1, 1)[:32]
    a32, b32 = interleaved(lambda: a.predict_tensor(batch), lambda: b.predict_tensor(batch), max(3, n // 4))
    diff = float(np.abs(a.predict_tensor(batch) - b.predict_tensor(batch)).max())
    return {"predict_ms": {a_name: a1, b_name: b1}, "batch32_ms": {a_name: a32, b_name: b32}, "max_abs_dp": diff}


def bench_precision(model_dir: Path, blobs: list[bytes], x: torch.Tensor, n: int) -> dict | None:
    """bf16 (served where the CPU runs it natively) vs fp32, interleaved; None where bf16 is not native."""
    from model.classifier import _fast_bf16

    if not _fast_bf16(torch.device("cpu")):
        return None
    return versus({"bf16": model.load_model(model_dir, bf16=True), "fp32": model.load_model(model_dir, bf16=False)}, blobs, x, n)


def bench_input_steps(model_dir: Path, blobs: list[bytes], x: torch.Tensor, n: int) -> dict | None:
    """The served model with and without its canonicalising input steps (smoothed equalisation mapping, band
    limit), interleaved: what they add to a predict. None where the model has neither."""
    import dataclasses

    served, plain = model.load_model(model_dir), model.load_model(model_dir)
    if not (served.meta.equalize_sigma or served.meta.band_limit):
        return None
    plain.meta = dataclasses.replace(plain.meta, equalize_sigma=0.0, band_limit=None)
    return versus({"served": served, "plain": plain}, blobs, x, n)


def bench_fold(model_dir: Path, blobs: list[bytes], x: torch.Tensor, n: int) -> dict:
    """BatchNorm folded into the convolutions (what load_model serves) vs not, interleaved."""
    from model.artifact import load_artifact
    from model.classifier import Classifier
    from model.gate import Gate

    net, meta = load_artifact(model_dir)
    gate = Gate.load(model_dir, meta.gate) if meta.gate else None
    return versus({"folded": Classifier(net, meta, model_dir, gate=gate, fold_bn=True),
                   "plain": Classifier(net, meta, model_dir, gate=gate, fold_bn=False)}, blobs, x, n)


def naive_functions(model_dir: Path, meta, blobs):
    """The same architecture and input size done plainly: PIL + torchvision transforms per call, eager
    model under no_grad, and the CAM as a separate GradCAM object and pass (hooks set up per call)."""
    import io

    from PIL import Image
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from torchvision import transforms as T

    net, _ = model.load_artifact(model_dir)
    tf = T.Compose([T.Grayscale(1), T.Resize((meta.input_size, meta.input_size)), T.ToTensor(), T.Normalize([meta.mean], [meta.std])])
    i = iter(range(10**9))

    def predict():
        img = Image.open(io.BytesIO(blobs[next(i) % len(blobs)])).convert("RGB")
        with torch.no_grad():
            return torch.softmax(net(tf(img)[None]) / meta.temperature, 1)[0, 1].item()

    def predict_then_cam():
        blob = blobs[next(i) % len(blobs)]
        img = Image.open(io.BytesIO(blob)).convert("RGB")
        with torch.no_grad():
            p = torch.softmax(net(tf(img)[None]), 1)[0, 1].item()
        with GradCAM(model=net, target_layers=[model.cam_target_layer(net, meta.architecture)]) as cam:
            heat = cam(input_tensor=tf(Image.open(io.BytesIO(blob)).convert("RGB"))[None], targets=[ClassifierOutputTarget(1)])
        return p, heat

    return predict, predict_then_cam


def training_figures(model_dir: Path) -> dict:
    clf_meta = model.read_meta(model_dir)
    hist_path = model_dir / "history.json"
    if not hist_path.is_file():
        return {}
    hist = json.loads(hist_path.read_text())
    return {
        "epochs": len(hist),
        "seconds_per_epoch_mean": statistics.mean(h["seconds"] for h in hist),
        "train_img_s_median": statistics.median(h["train_img_per_s"] for h in hist),
        # from the epochs themselves: a re-finalised model (--epochs 0) carries its parent's history, not its time
        "train_wall_min": sum(h["seconds"] for h in hist) / 60,
        "train_images": clf_meta.training.get("train_images"),
    }


# ------------------------------------------------------------------------------------------------
# app-level figures
# ------------------------------------------------------------------------------------------------


def bench_server_side(model_dir: Path, runs: int = 5) -> dict:
    """Upload -> fully rendered Diagnose page (prediction + Grad-CAM + figures), measured in-process with AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ["CXR_MODEL_DIR"] = str(model_dir)
    files = sample_files()
    ts = []
    for k in range(runs + 1):
        at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300).run()
        f = files[k % len(files)]
        t = time.perf_counter()
        at.file_uploader(key="uploads").set_value((f"{k}_{f.name}", f.read_bytes(), "image/jpeg")).run()
        if k:  # first run warms caches (model load)
            ts.append(time.perf_counter() - t)
        assert not at.exception
    return {"p50_s": float(np.median(ts)), "max_s": float(max(ts)), "n": len(ts)}


def bench_files(tmp: Path, k: int = 6) -> dict[str, list[Path]]:
    """Distinct images per size (distinct bytes, so no cache is hit): the 224 px shared copies as they
    are, and 2000 x 1800 px JPEGs made from them (users upload originals of that size)."""
    import io

    from PIL import Image

    src = sample_files(max(k, 2))[:k]
    tmp.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Path]] = {"224px": [], "2000px": []}
    for i, f in enumerate(src):
        small = tmp / f"b224_{i}.jpeg"
        small.write_bytes(f.read_bytes())
        big = tmp / f"b2000_{i}.jpeg"
        buf = io.BytesIO()
        Image.open(f).convert("L").resize((2000, 1800), Image.BICUBIC).save(buf, format="JPEG", quality=92)
        big.write_bytes(buf.getvalue())
        out["224px"].append(small)
        out["2000px"].append(big)
    return out


def bench_browser(model_dir: Path, variants: list[tuple[str, Path, dict]], sessions: int = 3) -> dict:
    """Per variant (label, app root, extra env): cold start, then upload -> decision / heatmap visible.

    Cold start: from ``streamlit run`` to an upload's heatmap on screen, the file dropped as soon as the
    uploader is drawn (what an impatient user does). Then, alternating between the variants so drift
    hits all alike, ``sessions`` fresh browser sessions per size: the first upload of the session and
    a second one in the same session. Timings come from a poller inside the page (no fixed sleeps).
    """
    import tempfile

    from benchmarks.harness import WebsocketMeter, timed_upload, wait_idle

    files = bench_files(Path(tempfile.mkdtemp(prefix="cxr_bench_")))
    out: dict = {label: {"first_upload_s": {}, "next_upload_s": {}, "ws_bytes": {}} for label, _, _ in variants}
    servers = {}
    try:
        with chromium() as browser:
            pages = {}
            for label, root, env in variants:  # cold starts one at a time (each has the CPU to itself)
                server = servers[label] = StreamlitServer(model_dir, root=root, env=env)
                server.start()
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                meter = WebsocketMeter(page)
                page.goto(server.url)
                wait_first_paint(page)
                r = out[label]
                r["cold_start_to_first_page_s"] = time.perf_counter() - server.started_at
                t_upload = time.perf_counter() - server.started_at
                m = timed_upload(page, str(files["224px"][-1]))
                r["cold_start_to_decision_s"] = t_upload + m["decision_s"]
                r["cold_start_to_usable_s"] = t_upload + m["heatmap_s"]
                wait_app_ready(page)
                pages[label] = (page, meter)
            for size in ("224px", "2000px"):
                for k in range(sessions):
                    for label, _, _ in variants:
                        page, meter = pages[label]
                        page.reload()
                        wait_app_ready(page)
                        first, second = files[size][(2 * k) % len(files[size])], files[size][(2 * k + 1) % len(files[size])]
                        meter.bytes = 0
                        m1 = timed_upload(page, str(first))
                        wait_idle(page)
                        ws = meter.bytes
                        r = out[label]
                        try:  # FIXME: a second upload in the same session timed out once on a loaded machine (not diagnosed)
                            m2 = timed_upload(page, str(second))
                            wait_idle(page)
                            r["next_upload_s"].setdefault(size, []).append(m2)
                        except Exception as err:  # noqa: BLE001
                            r.setdefault("errors", []).append(f"{size} second upload: {type(err).__name__}")
                            r["next_upload_s"].setdefault(size, [])
                        r["first_upload_s"].setdefault(size, []).append(m1)
                        r["ws_bytes"].setdefault(size, []).append(ws)
        for label, server in servers.items():
            out[label]["peak_rss_mb"] = server.peak_rss_bytes() / 2**20
    finally:
        for server in servers.values():
            server.stop()
    for r in out.values():  # summaries: p50 over sessions (first and next uploads pooled for "all")
        r["p50"] = {}
        for size in r["first_upload_s"]:
            pooled = r["first_upload_s"][size] + r["next_upload_s"][size]
            r["p50"][size] = {
                "decision_s": float(np.median([m["decision_s"] for m in pooled])),
                "heatmap_s": float(np.median([m["heatmap_s"] for m in pooled])),
                "first_upload_heatmap_s": float(np.median([m["heatmap_s"] for m in r["first_upload_s"][size]])),
                "next_upload_heatmap_s": (float(np.median([m["heatmap_s"] for m in r["next_upload_s"][size]]))
                                          if r["next_upload_s"][size] else float("nan")),
                "ws_kb": float(np.median(r["ws_bytes"][size])) / 1024,
            }
    return out


def _versus(label: str, slow_ms: float, fast_ms: float, ratio_name: str) -> tuple[str, str, str]:
    """A row comparing two interleaved timings: 'slow vs fast ms' and their ratio."""
    return label, f"{slow_ms:.1f} vs {fast_ms:.1f} ms", f"ratio {ratio_name} {slow_ms / fast_ms:.2f}"


def render(results: dict) -> str:
    m, b = results.get("model", {}), results.get("browser", {})
    rows = [] if not m else [
        ("model load", f"{m['model_load_s']:.2f} s", ""),
        ("predict, one 224 px JPEG (p50 / p95)", f"{m['predict_ms']['p50']:.1f} / {m['predict_ms']['p95']:.1f} ms", "<= 40 ms"),
        ("predict, one 2000 px JPEG (p50)", f"{m['predict_2000px_jpeg_ms']['p50']:.1f} ms", ""),
    ]
    for meth, r in m.get("predict_cam_ms", {}).items():
        rows.append((f"predict + {model.CAM_LABELS[meth]} (p50 / p95)", f"{r['p50']:.1f} / {r['p95']:.1f} ms",
                     "<= 150 ms" if meth == "gradcam" else ""))
    for size, r in m.get("export_stability_ms", {}).items():
        rows.append((f"re-export check (the film + {len(model.EXPORTS)} re-exports), one {size.replace('px', ' px')} film (p50)", f"{r['p50']:.0f} ms", ""))
    for bs, v in m.get("batch_img_s", {}).items():
        rows.append((f"batch throughput, batch {bs}", f"{v:.0f} img/s", ">= 60 img/s" if int(bs) == 32 else ""))
    nv, fo, pr, st = m.get("naive"), m.get("fold"), m.get("precision"), m.get("input_steps")
    if nv:
        rows += [_versus(f"naive eager reference vs ours, interleaved: {what} (p50)", nv[a]["p50"], nv[b]["p50"], "naive/ours")
                 for what, a, b in (("predict", "predict_ms", "ours_predict_ms"),
                                    ("predict + Grad-CAM", "predict_gradcam_ms", "ours_gradcam_ms"))]
    for pair, what, (fast, slow) in ((fo, "BatchNorm folded (served) vs not", ("folded", "plain")),
                                     (pr, "bf16 (served on this CPU) vs fp32", ("bf16", "fp32")),
                                     (st, "input steps (smoothed equalisation, band limit: served) vs without", ("plain", "served"))):
        if not pair:
            continue
        rows.append(_versus(f"{what}, interleaved: predict (p50), {slow} vs {fast}", pair["predict_ms"][slow]["p50"],
                            pair["predict_ms"][fast]["p50"], f"{slow}/{fast}"))
        s32, f32 = pair["batch32_ms"][slow]["p50"], pair["batch32_ms"][fast]["p50"]
        rows.append((f"{what}, interleaved: batch 32 (p50)", f"{32000 / f32:.0f} vs {32000 / s32:.0f} img/s",
                     f"ratio {s32 / f32:.2f}; max |dp| {pair['max_abs_dp']:.1e}"))
    if "server" in results and results["server"]:
        rows.append(("server-side upload -> rendered result (AppTest, p50)", f"{results['server']['p50_s']:.2f} s", "<= 1 s"))
    for label, r in b.items():
        tag = f" [{label}]" if len(b) > 1 else ""
        rows += [
            (f"cold start: `streamlit run` -> first page{tag}", f"{r['cold_start_to_first_page_s']:.1f} s", ""),
            (f"cold start: `streamlit run` -> decision + heatmap of an upload dropped at first paint{tag}",
             f"{r['cold_start_to_decision_s']:.1f} / {r['cold_start_to_usable_s']:.1f} s", "usable <= 6 s"),
        ]
        for size, q in r["p50"].items():
            rows += [
                (f"browser upload -> decision shown, {size} JPEG (p50){tag}", f"{q['decision_s']:.2f} s", ""),
                (f"browser upload -> heatmap visible, {size} JPEG (p50, first and later uploads pooled){tag}",
                 f"{q['heatmap_s']:.2f} s", ""),
                (f"browser later upload in a session -> heatmap, {size} (p50){tag}", f"{q.get('next_upload_heatmap_s', float('nan')):.2f} s",
                 "<= 0.5 s"),
                (f"browser first upload of a session -> heatmap, {size} (p50){tag}", f"{q['first_upload_heatmap_s']:.2f} s", "<= 1 s"),
                (f"websocket bytes received per upload, {size} (p50){tag}", f"{q['ws_kb']:.0f} KB", ""),
            ]
        rows.append((f"app peak RSS{tag}", f"{r['peak_rss_mb']:.0f} MB", "<= 1536 MB"))
    t = results.get("training", {})
    if t:
        note = "recorded by the model's own training run (history.json), on the machine it ran on; not measured now"
        rows += [("training throughput (median)", f"{t['train_img_s_median']:.1f} img/s", note),
                 ("training seconds per epoch (incl. validation)", f"{t['seconds_per_epoch_mean']:.0f} s", note),
                 ("training wall time (last stage)", f"{t['train_wall_min']:.1f} min ({t['epochs']} epochs)", note)]
    width = max(len(r[0]) for r in rows)
    lines = [f"| {'measure':<{width}} | value | target / note |", f"|{'-' * (width + 2)}|---|---|"]
    lines += [f"| {a:<{width}} | {v} | {n} |" for a, v, n in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(model.default_model_dir()))
    ap.add_argument("--n", type=int, default=20, help="repetitions for latency percentiles")
    ap.add_argument("--sessions", type=int, default=8, help="browser sessions per image size (2 uploads each)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--no-model", action="store_true", help="skip the model-level figures")
    ap.add_argument("--no-browser", action="store_true")
    ap.add_argument("--server", action="store_true", help="also time upload -> rendered page in-process (AppTest)")
    ap.add_argument("--against", default=None, metavar="APP_ROOT",
                    help="also run another checkout of the app (e.g. `git archive main | tar -x -C /tmp/before`), interleaved")
    ap.add_argument("--compare-threads", action="store_true",
                    help="also run this app with torch's default thread count (CXR_TORCH_THREADS=0), interleaved")
    args = ap.parse_args()
    model_dir = Path(args.model)
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available(),
                    "load_avg_at_start": os.getloadavg()},
        "model_dir": str(model_dir),
        "training": training_figures(model_dir),
    }
    if not args.no_model:
        results["model"] = bench_model(model_dir, args.n)
    if args.server:
        results["server"] = bench_server_side(model_dir)
    if not args.no_browser:
        variants = [("this app", ROOT, {})]
        if args.against:
            variants.append(("other app", Path(args.against), {}))
        if args.compare_threads:
            variants.append(("torch default threads", ROOT, {"CXR_TORCH_THREADS": "0"}))
        results["browser"] = bench_browser(model_dir, variants, args.sessions)
    print(render(results))
    print(json.dumps(results, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
