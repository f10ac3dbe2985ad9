"""The input gate: is this an image the model can read (a frontal chest film like its training films)?

Contract relied on outside the project: ``Classifier.check_input(image) -> InputCheck`` with
``.flagged`` (bool), ``.score`` (float, higher = less like the training films) and ``.reason``
(a sentence for the user, or None).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputCheck:
    flagged: bool
    score: float  # higher = less like the training films; the gate's threshold separates flagged from not
    reason: str | None = None  # a sentence for the user when flagged (or a caution when not), else None

    def to_dict(self) -> dict:
        return asdict(self)


UNCHECKED = InputCheck(flagged=False, score=0.0, reason=None)
