"""The operating point on disk and the public patching API.

An operating point is a directory: `steering_config.json` plus, per layer, its sidecar (dense safetensors or SAE8),
its refusal vector and its probe gate (safetensors), each pinned by sha256 in the config. `apply_patch(model, dir)`
applies it exactly as it was evaluated; a missing, edited or swapped file fails closed."""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from sae_pipeline.steering.runtime import (
    DEFAULT_ALPHA, NO_STEER_TOKEN, REVERSE_TOKEN, LayerSteering, ProbeGate, SteeringError, SteeringPatch,
    apply_patch_layers, remove_patch)
from sae_pipeline.steering.sidecar import SidecarError, load_sidecar, save_dense
from sae_pipeline.tensorfiles import TensorFileError, load_tensors, save_tensors

CONFIG_FILE = "steering_config.json"
CONFIG_VERSION = 2  # 2: gates read the residual stream (1: MLP outputs)


def save_operating_point(directory: Path, layers: dict[int, LayerSteering], gate_skip: int, provenance: dict
                         ) -> Path:
    """Write the sidecars, refusal vectors and gates with a config that pins each by sha256."""
    directory.mkdir(parents=True, exist_ok=True)
    entries = {}
    for layer, cfg in sorted(layers.items()):
        entry = {"alpha": cfg.alpha, "epsilon": cfg.epsilon, "beta": cfg.beta}
        if cfg.sidecar is not None:
            entry["sidecar"] = f"sidecar_l{layer}.safetensors"
            entry["sidecar_sha256"] = save_dense(cfg.sidecar, directory / entry["sidecar"])
        if cfg.refusal_D is not None:
            entry["refusal"] = f"refusal_l{layer}.safetensors"
            entry["refusal_sha256"] = save_tensors({"refusal_D": cfg.refusal_D}, directory / entry["refusal"])
        if cfg.gate is not None:
            entry["gate"] = f"gate_l{layer}.safetensors"
            entry["gate_layers"] = list(cfg.gate.layers)
            entry["gate_sha256"] = save_tensors(cfg.gate.tensors(), directory / entry["gate"])
        entries[str(layer)] = entry
    config = {"version": CONFIG_VERSION, "gate_skip": gate_skip, "layers": entries, **provenance}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def load_operating_point(directory: Path, accept_failed_gates: bool = False
                         ) -> tuple[dict[int, LayerSteering], int, dict]:
    """(layers, gate_skip, config), every file verified against the config's sha256. A point whose recorded
    steering gates failed is refused unless accept_failed_gates (audits, the gates check itself)."""
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if config.get("version") != CONFIG_VERSION:
            raise SteeringError(f"{directory / CONFIG_FILE}: unsupported version {config.get('version')!r}")
        failed = [g["name"] for g in config.get("gates", {}).get("results", []) if not g["passed"]]
        if failed and not accept_failed_gates:
            raise SteeringError(f"{directory} failed its steering gates ({', '.join(failed)}); pass "
                                "accept_failed_gates=True to apply it anyway (audits only)")
        layers = {}
        for key, entry in config["layers"].items():
            name = entry.get("sidecar")
            sidecar = None if name is None else load_sidecar(directory / name, entry["sidecar_sha256"])
            refusal_D = (load_tensors(directory / entry["refusal"], entry["refusal_sha256"])["refusal_D"]
                         if "refusal" in entry else None)
            gate = None
            if "gate" in entry:
                gate = ProbeGate.from_tensors(load_tensors(directory / entry["gate"], entry["gate_sha256"]))
            layers[int(key)] = LayerSteering(sidecar, float(entry["alpha"]), float(entry["epsilon"]), refusal_D,
                                             float(entry["beta"]), gate)
        return layers, int(config["gate_skip"]), config
    except (OSError, ValueError, KeyError, TypeError, SidecarError, TensorFileError) as err:
        raise SteeringError(f"cannot load the operating point in {directory}: {err}") from err


def apply_patch(model: nn.Module, sae_path: str | Path | dict, steer_on: bool = True, alpha: float | None = None,
                alphas: dict[int, float] | None = None, reverse_token: str = REVERSE_TOKEN,
                no_steer_token: str = NO_STEER_TOKEN, accept_failed_gates: bool = False) -> SteeringPatch:
    """Attach steering. sae_path: an operating-point directory (applied as evaluated; alpha/alphas override its
    feature-mode strengths where it has features), or {layer: sidecar file} with `alphas` (or one `alpha`, default
    DEFAULT_ALPHA) for the feature mode alone. An operating point that failed its steering gates is refused unless
    accept_failed_gates. steer_on=False attaches the hooks inert (alpha and beta 0). The control tokens are this
    runtime's; other spellings are refused rather than silently ignored."""
    if (reverse_token, no_steer_token) != (REVERSE_TOKEN, NO_STEER_TOKEN):
        raise SteeringError(f"control tokens are fixed: {REVERSE_TOKEN} and {NO_STEER_TOKEN}")
    if isinstance(sae_path, dict):
        layers = {}
        for layer, path in sae_path.items():
            sidecar = load_sidecar(Path(path))
            layers[int(layer)] = LayerSteering(sidecar, (alphas or {}).get(layer, DEFAULT_ALPHA if alpha is None
                                                                            else alpha))
        gate_skip = 1
    else:
        layers, gate_skip, _ = load_operating_point(Path(sae_path), accept_failed_gates)
        for layer, cfg in layers.items():
            override = (alphas or {}).get(layer, alpha)
            if override is not None and cfg.sidecar is not None:  # a refusal-only layer has no feature mode
                cfg.alpha = override
    if not steer_on:
        for cfg in layers.values():
            cfg.alpha, cfg.beta = 0.0, 0.0
    return apply_patch_layers(model, layers, gate_skip)


__all__ = ["apply_patch", "remove_patch", "save_operating_point", "load_operating_point"]
