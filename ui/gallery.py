"""Error-analysis gallery for the Model report page: the films the model gets wrong at the current threshold.

Report items carry ``file`` paths relative to the data root the report was scored on
(``training.evaluate --data-dir``); they are resolved against ``$CXR_DATA_DIR`` or the repository's
default ``../shared/data/chest_xray``, never outside it. The work is bounded: one page of at most
``PAGE_SIZE`` thumbnails (cached), and one heatmap, computed when a thumbnail is clicked.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
DATA_ENV = "CXR_DATA_DIR"
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "chest_xray"
PAGE_SIZE = 24
COLUMNS = 6
THUMB_SIDE = 128
IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom"}
KINDS = {"fn": "False negatives", "fp": "False positives"}
HOW_TO_GET_DATA = (
    "The films behind this report are not on this machine, looked for in `{root}`. To browse the model's errors, "
    "get the data the report was scored on (for the shipped model: the Kermany et al. pediatric chest X-ray set, "
    "Kaggle \"Chest X-Ray Images (Pneumonia)\", unpacked so that `train/NORMAL` and `train/PNEUMONIA` sit under one "
    "folder), then set `CXR_DATA_DIR` to that folder and restart the app."
)


def data_root() -> Path:
    return Path(os.environ.get(DATA_ENV) or DEFAULT_DATA_DIR)


def resolve(root: Path, file: str) -> Path | None:
    """The report item's file under ``root``, or None when it is missing, not an image, or outside ``root``."""
    try:
        base = root.resolve()
        path = (base / str(file)).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(base) or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
        return None
    return path


@dataclass(frozen=True)
class Film:
    file: str  # as written in the report (relative to the data root)
    y: int  # 1 = pneumonia
    score: float  # calibrated P(pneumonia)

    @property
    def confidence(self) -> float:
        """How sure the model was of its (wrong) answer: distance from the 0.5 fence in its own direction."""
        return self.score if self.y == 0 else 1.0 - self.score


def errors(report, threshold: float) -> dict[str, list[Film]]:
    """False negatives and false positives at ``threshold``, most confidently wrong first."""
    y, s = report.y, report.scores
    fn = np.flatnonzero((y == 1) & (s < threshold))
    fp = np.flatnonzero((y == 0) & (s >= threshold))
    out = {}
    for kind, idx, order in (("fn", fn, s[fn]), ("fp", fp, -s[fp])):
        idx = idx[np.argsort(order, kind="stable")]
        out[kind] = [Film(str(report.files[i]), int(y[i]), float(s[i])) for i in idx]
    return out


def uncertain_counts(report, threshold: float, band: float) -> dict[str, int]:
    """Films within +/- band of the threshold (reported UNCERTAIN, as ``model.decision.decide`` does)."""
    if band <= 0:
        return {"total": 0, "pneumonia": 0, "normal": 0}
    inside = np.abs(report.scores - threshold) < band
    return {"total": int(inside.sum()), "pneumonia": int((inside & (report.y == 1)).sum()),
            "normal": int((inside & (report.y == 0)).sum())}


def uncertain_sentence(report, threshold: float, band: float) -> str:
    unc = uncertain_counts(report, threshold, band)
    if band <= 0:
        return "The uncertain band is off (0), so no film is reported UNCERTAIN."
    return (f"**{unc['total']}** films ({unc['pneumonia']} pneumonia, {unc['normal']} normal) fall in the uncertain band "
            f"{max(0.0, threshold - band):.3f}-{min(1.0, threshold + band):.3f} and would be reported UNCERTAIN.")


# ---- cached image work ----------------------------------------------------------------------------

@st.cache_data(max_entries=512, show_spinner=False)
def thumbnail(path: str, mtime: float, side: int = THUMB_SIDE) -> bytes:
    """A small JPEG of the film (``mtime`` in the key: a replaced file gets a new thumbnail)."""
    from PIL import Image

    from model.preprocessing import decode_image

    gray = decode_image(Path(path).read_bytes())
    im = Image.fromarray(gray)
    im.thumbnail((side, side), Image.BILINEAR)
    buf = io.BytesIO()
    im.convert("L").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


@st.cache_data(max_entries=32, show_spinner="Computing the heatmap...")
def heatmap_views(_clf, model_sha: str, path: str, mtime: float, opacity: float = 0.4) -> tuple[np.ndarray, np.ndarray, float]:
    """(film, film with heatmap, probability) from one ``analyze`` call; cached per model and file."""
    import model

    result = _clf.analyze(path)
    return result.image, model.overlay(result.image, result.heatmap, opacity), float(result.probability)


# ---- the section ----------------------------------------------------------------------------------

SELECTED = "_gallery_selected"


def _select(file: str | None) -> None:
    st.session_state[SELECTED] = file


def _label(y: int) -> str:
    return "PNEUMONIA" if y else "NORMAL"


@st.fragment
def gallery_section(clf, report, threshold: float, band: float) -> None:
    """Thumbnails of one kind of error, a pager, and the clicked film beside its heatmap.

    A fragment: clicking a thumbnail reruns only this section, not every chart on the page.
    """
    root = data_root()
    wrong = errors(report, threshold)
    st.markdown(
        f"The model gets **{len(wrong['fn'])}** pneumonia films wrong (false negatives) and **{len(wrong['fp'])}** "
        f"normal films wrong (false positives) of the {report.n} in this report, at threshold **{threshold:.3f}**."
    )
    if not (root.is_dir()):
        st.info(HOW_TO_GET_DATA.format(root=root), icon=":material/folder_off:")
        return
    kind = st.segmented_control("Show", list(KINDS), default="fn", required=True, key="gallery_kind",
                                format_func=lambda k: f"{KINDS[k]} ({len(wrong[k])})")
    films = wrong[kind]
    if not films:
        st.success(f"No {KINDS[kind].lower()} at this threshold.", icon=":material/check_circle:")
        return
    found = [(f, p) for f in films if (p := resolve(root, f.file)) is not None]
    if not found:
        st.info(HOW_TO_GET_DATA.format(root=root) + " (The folder exists, but none of these files is in it.)",
                icon=":material/folder_off:")
        return
    if len(found) < len(films):
        st.caption(f"{len(films) - len(found)} of these {len(films)} files are not under the data folder and are left out.")
    pages = max(1, -(-len(found) // PAGE_SIZE))
    page = 1
    if pages > 1:
        page = st.segmented_control(
            f"Page ({PAGE_SIZE} per page, most confidently wrong first)", list(range(1, pages + 1)), default=1,
            required=True, key=f"gallery_page_{kind}",
            format_func=lambda i: f"{(i - 1) * PAGE_SIZE + 1}-{min(i * PAGE_SIZE, len(found))}") or 1
    else:
        st.caption("Most confidently wrong first.")
    shown = found[(page - 1) * PAGE_SIZE: page * PAGE_SIZE]

    selected = st.session_state.get(SELECTED)
    detail = st.container()
    cols = st.columns(COLUMNS)
    for i, (film, path) in enumerate(shown):
        with cols[i % COLUMNS]:
            try:
                st.image(thumbnail(str(path), path.stat().st_mtime), width="stretch")
            except Exception:  # noqa: BLE001 - an unreadable file must not take the page down
                st.caption("(unreadable)")
            st.button(f"P = {film.score:.3f}", key=f"thumb_{kind}_{(page - 1) * PAGE_SIZE + i}", on_click=_select,
                      args=(film.file,), type="primary" if film.file == selected else "secondary", width="stretch",
                      help="Show this film with its heatmap")
    by_file = {f.file: (f, p) for f, p in found}
    if selected in by_file:
        with detail:
            _detail(clf, *by_file[selected], threshold=threshold, band=band)


def _detail(clf, film: Film, path: Path, threshold: float, band: float) -> None:
    from model import CAM_LABELS, DEFAULT_CAM_METHOD
    from model.decision import decide

    with st.container(border=True):
        head, close = st.columns([6, 1])
        head.text(f"{film.file}\nactual {_label(film.y)} - P(pneumonia) = {film.score:.3f} in the report - "
                  f"called {decide(film.score, threshold, band)} at threshold {threshold:.3f}")
        close.button("Close", key="gallery_close", on_click=_select, args=(None,), icon=":material/close:")
        try:
            image, overlaid, _ = heatmap_views(clf, clf.meta.weights_sha256, str(path), path.stat().st_mtime)
        except Exception as err:  # noqa: BLE001
            st.error(f"This film could not be analysed ({type(err).__name__}).", icon=":material/error:")
            return
        c1, c2 = st.columns(2)
        side = 2 * max(image.shape[:2]) if max(image.shape[:2]) < 320 else "stretch"  # small films: 2x, not blown up
        c1.image(image, caption="Film", width=side)
        c2.image(overlaid, caption=f"Where the model looked ({CAM_LABELS[DEFAULT_CAM_METHOD]} for PNEUMONIA; red = more)", width=side)
