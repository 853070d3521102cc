"""apply_fused_behaviors: the behaviours' feature deltas through one fused side-net per hooked layer (issue #6).

Each net runs inside the model's forward hook in place of the layer's grouped sidecar (`runtime.LayerSteering`'s
fused backend): PyTorch for `.safetensors`, ONNX Runtime for `.onnx` (float or INT8; CUDA execution provider when
onnxruntime-gpu is present and the model is on a GPU). The control tokens and STEER_ENABLE act as for sidecars;
reverse-safety flips the alphas (delta_hat is linear in them). A fused release directory (`fused/release.py`)
applies the evaluated configuration: its nets in place of the behaviour release's grouped sidecars, and that
release's refusal routing and alphas. `remove_behaviors(model)` detaches them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from sae_pipeline.fused.export import OnnxSideNet
from sae_pipeline.fused.net import load_fused
from sae_pipeline.fused.release import FusedRelease, fused_layers, read_fused_release
from sae_pipeline.steering.behaviors import behavior_layers
from sae_pipeline.steering.runtime import (
    DEFAULT_ALPHA, FusedSideNet, LayerSteering, SteeringError, SteeringPatch, apply_patch_layers)

BACKENDS = {".safetensors": "torch", ".onnx": "onnx"}


def load_side_net(path: Path, device: torch.device, backend: str | None = None,
                  sha256: str | None = None) -> FusedSideNet:
    """A fused net for the runtime: backend 'torch' or 'onnx' ('int8': an INT8 ONNX file), by default from the
    file's suffix."""
    backend = backend or BACKENDS.get(path.suffix)
    if backend == "torch":
        return load_fused(path, sha256).to(device).eval()
    if backend in ("onnx", "int8"):
        return OnnxSideNet(path, prefer_cuda=device.type == "cuda")
    raise SteeringError(f"{path}: no fused backend {backend!r}; backends are torch (.safetensors), onnx and int8 "
                        "(.onnx)")


def release_nets(files: dict[int, Path], device: torch.device) -> dict[int, FusedSideNet]:
    return {layer: load_side_net(path, device) for layer, path in files.items()}


def release_layers(release: FusedRelease, device: torch.device,
                   alphas_per_behavior: dict[str, float | dict[int, float]] | None = None,
                   behaviors: Sequence[str] | None = None, steer_on: bool = True, scale: float = 1.0
                   ) -> tuple[dict[int, LayerSteering], int]:
    """The hooks a fused release asks for (its behaviour release's, each grouped sidecar replaced by the layer's
    net on `device`) and the gate's gate_skip; arguments as steering.behaviors.behavior_layers."""
    layers, gate_skip = behavior_layers(release.behaviors, alphas_per_behavior, behaviors, steer_on, scale=scale)
    return fused_layers(layers, release_nets(release.files, device)), gate_skip


def apply_fused_behaviors(model: nn.Module, fused_paths_per_layer: str | Path | dict[int, str | Path],
                          alphas_per_behavior: dict[str, float | dict[int, float]] | None = None,
                          backend: str | None = None, behaviors: Sequence[str] | None = None, steer_on: bool = True,
                          accept_failed_gates: bool = False, scale: float = 1.0) -> SteeringPatch:
    """Attach fused nets. fused_paths_per_layer: a fused release directory (`artifacts/fused/release`: backend
    int8, onnx or torch, by default the release's; behaviors: the subset to enable; a release whose gates failed
    only with accept_failed_gates) or {layer: net file} (the feature rule alone; backend torch or onnx, by default
    from the suffix). alphas_per_behavior: {behaviour: alpha or {layer: alpha}}, unnamed behaviours at the release's
    alpha (files: the default alpha), a behaviour at 0 switched off; scale multiplies every alpha (a locale's
    multiplier). Everything is checked before any hook goes on."""
    device = next(model.parameters()).device
    if not isinstance(fused_paths_per_layer, dict):
        release = read_fused_release(Path(fused_paths_per_layer), backend, accept_failed_gates)
        return apply_patch_layers(model, *release_layers(release, device, alphas_per_behavior, behaviors, steer_on,
                                                         scale))
    if behaviors is not None:
        raise SteeringError("behaviors= selects within a release; with net files, set an alpha to 0 instead")
    nets = {int(layer): load_side_net(Path(path), device, backend) for layer, path in fused_paths_per_layer.items()}
    alphas = alphas_per_behavior or {}
    known = sorted({b for net in nets.values() for b in net.behaviors})
    unknown = sorted(set(alphas) - set(known))
    if unknown:
        raise SteeringError(f"unknown behaviours {unknown}; these nets steer {known}")
    stray = {name: sorted({int(k) for k in alpha} - {layer for layer, net in nets.items() if name in net.behaviors})
             for name, alpha in alphas.items() if isinstance(alpha, dict)}
    if any(stray.values()):
        raise SteeringError(f"alphas name layers where the behaviour has no net: "
                            f"{ {name: bad for name, bad in stray.items() if bad} }")
    layers = {}
    for layer, net in sorted(nets.items()):
        per_behavior = []
        for name in net.behaviors:
            alpha = alphas.get(name, DEFAULT_ALPHA)
            if isinstance(alpha, dict):
                alpha = {int(k): v for k, v in alpha.items()}.get(layer, DEFAULT_ALPHA)
            per_behavior.append(float(alpha))
        layers[layer] = LayerSteering(None, 1.0 if steer_on else 0.0, fused=net,
                                      fused_alpha_G=torch.tensor(per_behavior))
    return apply_patch_layers(model, layers)
