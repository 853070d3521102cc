"""Steering's decode overhead, measured as a ratio in one run: greedy tokens/s with the hooks attached vs without.

The arms alternate prompt by prompt and round by round, in ABBA order (unsteered first, then steered first), so
drift in machine speed and any order effect hit both alike; the overhead is 1 - median(steered) / median(unsteered).
Each figure times a one-token generate (the prefill) and takes it off, so a long context's prefill does not hide in
the decode rate."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
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
    """Decode tokens/s after the prefill."""
    prefill = _generate_seconds(model, input_ids, 1)
    total = _generate_seconds(model, input_ids, new_tokens)
    return (new_tokens - 1) * input_ids.shape[0] / max(total - prefill, 1e-9)


def measure_overhead(model: nn.Module, prompts: Sequence[torch.Tensor], layers: dict[int, LayerSteering],
                     gate_skip: int, new_tokens: int, rounds: int) -> Overhead:
    """prompts: (1, S) input ids each; each arm decodes once untimed first (allocator, kernels, tensor casts)."""

    def steered(input_ids: torch.Tensor, tokens: int) -> float:
        with patched(model, layers, gate_skip):
            return decode_rate(model, input_ids, tokens)

    arms = {"unsteered": lambda input_ids, tokens: decode_rate(model, input_ids, tokens), "steered": steered}
    for measure in arms.values():
        measure(prompts[0], 2)
    rates: dict[str, list[float]] = {"unsteered": [], "steered": []}
    for round_index in range(rounds):
        for prompt_index, input_ids in enumerate(prompts):
            order = list(arms) if (round_index + prompt_index) % 2 == 0 else list(reversed(arms))
            for arm in order:
                rates[arm].append(arms[arm](input_ids, new_tokens))
    overhead = 1 - statistics.median(rates["steered"]) / statistics.median(rates["unsteered"])
    return Overhead(rates["unsteered"], rates["steered"], overhead)
