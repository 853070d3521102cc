"""The category router: per-behaviour policies for the conditional refusal mode.

The harm gate (`features.gate`) decides whether a prompt is refused; the router decides *whose* request it is, so
each behaviour's refusal can be switched and tuned alone. It is a one-vs-rest logistic classifier over the
behaviours, trained on the harmful tuning prompts only, reading the gate's own prompt summary (same layers), so the
runtime computes the summary once. With every behaviour on at one alpha the policy is the single-basis operating
point; turning a behaviour off leaves the prompts routed to it unsteered and cannot raise any other category's
refusal. L2 by deterministic k-fold cross-validation (accuracy); standardisation folded into the weights."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.features.gate import L2_GRID
from sae_pipeline.linear import fit_logistic
from sae_pipeline.steering.runtime import CategoryRouter
from sae_pipeline.tensorfiles import load_tensors, save_tensors


class RouterFit(NamedTuple):
    router: CategoryRouter
    l2: float
    cv_accuracy: float
    cv_confusion: dict[str, dict[str, int]]  # true behaviour -> routed behaviour -> prompts, out of fold
    cv_by_l2: dict[float, float]
    cv_routed_N: torch.Tensor  # at the chosen L2: each prompt's out-of-fold behaviour (an index into names)


def _fit_scores(z_ND: torch.Tensor, label_N: torch.Tensor, classes: int, l2: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    fits = [fit_logistic(z_ND, (label_N == c).double(), l2) for c in range(classes)]
    return torch.stack([w for w, _ in fits], 1), torch.stack([b for _, b in fits])


def fit_router(summaries_PD: torch.Tensor, behaviors_P: Sequence[str], names: Sequence[str], layers: Sequence[int],
               folds: int = 5) -> RouterFit:
    """summaries_PD: the gate's input for each harmful tuning prompt (`features.gate.concat_layers`);
    behaviors_P: each prompt's behaviour, one of `names` (each needs at least `folds` prompts)."""
    names = tuple(names)
    counts = {name: sum(b == name for b in behaviors_P) for name in names}
    stray = sorted(set(behaviors_P) - set(names))
    if stray or min(counts.values()) < folds or len(summaries_PD) != len(behaviors_P):
        raise ValueError(f"the router needs at least {folds} prompts per behaviour of {list(names)} and one summary "
                         f"per prompt; got counts {counts}, unknown behaviours {stray}, {len(summaries_PD)} "
                         f"summaries for {len(behaviors_P)} prompts")
    x_ND = summaries_PD.double()
    label_N = torch.tensor([names.index(b) for b in behaviors_P])
    mean_D, std_D = x_ND.mean(0), x_ND.std(0).clamp(min=1e-6)
    z_ND = (x_ND - mean_D) / std_D
    # interleave behaviours across folds (a stable order within each), so every fold sees each behaviour
    order_N = torch.argsort(label_N, stable=True)
    fold_N = torch.empty(len(label_N), dtype=torch.long)
    fold_N[order_N] = torch.arange(len(label_N)) % folds
    best, by_l2 = None, {}
    for l2 in L2_GRID:
        routed_N = torch.empty(len(label_N), dtype=torch.long)
        for fold in range(folds):
            held = fold_N == fold
            weight_DC, bias_C = _fit_scores(z_ND[~held], label_N[~held], len(names), l2)
            routed_N[held] = (z_ND[held] @ weight_DC + bias_C).argmax(-1)
        accuracy = (routed_N == label_N).double().mean().item()
        by_l2[l2] = round(accuracy, 6)
        if best is None or accuracy > best[0]:
            best = (accuracy, l2, routed_N)
    accuracy, l2, routed_N = best
    weight_DC, bias_C = _fit_scores(z_ND, label_N, len(names), l2)
    folded_DC = weight_DC / std_D[:, None]  # (x - mean)/std . w + b  ==  x . (w/std) + (b - mean . w/std)
    router = CategoryRouter(names, folded_DC.float(), (bias_C - mean_D @ folded_DC).float(), tuple(sorted(layers)))
    confusion = {true: {routed: int(((label_N == i) & (routed_N == j)).sum()) for j, routed in enumerate(names)}
                 for i, true in enumerate(names)}
    return RouterFit(router, l2, accuracy, confusion, by_l2, routed_N)


def route(router: CategoryRouter, summaries_PD: torch.Tensor) -> list[str]:
    """Each summary's behaviour, as the runtime routes it."""
    scores_PC = summaries_PD.float() @ router.weight_DC + router.bias_C
    return [router.names[i] for i in scores_PC.argmax(-1).tolist()]


def save_router(router: CategoryRouter, path: Path) -> str:
    return save_tensors(router.tensors(), path)


def load_router(path: Path, sha256: str, names: Sequence[str]) -> CategoryRouter:
    """Verified against its sha256 (fails closed); the names come from the config that pins it."""
    return CategoryRouter.from_tensors(load_tensors(path, sha256), tuple(names))
