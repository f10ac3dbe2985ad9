"""The one place that turns a probability (and the input check) into a decision, with its defaults,
and that says what a probability means for another population.

The app, the API and the batch CLI all import these, so one file gets the same answer everywhere.
"""

from __future__ import annotations

DISCLAIMER = "Research/education tool, not a medical device."  # with every answer the API, CLI and downloads give
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


def at_prevalence(probability: float, calibrated_at: float, prevalence: float) -> float:
    """The same film's P(positive) in a population where the positive class is as common as ``prevalence``.

    Why: a calibrated probability is honest for the class mix it was calibrated on (the validation split's);
    the class-conditional evidence is the same elsewhere, so Bayes' rule moves only the prior odds.
    """
    if not (0 < calibrated_at < 1 and 0 < prevalence < 1 and 0 <= probability <= 1):
        raise ValueError("probability and prevalences must be proportions (prevalences strictly between 0 and 1)")
    if probability in (0, 1):
        return float(probability)
    odds = probability / (1 - probability) * (prevalence / (1 - prevalence)) / (calibrated_at / (1 - calibrated_at))
    return odds / (1 + odds)
