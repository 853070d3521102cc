"""Behaviour sidecars and the release directory that `apply_behaviors` reads.

Per behaviour and layer, a sidecar holds the behaviour's features kept by the cross-talk filter (best ranked first):
the SAE's encoder columns and thresholds detect them, and the steering directions are the cross-talk filter's (the
decoder column, deflated where flagged), so removing one behaviour's features never moves another's. Per layer, a
grouped sidecar concatenates the behaviours hooked there, its header listing the groups. `multi_behavior_config.json`
pins every file by sha256 (SAEs, rankings, sidecars, the cross-talk report) and holds the alphas per behaviour,
with per-layer overrides (`alphas`, empty as written). The per-behaviour refusal mode (`RefusalRouting`: harm gate,
category router, refusal vector) is pinned beside them; a behaviour's alpha drives both its feature rule and its
refusal strength (alpha * beta_per_alpha), as one alpha drives the single-basis operating point. The gates the
release was written under are recorded; a release that failed one is refused unless accepted explicitly (audits,
its own evaluation). Paths are relative to the release directory, so the directory can move; the provenance paths
point into the artifacts that made it."""

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
from sae_pipeline.behaviors.router import load_router, save_router
from sae_pipeline.steering.runtime import CategoryRouter, ProbeGate
from sae_pipeline.steering.sidecar import (DenseSidecar, SidecarError, load_dense, save_dense, sidecar_groups,
                                           write_sae8)
from sae_pipeline.tensorfiles import TensorFileError, load_tensors, save_tensors

CONFIG_FILE = "multi_behavior_config.json"
CONFIG_VERSION = 3  # 2: the per-behaviour refusal mode and the recorded gates; 3: the dictionaries


class LayerGroups(NamedTuple):
    sidecar: DenseSidecar  # every behaviour's rows, in group order
    sizes: dict[str, int]  # behaviour -> its rows at this layer
    alphas: dict[str, float]  # behaviour -> its alpha at this layer


class RefusalRouting(NamedTuple):
    """The per-behaviour conditional refusal mode at `layer`: the harm gate decides, the router names the behaviour,
    and the refusal vector goes in at beta_per_alpha times that behaviour's alpha."""

    layer: int
    refusal_D: torch.Tensor
    gate: ProbeGate
    router: CategoryRouter
    beta_per_alpha: float
    gate_skip: int


class Release(NamedTuple):
    groups: dict[int, LayerGroups]  # feature layers
    refusal: RefusalRouting | None
    alphas: dict[str, float]  # behaviour -> its alpha at the refusal layer
    config: dict


def behavior_sidecar(sae: TopKSAE, feature_ids: Sequence[int], directions_ND: torch.Tensor, signs: Sequence[int]
                     ) -> DenseSidecar:
    """The screened latents, each moved in its wanted sign (-1 removal, +1 amplification, as `sidecar_from_sae`)
    along the cross-talk filter's unit directions (the SAE's decoder columns are unit norm too, so strengths
    compare across behaviours)."""
    base = sidecar_from_sae(sae, feature_ids, signs)
    orient_N1 = -torch.tensor(list(signs), dtype=torch.float32)[:, None]
    return DenseSidecar((directions_ND.float() * orient_N1).contiguous(), base.B_sel_ND, base.tau_N).validate()


def concat_sidecars(sidecars: dict[str, DenseSidecar]) -> tuple[DenseSidecar, dict[str, int]]:
    """One grouped sidecar from several (in the dict's order) and its group sizes."""
    parts = list(sidecars.values())
    joined = DenseSidecar(*(torch.cat([getattr(p, name) for p in parts]) for name in DenseSidecar._fields))
    return joined.validate(), {name: len(p.tau_N) for name, p in sidecars.items()}


def _pinned(path: Path, directory: Path, sha256: str | None = None) -> dict:
    return {"path": str(path.relative_to(directory)), "sha256": sha256 or file_sha256(path)}


def write_release(directory: Path, sidecars: dict[int, dict[str, DenseSidecar]], alphas: dict[str, float],
                  nnz_per_feature: int, provenance: dict, refusal: RefusalRouting | None = None,
                  gates: list[dict] | None = None, feature_ids: dict[int, dict[str, list[int]]] | None = None,
                  dictionaries: dict[int, dict[str, list[int]]] | None = None) -> dict:
    """Dense and SAE8 sidecars per behaviour and layer, a grouped pair per layer, the refusal mode, and the config
    pinning them. sidecars: layer -> behaviour -> sidecar; alphas: behaviour -> alpha (every layer); gates: the
    results ({name, value, threshold, passed, ...}) the release was written under; feature_ids: the SAE latents
    behind each sidecar's rows (recorded); dictionaries: layer -> behaviour -> the latents the cross-talk filter
    kept, steered or not (the sign-flip check reads them on clean questions)."""
    directory.mkdir(parents=True, exist_ok=True)
    layers = {}
    behaviors = {b: {"alpha": alphas[b], "alphas": {}, "sidecars": {}}
                 for b in (refusal.router.names if refusal else ())}
    for layer, by_behavior in sorted(sidecars.items()):
        nnz = min(nnz_per_feature, next(iter(by_behavior.values())).A_sel_ND.shape[1])  # at most d_model
        for behavior, sidecar in by_behavior.items():
            dense, sae8 = directory / f"{behavior}_l{layer}.safetensors", directory / f"{behavior}_l{layer}.sae8"
            entry = behaviors.setdefault(behavior, {"alpha": alphas[behavior], "alphas": {}, "sidecars": {}})
            entry["sidecars"][str(layer)] = {
                "features": len(sidecar.tau_N), "feature_ids": (feature_ids or {}).get(layer, {}).get(behavior),
                "dense": _pinned(dense, directory, save_dense(sidecar, dense)),
                "sae8": _pinned(sae8, directory, write_sae8(sidecar, sae8, nnz))}
        grouped, sizes = concat_sidecars(by_behavior)
        dense, sae8 = directory / f"grouped_l{layer}.safetensors", directory / f"grouped_l{layer}.sae8"
        # a list, not a dict: the rows' order must survive sort_keys
        layers[str(layer)] = {"groups": [[name, n] for name, n in sizes.items()],
                              "dense": _pinned(dense, directory, save_dense(grouped, dense, sizes)),
                              "sae8": _pinned(sae8, directory, write_sae8(grouped, sae8, nnz, sizes))}
    config = {**provenance, "version": CONFIG_VERSION, "layers": layers, "behaviors": behaviors,  # ours win
              "dictionaries": {str(layer): {b: list(ids) for b, ids in by_behavior.items()}
                               for layer, by_behavior in sorted((dictionaries or {}).items())},
              "gates": {"passed": all(g["passed"] for g in gates or []), "results": gates or []}}
    if refusal is not None:
        config["refusal"] = {
            "layer": refusal.layer, "beta_per_alpha": refusal.beta_per_alpha, "gate_skip": refusal.gate_skip,
            "behaviors": list(refusal.router.names), "gate_layers": list(refusal.gate.layers),
            "gate": _pinned(directory / "gate.safetensors", directory,
                            save_tensors(refusal.gate.tensors(), directory / "gate.safetensors")),
            "router": _pinned(directory / "router.safetensors", directory,
                              save_router(refusal.router, directory / "router.safetensors")),
            "vector": _pinned(directory / "refusal.safetensors", directory,
                              save_tensors({"refusal_D": refusal.refusal_D}, directory / "refusal.safetensors"))}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def _alpha(config: dict, behavior: str, layer: str) -> float:
    entry = config["behaviors"][behavior]
    return float(entry["alphas"].get(layer, entry["alpha"]))


def read_release(directory: Path, accept_failed_gates: bool = False) -> Release:
    """The release with every file sha256-verified. Fails closed with SidecarError naming what is wrong; a release
    whose recorded gates failed is refused unless accept_failed_gates."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("version") != CONFIG_VERSION:
            raise SidecarError(f"{CONFIG_FILE} version {config.get('version')} (this reader knows {CONFIG_VERSION})")
        failed = [g["name"] for g in config["gates"]["results"] if not g["passed"]]
        if failed and not accept_failed_gates:
            raise SidecarError(f"the release failed its gates ({', '.join(failed)}); pass accept_failed_gates=True "
                               "to apply it anyway (audits, its own evaluation)")
        out = {}
        for layer, entry in config["layers"].items():
            sizes = {str(b): int(n) for b, n in entry["groups"]}
            path = directory / entry["dense"]["path"]
            sidecar = load_dense(path, entry["dense"]["sha256"])
            pinned = list((sidecar_groups(path) or {}).items())  # the sha256-pinned file says whose rows are whose
            if pinned != list(sizes.items()):
                raise SidecarError(f"layer {layer}: the config's groups {list(sizes.items())} differ from the "
                                   f"sidecar's {pinned}")
            out[int(layer)] = LayerGroups(sidecar, sizes, {b: _alpha(config, b, layer) for b in sizes})
        refusal, alphas = None, {}
        if "refusal" in config:
            entry = config["refusal"]
            gate = ProbeGate.from_tensors(load_tensors(directory / entry["gate"]["path"], entry["gate"]["sha256"]))
            router = load_router(directory / entry["router"]["path"], entry["router"]["sha256"], entry["behaviors"])
            vector = load_tensors(directory / entry["vector"]["path"], entry["vector"]["sha256"])["refusal_D"]
            refusal = RefusalRouting(int(entry["layer"]), vector, gate, router, float(entry["beta_per_alpha"]),
                                     int(entry["gate_skip"]))
            alphas = {b: _alpha(config, b, str(refusal.layer)) for b in router.names}
        stray = {layer: sorted(set(d) - set(config["behaviors"])) for layer, d in config["dictionaries"].items()}
        if any(stray.values()):
            raise SidecarError(f"the dictionaries name behaviours the release does not steer: {stray}")
        every = [a for groups in out.values() for a in groups.alphas.values()] + list(alphas.values())
        if not all(math.isfinite(a) for a in every):
            raise SidecarError(f"alphas must be finite, got {config['behaviors']}")
        return Release(out, refusal, alphas, config)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, TensorFileError) as err:
        raise SidecarError(f"cannot read the behaviour release in {directory}: {err}") from err
