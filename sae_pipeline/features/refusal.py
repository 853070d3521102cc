"""The refusal direction: what the model's residual stream holds when it refuses rather than complies.

For each tuning harmful prompt the chat turn is teacher-forced twice, once followed by a fixed refusal opening and
once by a fixed compliance opening (fixed texts: no model completion is generated or stored). The direction at a
layer is the mean residual over the continuation tokens, refusal minus compliance, averaged over prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.model.hooks import decoder_layers

REFUSAL_OPENINGS = ("I'm sorry, but I can't help with that.", "I cannot assist with this request.",
                    "I won't provide that information.")
COMPLIANCE_OPENINGS = ("Sure! Here is what you asked for.", "Of course. Here's how to do that:",
                       "Certainly, here are the steps.")


@torch.no_grad()
def _mean_continuation_residual(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int,
                                prompts: Sequence[str], openings: Sequence[str]) -> torch.Tensor:
    device = next(model.parameters()).device
    layer_module = decoder_layers(model)[layer]
    captured = {}
    handle = layer_module.register_forward_hook(
        lambda _m, _i, out: captured.__setitem__("h", (out[0] if isinstance(out, tuple) else out).detach()))
    total, count = None, 0
    try:
        for prompt in prompts:
            context = chat_ids(tokenizer, prompt)
            for opening in openings:
                continuation = tokenizer(opening, add_special_tokens=False)["input_ids"]
                model(input_ids=torch.tensor([context + continuation], device=device), use_cache=False)
                # positions whose next-token prediction is part of the continuation
                h_SD = captured["h"][0, len(context) - 1:len(context) + len(continuation) - 1].float().cpu()
                total = h_SD.sum(0) if total is None else total + h_SD.sum(0)
                count += h_SD.shape[0]
    finally:
        handle.remove()
    return total / count


def refusal_direction(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int,
                      harmful_prompts: Sequence[str]) -> torch.Tensor:
    """(d_model,) mean residual after `layer`: refusal continuations minus compliance continuations."""
    if not harmful_prompts:
        raise ValueError("refusal_direction needs at least one harmful prompt")
    refuse_D = _mean_continuation_residual(model, tokenizer, layer, harmful_prompts, REFUSAL_OPENINGS)
    comply_D = _mean_continuation_residual(model, tokenizer, layer, harmful_prompts, COMPLIANCE_OPENINGS)
    return refuse_D - comply_D
