"""Steering's decode overhead, measured as a ratio in one run: greedy tokens/s with the hooks attached vs without.

The arms alternate prompt by prompt and round by round (two arms: ABBA, unsteered first, then steered first; more
arms: the order rotates), so drift in machine speed and any order effect hit all alike; the overhead is
1 - median(steered) / median(unsteered). `hook_latencies` times the hooks alone, per decode token.
Each figure times a one-token generate (the prefill) and takes it off, so a long context's prefill does not hide in
the decode rate; on a GPU a CUDA graph's capture happens in an untimed generate before both."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
from torch import nn

from sae_pipeline.steering.runtime import LayerSteering, patched


class Overhead(NamedTuple):
    unsteered_tokens_per_s: list[float]
    steered_tokens_per_s: list[float]
    overhead: float  # 1 - median steered / median unsteered


@torch.inference_mode()
def _generate_seconds(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    began = time.perf_counter()
    model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                   pad_token_id=0)
    if input_ids.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began


def decode_rate(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> float:
    """Decode tokens/s after the prefill. On a GPU a two-token generate runs untimed first: its decode step captures
    the hooks' CUDA graphs (once per patch), which no timed generate should pay."""
    if input_ids.is_cuda:
        _generate_seconds(model, input_ids, 2)
    prefill = _generate_seconds(model, input_ids, 1)
    total = _generate_seconds(model, input_ids, new_tokens)
    return (new_tokens - 1) * input_ids.shape[0] / max(total - prefill, 1e-9)


Arm = tuple[dict[int, LayerSteering], int] | Callable[[], AbstractContextManager] | None


def decode_rates(model: nn.Module, prompts: Sequence[torch.Tensor], arms: dict[str, Arm], new_tokens: int,
                 rounds: int) -> dict[str, list[float]]:
    """Decode tokens/s per arm ({name: (layers, gate_skip), a callable returning a context manager that steers the
    model (a peer library), or None for no hooks}), the arms interleaved: each prompt of each round runs every
    arm, the order rotating one place per prompt and round (two arms: ABBA).
    prompts: (1, S) input ids each; each arm decodes once untimed first (allocator, kernels, the GPU's first steps)."""

    def run(arm: str, input_ids: torch.Tensor, tokens: int) -> float:
        if arms[arm] is None:
            return decode_rate(model, input_ids, tokens)
        with arms[arm]() if callable(arms[arm]) else patched(model, *arms[arm]):
            return decode_rate(model, input_ids, tokens)

    names = list(arms)
    for arm in names:  # a whole decode: a GPU's first long-context steps run several times slower
        run(arm, prompts[0], new_tokens)
    rates: dict[str, list[float]] = {arm: [] for arm in names}
    for round_index in range(rounds):
        for prompt_index, input_ids in enumerate(prompts):
            shift = (round_index + prompt_index) % len(names)
            for arm in names[shift:] + names[:shift]:
                rates[arm].append(run(arm, input_ids, new_tokens))
    return rates


def measure_overhead(model: nn.Module, prompts: Sequence[torch.Tensor], layers: dict[int, LayerSteering],
                     gate_skip: int, new_tokens: int, rounds: int) -> Overhead:
    """Steered against unsteered decoding (decode_rates' order)."""
    rates = decode_rates(model, prompts, {"unsteered": None, "steered": (layers, gate_skip)}, new_tokens, rounds)
    overhead = 1 - statistics.median(rates["steered"]) / statistics.median(rates["unsteered"])
    return Overhead(rates["unsteered"], rates["steered"], overhead)


@torch.inference_mode()
def hook_latencies(model: nn.Module, prompt: torch.Tensor, layers: dict[int, LayerSteering], gate_skip: int,
                   acts_by_layer: dict[int, torch.Tensor], cuda_graphs: bool = True) -> list[float]:
    """Seconds per decode token that every hooked layer's steering takes together: after a prefill of `prompt`
    (the refusal decision taken), each layer's hook is called on one token's activation (acts_by_layer: layer ->
    (tokens, d_model), the same token count at every layer), synchronised on a GPU; the first token runs untimed
    (casts, and on a GPU the decode step's CUDA graph capture)."""
    tokens = min(len(acts) for acts in acts_by_layer.values())
    cuda = prompt.is_cuda
    with patched(model, layers, gate_skip, cuda_graphs) as patch:
        model(input_ids=prompt)
        patch.prompt_gate_BS = None  # what a decode step sees
        for layer in layers:
            patch.steer(layer, acts_by_layer[layer][0].view(1, 1, -1))
        out = []
        for index in range(1, tokens):
            steps = [acts_by_layer[layer][index].view(1, 1, -1) for layer in layers]
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            for layer, x in zip(layers, steps):
                patch.steer(layer, x)
            if cuda:
                torch.cuda.synchronize()
            out.append(time.perf_counter() - began)
    return out
