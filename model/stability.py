"""How far one film's score moves when the film is re-exported (``model.exports``): the robustness benchmark's
question, asked of a single film. The benchmark reports the model over a validation split; a user reading one
ambiguous film needs to know whether *this* score is one a softer device or a sharpening filter would change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .classifier import Classifier
from .decision import decide
from .exports import EXPORTS
from .preprocessing import MAX_PIXELS
from .results import DISPLAY_SIDE, fit_within

STABLE_CHANGE = 0.10  # the robustness target: no re-export should move P(pneumonia) by more than this


@dataclass(frozen=True)
class ExportStability:
    probability: float  # P(pneumonia) of the image as given
    scores: dict[str, float]  # P(pneumonia) of each re-export, by name (model.exports)
    skipped: dict[str, str] = field(default_factory=dict)  # re-exports not made of this image, and why

    @property
    def changes(self) -> dict[str, float]:
        return {k: p - self.probability for k, p in self.scores.items()}

    @property
    def max_change(self) -> float:
        return max((abs(d) for d in self.changes.values()), default=0.0)

    def decisions(self, threshold: float, band: float = 0.0) -> dict[str, str]:
        return {k: decide(p, threshold, band) for k, p in self.scores.items()}

    def changed_decisions(self, threshold: float, band: float = 0.0) -> list[str]:
        """Re-exports whose decision differs from the image's own at this threshold and band."""
        own = decide(self.probability, threshold, band)
        return [k for k, d in self.decisions(threshold, band).items() if d != own]

    def stable(self, threshold: float, band: float = 0.0) -> bool:
        return self.max_change <= STABLE_CHANGE and not self.changed_decisions(threshold, band)


def export_stability(clf: Classifier, image: np.ndarray, exports: dict | None = None, max_side: int | None = DISPLAY_SIDE,
                     batch_size: int = 12) -> ExportStability:
    """Score ``image`` (uint8 grayscale, H x W) and each of its re-exports in one batched pass.

    The re-exports are made of a copy fitted within ``max_side`` (the app's display copy; None: the image as given):
    the model reads 192 px, and a dozen full-size copies of a 40-megapixel film would cost seconds and gigabytes."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if max_side:
        image = fit_within(image, max_side)
    made, skipped = {}, {}
    for name, export in (exports or EXPORTS).items():
        out = export(image)
        if out.size > MAX_PIXELS:  # a "4x larger original" of a large image: more than any upload may have
            skipped[name] = f"would exceed {MAX_PIXELS / 1e6:.0f} megapixels"
            continue
        made[name] = out
    p = clf.predict_proba([image, *made.values()], batch_size=batch_size)
    return ExportStability(float(p[0]), {k: float(v) for k, v in zip(made, p[1:])}, skipped)
