"""Logistic regression for the project's probes and judges: float64, full-batch L-BFGS from zeros, deterministic."""

from __future__ import annotations

import torch


def fit_logistic(x_ND: torch.Tensor, y_N: torch.Tensor, l2: float, balanced: bool = True, max_iter: int = 500,
                 sample_weight_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_D, bias) minimising cross-entropy + l2 * |w|^2; balanced weights the positives by n_neg / n_pos so
    both classes count alike; sample_weight_N (mean 1 within each class keeps that balance) weights single rows."""
    x_ND, y_N = x_ND.double(), y_N.double()
    weight_D = torch.zeros(x_ND.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    pos_weight = (len(y_N) - y_N.sum()) / y_N.sum().clamp(min=1) if balanced else None
    optimizer = torch.optim.LBFGS([weight_D, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x_ND @ weight_D + bias, y_N,
                                                                    weight=sample_weight_N, pos_weight=pos_weight) \
            + l2 * weight_D.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight_D.detach(), bias.detach()
