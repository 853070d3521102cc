"""Which layers each behaviour steers at: a logistic probe per (behaviour, layer) on pooled MLP outputs (the SAEs'
input) of that behaviour's harmful tuning prompts against the benign tuning prompts, fit on one half of the prompts
and scored by AUROC on the other; each behaviour keeps its best layers (at most `max_layers`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.features.scoring import probe_auroc, user_token_outputs


class BehaviorLayers(NamedTuple):
    layers: dict[str, list[int]]  # behaviour -> chosen layers, best first
    auroc: dict[str, dict[int, float]]  # behaviour -> layer -> held-out-half probe AUROC


@torch.no_grad()
def pooled_mlp_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int],
                       prompts: Sequence[str], batch_size: int = 16) -> dict[int, torch.Tensor]:
    """layer -> (P, D) float64: the MLP output averaged over each prompt's own tokens (as the feature scores pool)."""
    rows: dict[int, list] = {layer: [None] * len(prompts) for layer in layers}
    for i, captured in user_token_outputs(model, tokenizer, prompts, layers, batch_size, "pooled MLP outputs"):
        for layer in layers:
            rows[layer][i] = captured[layer].double().mean(0).cpu()
    return {layer: torch.stack(r) for layer, r in rows.items()}


def choose_behavior_layers(harmful: dict[int, torch.Tensor], behavior_P: Sequence[str],
                           benign: dict[int, torch.Tensor], max_layers: int,
                           eligible: Sequence[int] | None = None) -> BehaviorLayers:
    """harmful/benign: layer -> (P, D) pooled activations; behavior_P: each harmful prompt's behaviour. Every layer
    is scored; only `eligible` ones (default: all; e.g. those whose SAE passes its gates) may be chosen."""
    behaviors = sorted(set(behavior_P))
    labels = list(behavior_P)
    auroc: dict[str, dict[int, float]] = {}
    for behavior in behaviors:
        mine_P = torch.tensor([label == behavior for label in labels])
        auroc[behavior] = {}
        for layer in sorted(harmful):
            x_PD = torch.cat([harmful[layer][mine_P], benign[layer]])
            y_P = torch.cat([torch.ones(int(mine_P.sum())), torch.zeros(len(benign[layer]))]).double()
            # alternate rows within each class, so both halves hold both classes
            half_P = torch.cat([torch.arange(int(mine_P.sum())) % 2 == 0, torch.arange(len(benign[layer])) % 2 == 0])
            auroc[behavior][layer] = round(probe_auroc(x_PD, y_P, half_P), 6)
    allowed = set(harmful if eligible is None else eligible)
    chosen = {behavior: sorted((layer for layer in auroc[behavior] if layer in allowed),
                               key=lambda layer: (-auroc[behavior][layer], layer))[:max_layers]
              for behavior in behaviors}
    return BehaviorLayers(chosen, auroc)
