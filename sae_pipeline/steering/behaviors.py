"""apply_behaviors / remove_behaviors: per-behaviour feature steering, several behaviours sharing a layer.

Each behaviour steers its own features with its own alpha (a number, or {layer: alpha}); behaviours that share a
layer are one grouped sidecar there, each group following the runtime's rule on its own features, their deltas
adding (`runtime.FeatureGroups`). A release also carries the per-behaviour refusal mode: the harm gate decides, the
category router names the behaviour, and the refusal vector goes in at that behaviour's alpha times beta_per_alpha
(`behaviors.release.RefusalRouting`). The control tokens act on every behaviour at once. `behaviors=[...]` enables
a subset in one argument; the others' rows are left out of the hooks and their routed prompts go unsteered."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from sae_pipeline.behaviors.release import LayerGroups, Release, concat_sidecars, read_release
from sae_pipeline.steering.runtime import (
    DEFAULT_ALPHA, DEFAULT_EPSILON, NO_STEER_TOKEN, REVERSE_TOKEN, FeatureGroups, LayerSteering, SteeringError,
    SteeringPatch, apply_patch_layers, remove_patch)
from sae_pipeline.steering.sidecar import DenseSidecar, load_sidecar, sidecar_groups


def _from_paths(paths: dict[str, dict[int, str | Path]]) -> dict[int, LayerGroups]:
    by_layer: dict[int, dict[str, DenseSidecar]] = {}
    for behavior, layers in paths.items():
        for layer, path in layers.items():
            path = Path(path)
            if sidecar_groups(path) is not None:
                raise SteeringError(f"{path} is a grouped sidecar; give each behaviour its own, or the release")
            by_layer.setdefault(int(layer), {})[behavior] = load_sidecar(path)
    out = {}
    for layer, sidecars in by_layer.items():
        joined, sizes = concat_sidecars(sidecars)
        out[layer] = LayerGroups(joined, sizes, {b: DEFAULT_ALPHA for b in sizes})
    return out


def _subset(groups: LayerGroups, keep: Sequence[str]) -> LayerGroups | None:
    """The layer's groups restricted to `keep` (rows sliced out), None when none of them is hooked here."""
    starts, start = {}, 0
    for name, size in groups.sizes.items():
        starts[name], start = start, start + size
    names = [name for name in groups.sizes if name in keep]
    if not names:
        return None
    parts = {name: DenseSidecar(*(t[starts[name]:starts[name] + groups.sizes[name]] for t in groups.sidecar))
             for name in names}
    joined, sizes = concat_sidecars(parts)
    return LayerGroups(joined, sizes, {name: groups.alphas[name] for name in names})


def behavior_layers(release: Release, alphas_per_behavior: dict[str, float | dict[int, float]] | None = None,
                    behaviors: Sequence[str] | None = None, steer_on: bool = True, epsilon: float | None = None,
                    scale: float = 1.0) -> tuple[dict[int, LayerSteering], int]:
    """The hooks a release asks for (see apply_behaviors; scale multiplies every behaviour's alpha) and the gate's
    gate_skip, checked before anything is attached."""
    epsilon = float(release.config.get("epsilon", DEFAULT_EPSILON)) if epsilon is None else epsilon
    refusal = release.refusal
    hooked = {layer: set(groups.sizes) for layer, groups in release.groups.items()}
    if refusal is not None:
        hooked.setdefault(refusal.layer, set()).update(refusal.router.names)
    known = sorted(set().union(*hooked.values()))
    unknown = sorted((set(behaviors or []) | set(alphas_per_behavior or {})) - set(known))
    if unknown:
        raise SteeringError(f"unknown behaviours {unknown}; this release steers {known}")
    per_layer = {name: {int(layer): float(a) for layer, a in override.items()}  # "11" and 11 alike
                 for name, override in (alphas_per_behavior or {}).items() if isinstance(override, dict)}
    stray = {name: sorted(set(overrides) - {layer for layer, names in hooked.items() if name in names})
             for name, overrides in per_layer.items()}
    if any(stray.values()):
        raise SteeringError(f"alphas name layers where the behaviour is not hooked: "
                            f"{ {name: bad for name, bad in stray.items() if bad} }")
    enabled = set(behaviors if behaviors is not None else known)

    def alpha_of(name: str, layer: int, default: float) -> float:
        override = (alphas_per_behavior or {}).get(name)
        if isinstance(override, dict):
            return scale * per_layer[name].get(layer, default)
        return scale * (default if override is None else float(override))

    steering = {}
    for layer, groups in sorted(release.groups.items()):
        groups = _subset(groups, enabled)
        if groups is None:
            continue
        alphas = {name: alpha_of(name, layer, a) for name, a in groups.alphas.items()}
        steering[layer] = LayerSteering(groups.sidecar, 1.0 if steer_on else 0.0, epsilon,
                                        groups=FeatureGroups.of(groups.sizes, alphas))
    if refusal is not None and enabled & set(refusal.router.names):
        scale_C = torch.tensor([alpha_of(name, refusal.layer, release.alphas[name]) if name in enabled else 0.0
                                for name in refusal.router.names])
        base = steering.get(refusal.layer, LayerSteering(None, 0.0, epsilon))
        steering[refusal.layer] = replace(base, refusal_D=refusal.refusal_D,
                                          beta=refusal.beta_per_alpha if steer_on else 0.0, gate=refusal.gate,
                                          router=refusal.router, route_scale_C=scale_C)
    if not steering:
        raise SteeringError(f"no layer steers any of the behaviours {list(behaviors or [])}")
    return steering, refusal.gate_skip if refusal is not None else 1


def apply_behaviors(model: nn.Module, sae_paths_per_behavior: str | Path | dict,
                    alphas_per_behavior: dict[str, float | dict[int, float]] | None = None, steer_on: bool = True,
                    reverse_token: str = REVERSE_TOKEN, no_steer_token: str = NO_STEER_TOKEN,
                    behaviors: Sequence[str] | None = None, epsilon: float | None = None,
                    accept_failed_gates: bool = False, scale: float = 1.0) -> SteeringPatch:
    """Attach per-behaviour steering. sae_paths_per_behavior: a release directory (`behaviors/release`, applied as
    evaluated, its alphas unless overridden; one that failed its gates only with accept_failed_gates) or
    {behaviour: {layer: sidecar file (dense or .sae8)}} (the feature rule alone). alphas_per_behavior: {behaviour:
    alpha or {layer: alpha}} overrides. behaviors: the subset to enable (default all). epsilon: the firing threshold
    (default the release's, else 0.02). steer_on=False attaches the hooks inert. scale multiplies every alpha (a
    locale's multiplier: LocaleAlphas.scale(prompt)). remove_behaviors(model) detaches them."""
    if (reverse_token, no_steer_token) != (REVERSE_TOKEN, NO_STEER_TOKEN):
        raise SteeringError(f"control tokens are fixed: {REVERSE_TOKEN} and {NO_STEER_TOKEN}")
    if isinstance(sae_paths_per_behavior, dict):
        release = Release(_from_paths(sae_paths_per_behavior), None, {}, {})
    else:
        release = read_release(Path(sae_paths_per_behavior), accept_failed_gates)
    layers, gate_skip = behavior_layers(release, alphas_per_behavior, behaviors, steer_on, epsilon, scale)
    return apply_patch_layers(model, layers, gate_skip)


def remove_behaviors(model: nn.Module) -> None:
    """Detach every steering hook; the model computes exactly as before."""
    remove_patch(model)
