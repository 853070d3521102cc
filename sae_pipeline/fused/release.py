"""The fused release (issue #6): the behaviour release with each layer's grouped sidecar replaced by a fused net.

`artifacts/fused/release/` holds a copy of the behaviour release it distils (`behaviors/`: the refusal routing, the
alphas, the dictionaries and the gates that release met or failed) and, per feature layer, the net in each backend:
`fused_l{L}.safetensors` (PyTorch), `fused_l{L}.onnx` (ONNX, float) and `fused_l{L}.int8.onnx` (INT8), with the
INT8 calibration cache. `fused_config.json` pins every file by sha256 and records each backend's error statistics
and error gates; its default backend is the first of int8, onnx, torch whose gates passed. Reading it fails closed
(`SidecarError`) on a missing, tampered or inconsistent file."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.behaviors.release import CONFIG_FILE, Release, read_release
from sae_pipeline.hashing import file_sha256
from sae_pipeline.steering.runtime import FusedSideNet, LayerSteering, SteeringError
from sae_pipeline.steering.sidecar import SidecarError

FUSED_CONFIG = "fused_config.json"
FUSED_VERSION = 1
BEHAVIOR_RELEASE = "behaviors"  # the copied behaviour release, inside the fused release
BACKENDS = ("int8", "onnx", "torch")  # the default backend is the first whose gates passed
BACKEND_SUFFIXES = {"torch": ".safetensors", "onnx": ".onnx", "int8": ".int8.onnx"}


def backend_file(layer: int, backend: str) -> str:
    return f"fused_l{layer}{BACKEND_SUFFIXES[backend]}"


class FusedRelease(NamedTuple):
    behaviors: Release  # the behaviour release the nets distil (its refusal routing, alphas and dictionaries)
    files: dict[int, Path]  # layer -> the chosen backend's net file, sha256-verified
    backend: str
    config: dict


def write_fused_release(directory: Path, behavior_release: Path, layers: dict[int, dict], gates: dict[str, list[dict]]
                        ) -> dict:
    """layers: layer -> {"files": {backend: path}, "calibration": path, "errors": {backend: {...}}, ...}: the files
    are copied in and pinned, the rest recorded; gates: backend -> its gate results ({name, value, threshold,
    passed, ...}) over every layer."""
    shutil.rmtree(directory, ignore_errors=True)  # no stale net may linger
    shutil.copytree(behavior_release, directory / BEHAVIOR_RELEASE)
    recorded = {}
    for layer, entry in sorted(layers.items()):
        pinned = {}
        for backend, source in entry["files"].items():
            target = directory / backend_file(layer, backend)
            shutil.copyfile(source, target)
            pinned[backend] = {"path": target.name, "sha256": file_sha256(target)}
        calibration = directory / f"calibration_l{layer}.json"
        shutil.copyfile(entry["calibration"], calibration)
        recorded[str(layer)] = {**{k: v for k, v in entry.items() if k not in ("files", "calibration")},
                                "files": pinned,
                                "calibration": {"path": calibration.name, "sha256": file_sha256(calibration)}}
    passed = {backend: all(g["passed"] for g in results) for backend, results in gates.items()}
    config = {"version": FUSED_VERSION, "layers": recorded,
              "behavior_release": {"path": BEHAVIOR_RELEASE,
                                   "config_sha256": file_sha256(directory / BEHAVIOR_RELEASE / CONFIG_FILE)},
              "gates": {backend: {"passed": passed[backend], "results": gates[backend]} for backend in gates},
              "default_backend": next((b for b in BACKENDS if passed.get(b)), None)}
    (directory / FUSED_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    return config


def read_fused_release(directory: Path, backend: str | None = None, accept_failed_gates: bool = False
                       ) -> FusedRelease:
    """The release in `directory` for one backend (default: the recorded default), every file sha256-verified.
    A backend that failed its error gates, or a behaviour release that failed its own, is refused unless
    accept_failed_gates."""
    try:
        config = json.loads((directory / FUSED_CONFIG).read_text())
        if config.get("version") != FUSED_VERSION:
            raise SidecarError(f"{FUSED_CONFIG} version {config.get('version')} (this reader knows {FUSED_VERSION})")
        backend = backend or config["default_backend"]
        if backend is None:
            raise SidecarError(f"no backend passed its error gates ({sorted(config['gates'])}); name one with "
                               "accept_failed_gates=True")
        if backend not in config["gates"]:
            raise SidecarError(f"no {backend!r} nets here; backends: {sorted(config['gates'])}")
        if not config["gates"][backend]["passed"] and not accept_failed_gates:
            failed = [g["name"] for g in config["gates"][backend]["results"] if not g["passed"]]
            raise SidecarError(f"the {backend} nets failed their error gates ({', '.join(failed)}); pass "
                               "accept_failed_gates=True to apply them anyway")
        inner = directory / config["behavior_release"]["path"]
        if file_sha256(inner / CONFIG_FILE) != config["behavior_release"]["config_sha256"]:
            raise SidecarError(f"{inner / CONFIG_FILE} does not match its recorded sha256")
        behaviors = read_release(inner, accept_failed_gates)
        if sorted(map(int, config["layers"])) != sorted(behaviors.groups):
            raise SidecarError(f"nets for layers {sorted(config['layers'])}, the behaviour release steers features "
                               f"at {sorted(behaviors.groups)}")
        files = {}
        for layer, entry in config["layers"].items():
            pinned = entry["files"][backend]
            path = directory / pinned["path"]
            if file_sha256(path) != pinned["sha256"]:
                raise SidecarError(f"{path} does not match its recorded sha256")
            if list(entry["behaviors"]) != list(behaviors.groups[int(layer)].sizes):
                raise SidecarError(f"layer {layer}: nets for {entry['behaviors']}, the behaviour release groups "
                                   f"{list(behaviors.groups[int(layer)].sizes)}")
            files[int(layer)] = path
        return FusedRelease(behaviors, files, backend, config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if isinstance(err, SidecarError):
            raise
        raise SidecarError(f"cannot read the fused release in {directory}: {err}") from err


def fused_layers(layers: dict[int, LayerSteering], nets: dict[int, FusedSideNet]) -> dict[int, LayerSteering]:
    """The behaviour release's hooks (`steering.behaviors.behavior_layers`) with each grouped sidecar replaced by
    its layer's net, each behaviour at the alpha its group had (0 where it is not enabled); the refusal routing
    stays as it was."""
    out = {}
    for layer, cfg in layers.items():
        if cfg.groups is None:
            out[layer] = cfg
            continue
        if layer not in nets:
            raise SteeringError(f"layer {layer} steers features but has no fused net")
        alpha_of = dict(zip(cfg.groups.names, cfg.groups.alpha_G.tolist()))
        alphas_G = torch.tensor([alpha_of.get(name, 0.0) for name in nets[layer].behaviors])
        out[layer] = replace(cfg, sidecar=None, groups=None, fused=nets[layer], fused_alpha_G=alphas_G)
    return out

