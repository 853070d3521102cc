"""Behaviour sidecars and the release directory that `apply_behaviors` reads.

Per behaviour and layer, a sidecar holds the behaviour's features kept by the cross-talk filter (best ranked first):
the SAE's encoder columns and thresholds detect them, and the steering directions are the cross-talk filter's (the
decoder column, deflated where flagged), so removing one behaviour's features never moves another's. Per layer, a
grouped sidecar concatenates the behaviours hooked there, its header listing the groups. `multi_behavior_config.json`
pins every file by sha256 (SAEs, rankings, sidecars, the cross-talk report) and holds the alphas per behaviour,
with per-layer overrides (`alphas`, empty as written). Sidecar paths are relative to the release directory, so the directory can
move; the provenance paths point into the artifacts that made it."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.features.causal import sidecar_from_sae
from sae_pipeline.hashing import file_sha256
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.sidecar import (DenseSidecar, SidecarError, load_dense, save_dense, sidecar_groups,
                                           write_sae8)

CONFIG_FILE = "multi_behavior_config.json"
CONFIG_VERSION = 1


class LayerGroups(NamedTuple):
    sidecar: DenseSidecar  # every behaviour's rows, in group order
    sizes: dict[str, int]  # behaviour -> its rows at this layer
    alphas: dict[str, float]  # behaviour -> its alpha at this layer


def behavior_sidecar(sae: TopKSAE, feature_ids: Sequence[int], directions_ND: torch.Tensor) -> DenseSidecar:
    """Removal of the given latents, steering along the cross-talk filter's unit directions (the SAE's decoder
    columns are unit norm too, so strengths compare across behaviours)."""
    base = sidecar_from_sae(sae, feature_ids, [-1] * len(feature_ids))
    return DenseSidecar(directions_ND.float().contiguous(), base.B_sel_ND, base.tau_N).validate()


def concat_sidecars(sidecars: dict[str, DenseSidecar]) -> tuple[DenseSidecar, dict[str, int]]:
    """One grouped sidecar from several (in the dict's order) and its group sizes."""
    parts = list(sidecars.values())
    joined = DenseSidecar(*(torch.cat([getattr(p, name) for p in parts]) for name in DenseSidecar._fields))
    return joined.validate(), {name: len(p.tau_N) for name, p in sidecars.items()}


def _pinned(path: Path, directory: Path, sha256: str | None = None) -> dict:
    return {"path": str(path.relative_to(directory)), "sha256": sha256 or file_sha256(path)}


def write_release(directory: Path, sidecars: dict[int, dict[str, DenseSidecar]], alphas: dict[str, float],
                  nnz_per_feature: int, provenance: dict) -> dict:
    """Dense and SAE8 sidecars per behaviour and layer, a grouped pair per layer, and the config pinning them.
    sidecars: layer -> behaviour -> sidecar; alphas: behaviour -> alpha (every layer)."""
    directory.mkdir(parents=True, exist_ok=True)
    layers, behaviors = {}, {}
    for layer, by_behavior in sorted(sidecars.items()):
        nnz = min(nnz_per_feature, next(iter(by_behavior.values())).A_sel_ND.shape[1])  # at most d_model
        for behavior, sidecar in by_behavior.items():
            dense, sae8 = directory / f"{behavior}_l{layer}.safetensors", directory / f"{behavior}_l{layer}.sae8"
            entry = behaviors.setdefault(behavior, {"alpha": alphas[behavior], "alphas": {}, "sidecars": {}})
            entry["sidecars"][str(layer)] = {
                "features": len(sidecar.tau_N), "dense": _pinned(dense, directory, save_dense(sidecar, dense)),
                "sae8": _pinned(sae8, directory, write_sae8(sidecar, sae8, nnz))}
        grouped, sizes = concat_sidecars(by_behavior)
        dense, sae8 = directory / f"grouped_l{layer}.safetensors", directory / f"grouped_l{layer}.sae8"
        # a list, not a dict: the rows' order must survive sort_keys
        layers[str(layer)] = {"groups": [[name, n] for name, n in sizes.items()],
                              "dense": _pinned(dense, directory, save_dense(grouped, dense, sizes)),
                              "sae8": _pinned(sae8, directory, write_sae8(grouped, sae8, nnz, sizes))}
    config = {**provenance, "version": CONFIG_VERSION, "layers": layers, "behaviors": behaviors}  # ours win
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def read_release(directory: Path) -> tuple[dict[int, LayerGroups], dict]:
    """layer -> LayerGroups from the grouped dense sidecars (sha256-verified), and the config. Fails closed with
    SidecarError naming what is wrong."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("version") != CONFIG_VERSION:
            raise SidecarError(f"{CONFIG_FILE} version {config.get('version')} (this reader knows {CONFIG_VERSION})")
        out = {}
        for layer, entry in config["layers"].items():
            sizes = {str(b): int(n) for b, n in entry["groups"]}
            path = directory / entry["dense"]["path"]
            sidecar = load_dense(path, entry["dense"]["sha256"])
            pinned = list((sidecar_groups(path) or {}).items())  # the sha256-pinned file says whose rows are whose
            if pinned != list(sizes.items()):
                raise SidecarError(f"layer {layer}: the config's groups {list(sizes.items())} differ from the "
                                   f"sidecar's {pinned}")
            alphas = {b: float(config["behaviors"][b]["alphas"].get(layer, config["behaviors"][b]["alpha"]))
                      for b in sizes}
            if not all(math.isfinite(a) for a in alphas.values()):
                raise SidecarError(f"layer {layer}: alphas must be finite, got {alphas}")
            out[int(layer)] = LayerGroups(sidecar, sizes, alphas)
        return out, config
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise SidecarError(f"cannot read the behaviour release in {directory}: {err}") from err
