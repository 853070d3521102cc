"""The behaviour screen's clean-sign test (issue #5: zero sign flips on clean domain questions, per behaviour per
layer). Each feature the causal screen kept is steered alone, by the release's own feature rule at the behaviour's
alpha, over benign tuning prompts; a feature that flips the sign of any latent in its behaviour's dictionary there
is dropped before the release. The evaluation's clean domain questions stay out of this choice, so its sign-flip
gate measures, not selects."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel

from sae_pipeline.behaviors.release import behavior_sidecar
from sae_pipeline.evaluation.stability import FeatureReadout, mean_pre_acts
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.runtime import LayerSteering, patched


def steered_sign_flips(model: PreTrainedModel, prompts: Sequence[list[int]], sae: TopKSAE, layer: int,
                       dictionary: Sequence[int], features: Sequence[int], directions_ND: torch.Tensor,
                       signs: Sequence[int], alpha: float, epsilon: float) -> dict[int, int]:
    """feature -> how many (prompt, dictionary latent) mean pre-activations change sign when that feature alone is
    steered (directions_ND and signs as `behavior_sidecar`, one row per feature)."""
    readouts = [FeatureReadout(layer, sae, list(dictionary))]
    before_PF = mean_pre_acts(model, prompts, readouts)
    flips = {}
    for row, feature in enumerate(features):
        sidecar = behavior_sidecar(sae, [feature], directions_ND[row:row + 1], [signs[row]])
        with patched(model, {layer: LayerSteering(sidecar, alpha, epsilon)}):
            after_PF = mean_pre_acts(model, prompts, readouts)
        flips[feature] = int((torch.sign(before_PF) != torch.sign(after_PF)).sum())
    return flips
