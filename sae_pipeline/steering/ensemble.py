"""The multi-layer ensemble (issue #5): the single-basis candidate spread over the hooked layers by a schedule.

A schedule gives each hooked layer its own alpha. At a layer after the gate's layers the conditional refusal mode goes
in with that layer's own refusal direction (`features.refusal.refusal_direction`) at beta = alpha_L * refusal_beta,
decided by the candidate's gate (the same prompt summary, so every layer decides alike); at a layer with screened
features the feature rule runs at alpha_L. A layer with neither is inert whatever its alpha, and the grid and the
ablation skip it.

Search (issue #5): the named schedules (at least "mid-heavy" and "late-focused"), the better one by the operating
point's rule (`sweep.choose_least_intervention`: every per-strength steering gate, then the harmful-completion gate,
then most gates passed, then the largest reduction, then the least summed alpha), a +-step grid on each active layer
of it, the best of all of those chosen; then the ablation: the chosen schedule with one active layer switched off at
a time, whose deltas against the chosen schedule are each layer's marginal contribution."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from sae_pipeline.hashing import config_hash
from sae_pipeline.steering.runtime import LayerSteering, patched
from sae_pipeline.steering.sweep import Candidate


class Schedule(NamedTuple):
    name: str
    alphas: dict[int, float]  # hooked layer -> alpha

    def total(self) -> float:
        return sum(self.alphas.values())


@dataclass(frozen=True)
class Ensemble:
    """The harness's Steering: `base`'s gate and screened features, a refusal direction per refusal layer, and a
    schedule; the harness's alpha multiplies the schedule (1.0: as scheduled)."""

    base: Candidate
    refusals: dict[int, torch.Tensor]  # refusal layer -> its direction
    refusal_hashes: dict[int, str]
    schedule: Schedule
    name: str = "multi-layer ensemble"

    def __post_init__(self):
        early = [layer for layer in self.refusals if layer <= max(self.base.gate.layers)]
        if early or set(self.refusals) != set(self.refusal_hashes):
            raise ValueError(f"refusal layers must follow the gate's layers {self.base.gate.layers} and each have a "
                             f"hash; got {sorted(self.refusals)} with hashes for {sorted(self.refusal_hashes)}")

    @property
    def sha256(self) -> str:
        return config_hash({"base": self.base.sha256, "refusals": {str(k): v for k, v in self.refusal_hashes.items()},
                            "schedule": {str(k): v for k, v in sorted(self.schedule.alphas.items())}})

    def steerable_layers(self) -> list[int]:
        """Layers where an alpha changes anything: a refusal direction or screened features."""
        return sorted(set(self.refusals) | set(self.base.features))

    def active_layers(self) -> list[int]:
        """The schedule's steerable layers."""
        return [layer for layer in self.steerable_layers() if layer in self.schedule.alphas]

    def layers_at(self, alpha: float) -> dict[int, LayerSteering]:
        out = {}
        for layer in self.active_layers():
            strength = alpha * self.schedule.alphas[layer]
            if strength == 0.0:
                continue
            sidecar, refusal_D = self.base.features.get(layer), self.refusals.get(layer)
            out[layer] = LayerSteering(
                sidecar, strength if sidecar is not None else 0.0, self.base.epsilon, refusal_D=refusal_D,
                beta=strength * self.base.refusal_beta if refusal_D is not None else 0.0,
                gate=self.base.gate if refusal_D is not None else None)
        return out

    @contextmanager
    def applied(self, model: nn.Module, alpha: float, reverse: bool) -> Iterator[None]:
        with patched(model, self.layers_at(alpha), self.base.gate_skip) as patch, patch.reverse_if(reverse):
            yield


def grid_around(schedule: Schedule, layers: Sequence[int], step: float) -> list[Schedule]:
    """The schedule with each of `layers` moved by +step and by -step (not below 0), one at a time."""
    out = []
    for layer in layers:
        for sign, label in ((1, "+"), (-1, "-")):
            moved = round(max(schedule.alphas[layer] + sign * step, 0.0), 6)
            if moved != schedule.alphas[layer]:
                out.append(Schedule(f"{schedule.name} L{layer}{label}{step:g}", {**schedule.alphas, layer: moved}))
    return out


def ablations(schedule: Schedule, layers: Sequence[int]) -> list[Schedule]:
    """The schedule with each of `layers` (those it steers) switched off, one at a time."""
    return [Schedule(f"{schedule.name} without L{layer}", {**schedule.alphas, layer: 0.0})
            for layer in layers if schedule.alphas[layer] != 0.0]


def schedule_key(schedule: Schedule) -> str:
    """A partition-safe, readable key for a schedule's alphas."""
    return "_".join(f"L{layer}x{alpha:.2f}" for layer, alpha in sorted(schedule.alphas.items()))
