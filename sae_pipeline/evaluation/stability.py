"""Feature stability: do steering's selected SAE features keep their sign on clean domain questions?

For each (question, feature) the mean pre-activation over the question's tokens is read with and without steering;
a sign flip means steering changed what the feature says about plainly harmless domain knowledge."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import NamedTuple

import torch
from transformers import PreTrainedModel

from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.sae.model import TopKSAE


class FeatureReadout(NamedTuple):
    layer: int
    sae: TopKSAE
    feature_ids: list[int]
    name: str = "features"  # whose features (a behaviour): flips are counted per name and layer


@torch.no_grad()
def mean_pre_acts(model: PreTrainedModel, prompts: Sequence[list[int]], readouts: Sequence[FeatureReadout]
                   ) -> torch.Tensor:
    """(prompts, total selected features) mean pre-activation over each prompt's tokens (position 0 skipped:
    the attention sink)."""
    device = next(model.parameters()).device
    rows = []
    for ids in prompts:
        captured = layer_outputs(model, torch.tensor([ids], device=device), sorted({r.layer for r in readouts}))
        row = []
        for readout in readouts:
            acts_SD = captured[readout.layer][0, 1:].float().cpu()
            pre_SF = readout.sae.encode(acts_SD).pre_acts
            row.append(pre_SF[:, readout.feature_ids].mean(0))
        rows.append(torch.cat(row))
    return torch.stack(rows)


def sign_flips(model: PreTrainedModel, prompts: Sequence[list[int]], readouts: Sequence[FeatureReadout],
               steered: Callable[[], AbstractContextManager] = nullcontext) -> list[bool]:
    """One flag per (prompt, feature): True where steering flips the sign of the feature's mean pre-activation."""
    before_PF = mean_pre_acts(model, prompts, readouts)
    with steered():
        after_PF = mean_pre_acts(model, prompts, readouts)
    return (torch.sign(before_PF) != torch.sign(after_PF)).flatten().tolist()


def flips_by_readout(flags: Sequence[bool], readouts: Sequence[FeatureReadout]) -> dict[str, int]:
    """`sign_flips`'s flags counted per readout, keyed "name|layer" (flags run prompt-major, features in readout
    order)."""
    sizes = [len(r.feature_ids) for r in readouts]
    width = sum(sizes)
    if width == 0 or len(flags) % width:
        raise ValueError(f"{len(flags)} flags do not tile {width} features per prompt")
    rows = torch.tensor(list(flags), dtype=torch.bool).view(-1, width)
    counts, start = {}, 0
    for readout, size in zip(readouts, sizes):
        key = f"{readout.name}|{readout.layer}"
        counts[key] = counts.get(key, 0) + int(rows[:, start:start + size].sum())
        start += size
    return counts
