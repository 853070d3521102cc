"""Conditional runtime steering at the hooked MLP outputs.

Per layer, with the sidecar (A_sel_ND, B_sel_ND, tau_N) of the selected features and the MLP output x_BSD:
  s = x B_sel^T,  z = relu(s - tau),  fire = any_j z_j > epsilon   (per token)
  feature mode:  x <- x - alpha * (z A_sel)            where fire
  refusal mode:  x <- x + beta * r                      in every row whose prompt fired (decided on the prefill)
Both modes may be on. alpha = 0 with no refusal vector returns the output object untouched (bit-identical logits);
`remove_patch` detaches every hook (the weights are never modified). STEER_ENABLE=0 leaves the hooks attached but
inert. Control tokens in a prompt set the next request's mode and are stripped before tokenisation
(`SteeringPatch.strip_controls`): `<|no-steer|>` turns steering off, `<|reverse-safety|>` reverses it at
magnitude 1.0 (audits only: refused unless STEER_DEBUG=1)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from sae_pipeline.model.hooks import mlp_module
from sae_pipeline.steering.sidecar import DenseSidecar

NO_STEER_TOKEN = "<|no-steer|>"
REVERSE_TOKEN = "<|reverse-safety|>"
_PATCH_ATTR = "_sae_pipeline_steering"


class SteeringError(RuntimeError):
    """Steering cannot be applied as asked (already patched, bad layer, reverse without STEER_DEBUG, ...)."""


@dataclass
class LayerSteering:
    """What one hooked layer applies. refusal_D: the refusal vector for the conditional refusal mode (or None)."""

    sidecar: DenseSidecar
    alpha: float
    epsilon: float = 0.02
    refusal_D: torch.Tensor | None = None
    beta: float = 0.0


@dataclass
class _LayerState:
    config: LayerSteering
    fired_B: torch.Tensor | None = None  # (B, 1, 1) rows whose prompt fired, set on each prefill
    # (device, dtype) -> (A_sel_ND, B_sel_DN, tau_N, refusal_D) in the activations' dtype: converted once, not per call
    cast: dict = field(default_factory=dict)

    def tensors(self, like: torch.Tensor) -> tuple:
        key = (like.device, like.dtype)
        if key not in self.cast:
            A_sel_ND, B_sel_ND, tau_N = self.config.sidecar
            refusal_D = self.config.refusal_D
            self.cast[key] = (A_sel_ND.to(like.device, like.dtype).contiguous(),
                              B_sel_ND.to(like.device, like.dtype).T.contiguous(),
                              tau_N.to(like.device, like.dtype),
                              None if refusal_D is None else refusal_D.to(like.device, like.dtype))
        return self.cast[key]


@dataclass
class SteeringPatch:
    """The hooks on one model. `sign` is +1 normally, 0 for a no-steer request, -1 (x 1/alpha) for reverse."""

    layers: dict[int, _LayerState]
    handles: list = field(default_factory=list)
    scale: float = 1.0  # multiplies every alpha and beta; set per request by control tokens

    def strip_controls(self, text: str) -> str:
        """Remove control tokens from a prompt and set the mode they ask for (the last request wins)."""
        self.scale = 1.0
        if NO_STEER_TOKEN in text:
            self.scale = 0.0
        if REVERSE_TOKEN in text:
            if os.environ.get("STEER_DEBUG") != "1":
                raise SteeringError("reverse-safety is an audit tool and is off unless STEER_DEBUG=1")
            self.scale = -1.0
        return text.replace(NO_STEER_TOKEN, "").replace(REVERSE_TOKEN, "")

    def _hook(self, state: _LayerState):
        cfg = state.config

        def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            if os.environ.get("STEER_ENABLE", "1") == "0" or self.scale == 0.0:
                return output
            alpha = cfg.alpha * self.scale if self.scale >= 0 else -1.0  # reverse: magnitude 1, opposite sign
            beta = cfg.beta * self.scale
            if alpha == 0.0 and (cfg.refusal_D is None or beta == 0.0):
                return output
            x_BSD = output
            A_sel_ND, B_sel_DN, tau_N, refusal_D = state.tensors(x_BSD)
            z_BSN = torch.relu(x_BSD @ B_sel_DN - tau_N)
            fire_BS1 = (z_BSN > cfg.epsilon).any(-1, keepdim=True)
            steered = x_BSD
            if alpha != 0.0:
                steered = steered - alpha * (z_BSN @ A_sel_ND) * fire_BS1
            if refusal_D is not None and beta != 0.0:
                if x_BSD.shape[1] > 1 or state.fired_B is None or state.fired_B.shape[0] != x_BSD.shape[0]:
                    # a prefill: this request's prompt decides, for every token generated after it
                    state.fired_B = fire_BS1.any(1, keepdim=True)
                steered = steered + state.fired_B.to(x_BSD.dtype) * (beta * refusal_D)
            return steered

        return hook


def apply_patch_layers(model: nn.Module, layers: dict[int, LayerSteering]) -> SteeringPatch:
    """Attach steering hooks; fails if the model is already patched (remove_patch first)."""
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise SteeringError("the model is already patched; call remove_patch(model) first")
    patch = SteeringPatch({layer: _LayerState(cfg) for layer, cfg in layers.items()})
    for layer, state in patch.layers.items():
        d_model = state.config.sidecar.A_sel_ND.shape[1]
        module = mlp_module(model, layer)
        width = getattr(getattr(module, "down_proj", None), "out_features", d_model)
        if width != d_model:
            raise SteeringError(f"layer {layer}: the sidecar has d_model {d_model}, the model {width}")
        patch.handles.append(module.register_forward_hook(patch._hook(state)))
    setattr(model, _PATCH_ATTR, patch)
    return patch


def remove_patch(model: nn.Module) -> None:
    """Detach every steering hook; the model computes exactly as before apply_patch."""
    patch = getattr(model, _PATCH_ATTR, None)
    if patch is None:
        return
    for handle in patch.handles:
        handle.remove()
    setattr(model, _PATCH_ATTR, None)


@contextmanager
def patched(model: nn.Module, layers: dict[int, LayerSteering]) -> Iterator[SteeringPatch]:
    patch = apply_patch_layers(model, layers)
    try:
        yield patch
    finally:
        remove_patch(model)
