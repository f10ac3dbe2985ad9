"""Post-hoc calibration on a held-out split: temperature plus bias (Platt scaling on the logit margin).

The temperature corrects over- or under-confidence; the bias corrects the shift that a class-weighted
loss introduces (it trains as if both classes were equally common). Neither changes the ranking, so AUC
and the ROC curve are untouched; only the probabilities become honest.
"""

from __future__ import annotations

import torch

from model.classifier import calibrated_probs


def fit_calibration(logits: torch.Tensor, labels: torch.Tensor, positive_index: int = 1, max_iter: int = 200) -> tuple[float, float]:
    """(temperature, bias) minimising the log-loss of sigmoid(margin / T + b) on a held-out split."""
    logits = logits.detach().float().clone()  # may come from inference_mode
    y = (labels.detach() == positive_index).float().clone()
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    bias = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        p = calibrated_probs(logits, log_t.exp(), bias, positive_index, as_numpy=False)
        loss = torch.nn.functional.binary_cross_entropy(p.clamp(1e-7, 1 - 1e-7), y)
        loss.backward()
        return loss

    opt.step(closure)
    return min(max(float(log_t.detach().exp()), 0.05), 20.0), float(bias.detach())
