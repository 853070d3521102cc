"""Conditional runtime steering at the hooked MLP outputs.

Per layer, with the sidecar (A_sel_ND, B_sel_ND, tau_N) of the selected features and the MLP output x_BSD:
  s = x B_sel^T,  z = relu(s - tau),  fire = any_j z_j > epsilon   (per token)
  feature mode:  x <- x - alpha * (z A_sel)            on every token where fire
  refusal mode:  x <- x + beta * r                      on every token of a row whose *prompt* fired
With feature groups (behaviours sharing a layer, `FeatureGroups`), each group follows the feature rule on its own
features, with its own alpha and its own fire, and the groups' deltas add. On a CPU the rule is computed in float32
whatever the activations' dtype (faster there for these small products, and what the fused nets distil).
Neither the feature rule nor a fused net touches a row's first real token at a prefill, the attention sink: its
activation lies orders of magnitude off the rest and the SAEs never saw it (`skip_positions`); read there, the raw
encoder put a "cyber" latent at z ~55 on every prompt, and editing the sink moved most replies. (The refusal mode
still adds to every token of a fired row.)
The refusal decision is taken at each prefill (a forward that starts a sequence) over the prompt's own tokens: real
tokens (attention mask), past the first `gate_skip` of them (the attention sink and a fixed chat-template prefix), and
holds for the tokens generated after it. The prompt fires when a selected feature fires on it or, with a probe gate,
when a linear probe on the prompt's summary after earlier layers says so: the residual stream's mean over the prompt's
tokens and its value at the prompt's last token (where the model has read the whole request). With a category router
(per-behaviour policies) a fired prompt is also assigned the behaviour whose classifier scores it highest, and the
refusal vector goes in at that behaviour's strength (0: the behaviour is off). On SmolLM2 this summary
separated harmful from varied benign prompts better than MLP-output means (see SteeringConfig). A layer may carry only
the refusal mode (no sidecar). alpha = 0 with no refusal vector returns the output untouched (bit-identical logits);
`remove_patch` detaches every hook (the weights are never modified); STEER_ENABLE=0 leaves the hooks attached but inert.
`SteeringPatch.request(prompt)` strips the control tokens and sets that request's mode: `<|no-steer|>` turns steering
off, `<|reverse-safety|>` (only with STEER_DEBUG=1) flips both modes, feature removal becoming amplification at alpha 1
and the refusal vector being subtracted; the mode resets afterwards."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import nn

from sae_pipeline.model.hooks import hook_module, mlp_module, output_tensor
from sae_pipeline.steering.cuda_graphs import DecodeGraphs
from sae_pipeline.steering.sidecar import DenseSidecar

NO_STEER_TOKEN = "<|no-steer|>"
REVERSE_TOKEN = "<|reverse-safety|>"
DEFAULT_ALPHA = 0.6  # issue #4's apply_patch default: the feature rule's strength when sidecars come without one
DEFAULT_EPSILON = 0.02  # issue #4: a token is steered where some selected z_j exceeds it
_PATCH_ATTR = "_sae_pipeline_steering"
RULE_VERSION = 2  # what the hooks compute (2: the sink left untouched); journals of steered measurements key on it


class SteeringError(RuntimeError):
    """Steering cannot be applied as asked (already patched, bad layer, reverse without STEER_DEBUG, ...)."""


def prompt_summary(h_BSD: torch.Tensor, gate_BS: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
    """(B, 2D) float32: each row's mean of h over the tokens gate_BS admits, then h at its last real token."""
    h_BSD = h_BSD.float()  # a bf16 sum over a long prompt would blur the score near the threshold
    weights_BS1 = gate_BS.to(h_BSD.device).unsqueeze(-1).float()  # a sharded model keeps layers on several devices
    mean_BD = (h_BSD * weights_BS1).sum(1) / weights_BS1.sum(1).clamp(min=1)
    last_BD = h_BSD[torch.arange(h_BSD.shape[0], device=h_BSD.device), last_B.to(h_BSD.device)]
    return torch.cat([mean_BD, last_BD], -1)


class ProbeGate(NamedTuple):
    """A linear harm probe on the prompt summary (`prompt_summary`) of the residual stream after each of `layers`
    (standardisation and threshold folded in): the prompt fires when concat_l(summary_l) . weight_D + bias > 0.
    Every read layer lies before the layer that applies the decision, so it is ready within the same prefill."""

    weight_D: torch.Tensor
    bias: float
    layers: tuple[int, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors file."""
        return {"weight_D": self.weight_D.float().contiguous(), "bias": torch.tensor([float(self.bias)]),
                "layers": torch.tensor(self.layers, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ProbeGate:
        return cls(tensors["weight_D"], float(tensors["bias"][0]), tuple(int(x) for x in tensors["layers"].tolist()))


class CategoryRouter(NamedTuple):
    """Which behaviour a prompt belongs to: one linear score per behaviour on the gate's prompt summary
    (standardisation folded in), the highest wins. It reads the same layers as the gate it follows."""

    names: tuple[str, ...]
    weight_DC: torch.Tensor
    bias_C: torch.Tensor
    layers: tuple[int, ...]

    def tensors(self) -> dict[str, torch.Tensor]:
        """For a safetensors file (the names live in the config that pins it)."""
        return {"weight_DC": self.weight_DC.float().contiguous(), "bias_C": self.bias_C.float().contiguous(),
                "layers": torch.tensor(self.layers, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], names: tuple[str, ...]) -> CategoryRouter:
        return cls(tuple(names), tensors["weight_DC"], tensors["bias_C"],
                   tuple(int(x) for x in tensors["layers"].tolist()))


class FeatureGroups(NamedTuple):
    """The sidecar's features split into named groups (behaviours), each with its own strength."""

    names: tuple[str, ...]
    member_NG: torch.Tensor  # (features, groups) one-hot: which group each feature belongs to
    alpha_G: torch.Tensor  # per group; the layer's alpha multiplies them

    @classmethod
    def of(cls, sizes: dict[str, int], alphas: dict[str, float]) -> FeatureGroups:
        """Groups of consecutive features: sizes and alphas by name, in the sidecar's order."""
        group_N = torch.cat([torch.full((n,), g) for g, n in enumerate(sizes.values())])
        member_NG = torch.nn.functional.one_hot(group_N, len(sizes)).float()
        return cls(tuple(sizes), member_NG, torch.tensor([float(alphas[name]) for name in sizes]))


def grouped_delta(z_BSN: torch.Tensor, A_sel_ND: torch.Tensor, member_NG: torch.Tensor, alpha_G: torch.Tensor,
                  epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The feature rule with groups: each group whose features fire somewhere on a token (some z > epsilon) removes
    alpha_g * z_j A_j of each of its features there. Returns (delta, whether any group fired (..., 1))."""
    fire_BSG = ((z_BSN > epsilon).to(z_BSN.dtype) @ member_NG) > 0
    weight_BSN = (fire_BSG.to(z_BSN.dtype) * alpha_G) @ member_NG.T
    return -(z_BSN * weight_BSN) @ A_sel_ND, fire_BSG.any(-1, keepdim=True)


@dataclass
class LayerSteering:
    """What one hooked layer applies. sidecar: the selected features (None: the refusal mode alone, decided by a
    gate); refusal_D: the refusal vector for the conditional refusal mode (or None); gate: a probe that decides the
    refusal mode instead of the selected features firing."""

    sidecar: DenseSidecar | None
    alpha: float
    epsilon: float = DEFAULT_EPSILON
    refusal_D: torch.Tensor | None = None
    beta: float = 0.0
    gate: ProbeGate | None = None
    groups: FeatureGroups | None = None
    router: CategoryRouter | None = None  # per-behaviour refusal strengths, after the gate
    route_scale_C: torch.Tensor | None = None  # per router category: the multiplier on beta (0: that behaviour off)
    # instead of a sidecar, a fused side-net (fused/): delta = fused(x, alpha * fused_alpha_G), linear in the alphas
    fused: FusedSideNet | None = None
    fused_alpha_G: torch.Tensor | None = None


class FusedSideNet(Protocol):
    """A fused side-net as the runtime calls it (fused/net.py's FusedNet, fused/export.py's OnnxSideNet)."""

    behaviors: tuple[str, ...]
    d_model: int

    def __call__(self, acts: torch.Tensor, alphas_G: torch.Tensor) -> torch.Tensor: ...


@dataclass
class _LayerState:
    config: LayerSteering
    fired_B: torch.Tensor | None = None  # (B, 1, 1) each row's refusal strength (0 or 1 without a router)
    refusal_B1D: torch.Tensor | None = None  # fired_B * beta * refusal_D as the prefill made it, added at each decode
    # (device, dtype) -> (A_sel_ND, B_sel_DN, -tau_N, member_NG, alpha_G) in the compute dtype, refusal_D in the
    # activations' dtype and fused_alpha_G in float32, on the activations' device: converted once, not per call
    cast: dict = field(default_factory=dict)
    refusal_buffers: dict = field(default_factory=dict)  # (shape, dtype, device, inference) -> refusal_B1D's buffer
    graphs: DecodeGraphs = field(default_factory=DecodeGraphs)

    def tensors(self, like: torch.Tensor) -> tuple:
        key = (like.device, like.dtype)
        if key not in self.cast:
            # A decode step multiplies one token by a few features. On a CPU a bf16/fp16 GEMM of that shape costs
            # ~4x a float32 one (casts included: ~20-30 vs ~5 us), so the features are computed in float32 there.
            compute = torch.float32 if like.device.type == "cpu" else like.dtype

            def cast(tensor: torch.Tensor | None, dtype: torch.dtype = compute) -> torch.Tensor | None:
                return None if tensor is None else tensor.to(like.device, dtype).contiguous()

            sidecar, refusal_D, groups = self.config.sidecar, self.config.refusal_D, self.config.groups
            grouped = (None, None) if groups is None else (cast(groups.member_NG), cast(groups.alpha_G))
            fused_G = self.config.fused_alpha_G
            fused_G = None if fused_G is None else fused_G.to(like.device, torch.float32)  # the net's own precision
            if sidecar is None:
                self.cast[key] = (None, None, None, cast(refusal_D, like.dtype), *grouped, fused_G)
            else:
                self.cast[key] = (cast(sidecar.A_sel_ND), cast(sidecar.B_sel_ND.T), cast(-sidecar.tau_N),
                                  cast(refusal_D, like.dtype), *grouped, fused_G)
        return self.cast[key]


@dataclass
class SteeringPatch:
    """The hooks on one model, and the per-call state they share."""

    layers: dict[int, _LayerState]
    gate_skip: int = 1  # leading real tokens of a prompt that never decide the refusal mode
    handles: list = field(default_factory=list)
    scale: float = 1.0  # 1 normal, 0 no-steer, -1 reverse: set for one request by control tokens
    prompt_gate_BS: torch.Tensor | None = None  # set by the model pre-hook on a prefill, None on decode steps
    prompt_last_B: torch.Tensor | None = None  # each row's last real token at that prefill
    steerable_T1: torch.Tensor | None = None  # at that prefill, (tokens, 1): False at each row's attention sink
    prompt_summaries: dict = field(default_factory=dict)  # layer -> (B, 2D) prompt summaries of this prefill
    hooks: dict = field(default_factory=dict)  # layer -> its MLP output hook (steer calls it)
    cuda_graphs: bool = True  # on a GPU, replay each hook's decode step as a CUDA graph (cuda_graphs.py)

    def steer(self, layer: int, output: torch.Tensor) -> torch.Tensor:
        """What the layer's hook makes of an MLP output, outside a forward (benchmarks time it per token)."""
        return self.hooks[layer](None, None, output)

    @contextmanager
    def request(self, prompt: str) -> Iterator[str]:
        """Strip the control tokens from a prompt, steer the calls inside the block as they ask, then reset."""
        scale = 1.0
        if NO_STEER_TOKEN in prompt:
            scale = 0.0
        if REVERSE_TOKEN in prompt:
            if os.environ.get("STEER_DEBUG") != "1":
                raise SteeringError("reverse-safety is an audit tool and is off unless STEER_DEBUG=1")
            scale = -1.0
        self.scale = scale
        try:
            yield prompt.replace(NO_STEER_TOKEN, "").replace(REVERSE_TOKEN, "")
        finally:
            self.scale = 1.0

    @contextmanager
    def reverse_if(self, reverse: bool) -> Iterator[None]:
        """Calls inside the block run reverse-safety when asked (an audit: needs STEER_DEBUG=1), else as patched."""
        if reverse:
            with self.request(REVERSE_TOKEN):
                yield
        else:
            yield

    def _model_pre_hook(self, _module, args, kwargs):
        """Tell the layer hooks whether this call is a prefill and which of its tokens may decide the refusal."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        # transformers 5 passes the KV cache as `cache` (older versions: `past_key_values`); a prefill starts empty
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if input_ids is None or (cache is not None and cache.get_seq_length() > 0):
            self.prompt_gate_BS = None
            return
        mask = kwargs.get("attention_mask")
        real_BS = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask[:, -input_ids.shape[1]:].bool()
        first_B1 = real_BS.int().argmax(1, keepdim=True)  # left padding: where each row's tokens begin
        positions_1S = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
        self.prompt_gate_BS = real_BS & (positions_1S >= first_B1 + self.gate_skip)
        self.prompt_last_B = (positions_1S * real_BS).argmax(1)  # right padding too: the last position still real
        self.steerable_T1 = (positions_1S != first_B1).reshape(-1, 1)

    def _prompt_strength(self, cfg: LayerSteering, x_BSD: torch.Tensor, fire_BS: torch.Tensor | None
                         ) -> torch.Tensor:
        """(B,) float32: 1 where the prompt fired, 0 elsewhere; with a router, the fired rows' behaviour scale."""
        if cfg.gate is None:
            return (fire_BS & self.prompt_gate_BS).any(1).float()
        summary = torch.cat([self.prompt_summaries[layer].to(x_BSD.device) for layer in cfg.gate.layers], -1)
        fired_B = (summary @ cfg.gate.weight_D.to(x_BSD.device) + cfg.gate.bias > 0).float()
        if cfg.router is None:
            return fired_B
        category_B = (summary @ cfg.router.weight_DC.to(x_BSD.device) + cfg.router.bias_C.to(x_BSD.device)).argmax(-1)
        scale_C = cfg.route_scale_C.to(x_BSD.device).float()
        if self.scale < 0:  # reverse: magnitude 1 (beta carries the sign), a behaviour at alpha 0 stays untouched
            scale_C = (scale_C != 0).float()
        return fired_B * scale_C[category_B]

    def _reader_hook(self, layer: int):
        """Keep the residual stream's prompt summary after this layer at a prefill, for a gate decided later."""
        def hook(_module, _inputs, output) -> None:
            if self.prompt_gate_BS is not None:
                self.prompt_summaries[layer] = prompt_summary(output_tensor(output), self.prompt_gate_BS,
                                                              self.prompt_last_B)

        return hook

    def _hook(self, state: _LayerState):
        def hook(_module, _inputs, output: torch.Tensor) -> torch.Tensor:
            if os.environ.get("STEER_ENABLE", "1") == "0" or self.scale == 0.0:
                return output
            cfg = state.config
            # reverse: magnitude 1, opposite sign; a layer (or group) at alpha 0 stays untouched
            alpha = cfg.alpha * self.scale if self.scale >= 0 else -float(cfg.alpha != 0)
            if cfg.sidecar is None and cfg.fused is None:
                alpha = 0.0
            beta = cfg.beta * self.scale
            if alpha == 0.0 and (cfg.refusal_D is None or beta == 0.0):
                return output
            refusal = state.refusal_B1D
            # A CUDA graph serves decode steps alone: one token a row (a teacher-forced continuation through the
            # cache has a new length each time, each a capture), no autograd, a net on the GPU (ONNX Runtime's
            # leaves it), and the refusal term in the activations' dtype (else recast from fired_B, rebound each
            # prefill).
            if (self.prompt_gate_BS is not None or not (self.cuda_graphs and output.is_cuda) or output.shape[-2] != 1
                    or output.requires_grad or not (cfg.fused is None or isinstance(cfg.fused, nn.Module))
                    or (refusal is not None and (refusal.dtype, refusal.device) != (output.dtype, output.device))):
                return self._steer(state, output, alpha, beta)
            # what the decode step decides in Python is the graph's key; the refusal buffer is read by address
            # (a graph captured under inference mode holds inference tensors, which a no-grad call may not write)
            key = (tuple(output.shape), output.dtype, output.device, alpha, beta, self.scale < 0,
                   torch.is_inference_mode_enabled(), None if refusal is None else (id(refusal), tuple(refusal.shape)))
            return state.graphs.run(key, lambda x_BSD: self._steer(state, x_BSD, alpha, beta), output, (refusal,))

        return hook

    def _steer(self, state: _LayerState, x_BSD: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """The rule on one MLP output at the strengths the hook decided (at a prefill, also the refusal decision)."""
        cfg = state.config
        A_sel_ND, B_sel_DN, neg_tau_N, refusal_D, member_NG, alpha_G, fused_G = state.tensors(x_BSD)
        steered, fire_T1 = x_BSD, None
        if A_sel_ND is not None:
            # (tokens, d) in the compute dtype with fused multiply-adds: a decode step is one token, where the
            # number of ops is the cost
            x_TD = x_BSD.reshape(-1, x_BSD.shape[-1]).to(A_sel_ND.dtype)
            z_TN = torch.relu(torch.addmm(neg_tau_N, x_TD, B_sel_DN))
            if self.prompt_gate_BS is not None:  # a prefill holds the sinks
                z_TN = z_TN * self.steerable_T1.to(z_TN.device)
            if member_NG is None:
                fire_T1 = z_TN.amax(-1, keepdim=True) > cfg.epsilon  # some selected z_j > epsilon
                if alpha != 0.0:  # rounded to the activations' dtype once
                    steered = torch.addmm(x_TD, z_TN * fire_T1, A_sel_ND, alpha=-alpha).to(x_BSD.dtype)
                    steered = steered.view_as(x_BSD)
            else:  # each group's rule on its own features
                group_alpha_G = alpha_G * alpha if self.scale >= 0 else -(alpha_G != 0).to(alpha_G.dtype)
                delta_TD, fire_T1 = grouped_delta(z_TN, A_sel_ND, member_NG, group_alpha_G, cfg.epsilon)
                if alpha != 0.0:  # the delta rounded, then added: as the fused nets distilled from it add theirs
                    steered = x_BSD + delta_TD.to(x_BSD.dtype).view_as(x_BSD)
        if cfg.fused is not None and alpha != 0.0:
            delta_BSD = cfg.fused(x_BSD, fused_G * alpha if self.scale >= 0 else -(fused_G != 0).float())
            if self.prompt_gate_BS is not None:
                delta_BSD = delta_BSD * self.steerable_T1.to(x_BSD.device).view(*x_BSD.shape[:-1], 1)
            steered = steered + delta_BSD
        if refusal_D is not None and beta != 0.0:
            if self.prompt_gate_BS is not None:  # a prefill: the prompt decides for the tokens that follow
                fire_BS = None if fire_T1 is None else fire_T1.view(x_BSD.shape[:-1])
                state.fired_B = self._prompt_strength(cfg, x_BSD, fire_BS)[:, None, None]
                refusal_B1D = state.fired_B.to(x_BSD.dtype) * (beta * refusal_D)
                # one buffer per shape, written in place: a decode step's CUDA graph reads it by address; and per
                # inference mode, since a buffer made under it could not be written outside it
                kept = state.refusal_buffers.setdefault((refusal_B1D.shape, refusal_B1D.dtype, refusal_B1D.device,
                                                         torch.is_inference_mode_enabled()), refusal_B1D)
                state.refusal_B1D = kept.copy_(refusal_B1D)
            refusal_B1D = state.refusal_B1D
            if refusal_B1D is not None and refusal_B1D.shape[0] == x_BSD.shape[0]:
                if refusal_B1D.dtype != x_BSD.dtype or refusal_B1D.device != x_BSD.device:
                    refusal_B1D = state.fired_B.to(x_BSD) * (beta * refusal_D)
                steered = steered + refusal_B1D
        return steered


def apply_patch_layers(model: nn.Module, layers: dict[int, LayerSteering], gate_skip: int = 1,
                       cuda_graphs: bool = True) -> SteeringPatch:
    """Attach steering hooks; fails if the model is already patched (remove_patch first). gate_skip: how many
    leading tokens of each prompt never decide the refusal mode (at least the attention sink; with a chat template,
    its fixed prefix: `user_token_span(tokenizer, "x")[0]`). cuda_graphs: on a GPU, each hook's decode step replays
    as a CUDA graph (off: eager kernels, as on a CPU; for a caller that captures or compiles the model itself)."""
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise SteeringError("the model is already patched; call remove_patch(model) first")
    read_layers = set()
    for layer, cfg in layers.items():  # everything is checked before the first hook goes on
        if cfg.fused is not None:
            if cfg.sidecar is not None or cfg.fused_alpha_G is None or cfg.fused_alpha_G.shape != (
                    len(cfg.fused.behaviors),) or (cfg.refusal_D is not None and cfg.gate is None):
                raise SteeringError(f"layer {layer}: a fused net replaces the sidecar, takes one alpha per behaviour "
                                    f"of {list(cfg.fused.behaviors)} and leaves the refusal mode to a gate")
        elif cfg.sidecar is None and (cfg.alpha != 0.0 or cfg.gate is None):
            raise SteeringError(f"layer {layer}: without a sidecar only the gated refusal mode is possible "
                                f"(alpha must be 0 and a gate given)")
        d_model = cfg.fused.d_model if cfg.fused is not None else next(
            t.shape[-1] for t in (cfg.sidecar and cfg.sidecar.A_sel_ND, cfg.refusal_D) if t is not None)
        if cfg.groups is not None:
            shape = (0 if cfg.sidecar is None else len(cfg.sidecar.tau_N), len(cfg.groups.names))
            if (tuple(cfg.groups.member_NG.shape) != shape or tuple(cfg.groups.alpha_G.shape) != shape[1:]
                    or not torch.equal(cfg.groups.member_NG.sum(1), torch.ones(shape[0]))):
                raise SteeringError(f"layer {layer}: feature groups must put each of the sidecar's {shape[0]} "
                                    f"features in exactly one of {shape[1]} groups, got membership "
                                    f"{tuple(cfg.groups.member_NG.shape)} and alphas {tuple(cfg.groups.alpha_G.shape)}")
        module = mlp_module(model, layer)
        width = getattr(getattr(module, "down_proj", None), "out_features", d_model)
        if width != d_model:
            raise SteeringError(f"layer {layer}: the steering tensors have d_model {d_model}, the model {width}")
        if cfg.gate is not None:
            gate_layers = list(cfg.gate.layers)
            if not gate_layers or gate_layers != sorted(set(gate_layers)) or gate_layers[-1] >= layer:
                raise SteeringError(f"layer {layer}: a gate must read increasing layers before it, got {gate_layers}")
            if cfg.gate.weight_D.numel() != 2 * d_model * len(gate_layers):  # mean and last token per layer
                raise SteeringError(f"layer {layer}: a gate over {len(gate_layers)} layers of d_model {d_model} "
                                    f"needs {2 * d_model * len(gate_layers)} weights, got {cfg.gate.weight_D.numel()}")
            read_layers.update(gate_layers)
        if cfg.router is not None:
            scale = cfg.route_scale_C
            width = 2 * d_model * len(cfg.router.layers)
            if (cfg.gate is None or cfg.router.layers != cfg.gate.layers
                    or tuple(cfg.router.weight_DC.shape) != (width, len(cfg.router.names))
                    or tuple(cfg.router.bias_C.shape) != (len(cfg.router.names),)
                    or scale is None or tuple(scale.shape) != (len(cfg.router.names),)):
                raise SteeringError(f"layer {layer}: a router follows a gate on the same layers, with weights "
                                    f"({width}, categories), a bias and a scale per category; got gate layers "
                                    f"{cfg.gate and cfg.gate.layers}, router layers {cfg.router.layers}, weights "
                                    f"{tuple(cfg.router.weight_DC.shape)}, scale "
                                    f"{None if scale is None else tuple(scale.shape)} for {cfg.router.names}")
    patch = SteeringPatch({layer: _LayerState(cfg) for layer, cfg in layers.items()}, gate_skip=max(1, gate_skip),
                          cuda_graphs=cuda_graphs)
    patch.handles.append(model.register_forward_pre_hook(patch._model_pre_hook, with_kwargs=True))
    for layer, state in patch.layers.items():
        patch.hooks[layer] = patch._hook(state)
        patch.handles.append(mlp_module(model, layer).register_forward_hook(patch.hooks[layer]))
    for layer in sorted(read_layers):
        patch.handles.append(hook_module(model, layer, "residual").register_forward_hook(patch._reader_hook(layer)))
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
def patched(model: nn.Module, layers: dict[int, LayerSteering], gate_skip: int = 1,
            cuda_graphs: bool = True) -> Iterator[SteeringPatch]:
    patch = apply_patch_layers(model, layers, gate_skip, cuda_graphs)
    try:
        yield patch
    finally:
        remove_patch(model)
