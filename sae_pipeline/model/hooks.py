"""Hook points per decoder layer, for the supported architectures: the MLP output before the residual add (where
the SAEs read and steering writes) and the residual stream after the layer (what the refusal gate reads)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

# attribute path to the decoder-layer list, per architecture family
_LAYER_PATHS = {
    "llama-style (Llama, Mistral, Qwen2, SmolLM)": ("model", "layers"),
    "gpt2-style (GPT-2, GPT-J)": ("transformer", "h"),
}


class UnsupportedArchitectureError(ValueError):
    pass


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS.values():
        node = model
        for attr in path:
            node = getattr(node, attr, None)
            if node is None:
                break
        if isinstance(node, nn.ModuleList) and all(hasattr(layer, "mlp") for layer in node):
            return node
    raise UnsupportedArchitectureError(
        f"cannot find MLP hook points in {type(model).__name__}; supported: {', '.join(_LAYER_PATHS)} "
        f"(decoder layers at {' or '.join('.'.join(p) + '[i].mlp' for p in _LAYER_PATHS.values())})"
    )


def mlp_module(model: nn.Module, layer: int) -> nn.Module:
    """The MLP of decoder layer `layer`; its forward output is the hook point."""
    layers = decoder_layers(model)
    if not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise IndexError(f"layer {layer!r} is out of range: {type(model).__name__} has layers 0..{len(layers) - 1}")
    return layers[layer].mlp


Site = Literal["mlp", "residual"]


def hook_module(model: nn.Module, layer: int, site: Site = "mlp") -> nn.Module:
    """The module whose forward output is the hook point: the layer's MLP, or the decoder layer itself (its output is
    the residual stream after the layer)."""
    if site not in ("mlp", "residual"):
        raise ValueError(f"unknown hook site {site!r}: 'mlp' or 'residual'")
    mlp = mlp_module(model, layer)  # checks the index
    return mlp if site == "mlp" else decoder_layers(model)[layer]


def output_tensor(output) -> torch.Tensor:
    """A decoder layer may return (hidden_states, ...) or the hidden states alone, depending on the version."""
    return output[0] if isinstance(output, tuple) else output


class StopForward(Exception):
    """Raised by the last capture hook so the forward pass never runs the layers nobody reads."""


@contextmanager
def capture_outputs(model: nn.Module, layers: list[int], stop_after_last: bool = True, site: Site = "mlp"
                    ) -> Iterator[dict[int, torch.Tensor]]:
    """Collect each layer's output at `site` (batch, seq, d_model) into the yielded dict, per forward call.

    With stop_after_last, the hook on the highest layer raises StopForward; callers run the model under
    `run_until_captured`, which swallows it."""
    captured: dict[int, torch.Tensor] = {}
    last = max(layers)
    handles = []

    def make_hook(layer: int):
        def hook(_module, _inputs, output):
            captured[layer] = output_tensor(output).detach()
            if stop_after_last and layer == last:
                raise StopForward

        return hook

    try:
        for layer in sorted(set(layers)):
            handles.append(hook_module(model, layer, site).register_forward_hook(make_hook(layer)))
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def run_until_captured(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except StopForward:
        pass


@torch.no_grad()
def layer_outputs(model: nn.Module, input_ids: torch.Tensor, layers: list[int], site: Site = "mlp"
                  ) -> dict[int, torch.Tensor]:
    """Each layer's output at `site` (batch, seq, d_model) from one forward pass that stops after the last of them."""
    with capture_outputs(model, layers, site=site) as captured:
        run_until_captured(model, input_ids)
    return dict(captured)
