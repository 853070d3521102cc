"""apply_behaviors / remove_behaviors: per-behaviour feature steering, several behaviours sharing a layer.

Each behaviour steers its own features with its own alpha (a number, or {layer: alpha}); behaviours that share a
layer are one grouped sidecar there, each group following the runtime's rule on its own features, their deltas
adding (`runtime.FeatureGroups`). The control tokens act on every behaviour at once. `behaviors=[...]` enables a
subset in one argument; the others' rows are left out of the hooks altogether."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import nn

from sae_pipeline.behaviors.release import LayerGroups, concat_sidecars, read_release
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


def apply_behaviors(model: nn.Module, sae_paths_per_behavior: str | Path | dict,
                    alphas_per_behavior: dict[str, float | dict[int, float]] | None = None, steer_on: bool = True,
                    reverse_token: str = REVERSE_TOKEN, no_steer_token: str = NO_STEER_TOKEN,
                    behaviors: Sequence[str] | None = None, epsilon: float | None = None) -> SteeringPatch:
    """Attach per-behaviour steering. sae_paths_per_behavior: a release directory (`behaviors/release`, applied as
    evaluated, its alphas unless overridden) or {behaviour: {layer: sidecar file (dense or .sae8)}}.
    alphas_per_behavior: {behaviour: alpha or {layer: alpha}} overrides. behaviors: the subset to enable (default
    all). epsilon: the firing threshold (default the release's, else 0.02). steer_on=False attaches the hooks
    inert. remove_behaviors(model) detaches them."""
    if (reverse_token, no_steer_token) != (REVERSE_TOKEN, NO_STEER_TOKEN):
        raise SteeringError(f"control tokens are fixed: {REVERSE_TOKEN} and {NO_STEER_TOKEN}")
    if isinstance(sae_paths_per_behavior, dict):
        layers, release_epsilon = _from_paths(sae_paths_per_behavior), DEFAULT_EPSILON
    else:
        layers, config = read_release(Path(sae_paths_per_behavior))
        release_epsilon = float(config.get("epsilon", DEFAULT_EPSILON))
    epsilon = release_epsilon if epsilon is None else epsilon
    known = sorted({name for groups in layers.values() for name in groups.sizes})
    unknown = sorted((set(behaviors or []) | set(alphas_per_behavior or {})) - set(known))
    if unknown:
        raise SteeringError(f"unknown behaviours {unknown}; these sidecars steer {known}")
    per_layer = {name: {int(layer): float(a) for layer, a in override.items()}  # "11" and 11 alike
                 for name, override in (alphas_per_behavior or {}).items() if isinstance(override, dict)}
    stray = {name: sorted(set(overrides) - {layer for layer, g in layers.items() if name in g.sizes})
             for name, overrides in per_layer.items()}
    if any(stray.values()):
        raise SteeringError(f"alphas name layers where the behaviour is not hooked: "
                            f"{ {name: bad for name, bad in stray.items() if bad} }")
    steering = {}
    for layer, groups in sorted(layers.items()):
        groups = _subset(groups, behaviors if behaviors is not None else known)
        if groups is None:
            continue
        alphas = dict(groups.alphas)
        for name, override in (alphas_per_behavior or {}).items():
            if name in alphas:
                alphas[name] = per_layer[name].get(layer, alphas[name]) if name in per_layer else float(override)
        steering[layer] = LayerSteering(groups.sidecar, 1.0 if steer_on else 0.0, epsilon,
                                        groups=FeatureGroups.of(groups.sizes, alphas))
    if not steering:
        raise SteeringError(f"no layer steers any of the behaviours {list(behaviors or [])}")
    return apply_patch_layers(model, steering)


def remove_behaviors(model: nn.Module) -> None:
    """Detach every steering hook; the model computes exactly as before."""
    remove_patch(model)
