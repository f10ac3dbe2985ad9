"""The one place that turns a probability (and the input check) into a decision, with its defaults.

The app, the API and the batch CLI all import these, so one file gets the same answer everywhere.
"""

from __future__ import annotations

DEFAULT_BAND = 0.05  # with a high screening threshold (~0.9) a wider default band would swallow confident calls
NOT_ASSESSED = "NOT_ASSESSED"
DECISIONS = ("PNEUMONIA", "NORMAL", "UNCERTAIN", NOT_ASSESSED)


def decide(probability: float, threshold: float, band: float = 0.0, flagged: bool = False) -> str:
    """PNEUMONIA at or above the threshold, NORMAL below it, UNCERTAIN within +/- band of it;
    NOT_ASSESSED when the input check flagged the image (the model was not made for it)."""
    if flagged:
        return NOT_ASSESSED
    if band > 0 and abs(probability - threshold) < band:
        return "UNCERTAIN"
    return "PNEUMONIA" if probability >= threshold else "NORMAL"
