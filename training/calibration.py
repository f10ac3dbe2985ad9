"""Temperature scaling (Guo et al., 2017): one scalar that makes softmax probabilities honest
without changing the ranking, so AUC and the ROC curve are untouched."""

from __future__ import annotations

import torch


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The T > 0 minimising the NLL of softmax(logits / T) on a held-out split."""
    logits = logits.detach().float().clone()  # may come from inference_mode
    labels = labels.detach().long().clone()
    log_t = torch.zeros(1, requires_grad=True)  # optimise log T so T stays positive
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.exp().item())
    return min(max(t, 0.05), 20.0)
