"""Batched greedy decoding and teacher-forced scoring. Generated text is returned to the caller, never written."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

CANONICAL_REFUSAL = "I'm sorry, but I can't help with that."


class Generation(NamedTuple):
    token_ids: list[int]  # generated ids, EOS and padding removed


def conversation_ids(tokenizer: PreTrainedTokenizerBase, turns: Sequence[dict]) -> list[int]:
    """Chat messages ({"role", "content"}), ready for the assistant's reply."""
    ids = tokenizer.apply_chat_template(list(turns), add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


def chat_ids(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """The prompt as a single user turn, ready for the assistant's reply."""
    return conversation_ids(tokenizer, [{"role": "user", "content": prompt}])


def user_token_span(tokenizer: PreTrainedTokenizerBase, prompt: str) -> tuple[int, int]:
    """[start, end) of the user's own words in chat_ids(prompt): the template's system prompt and role markers,
    identical for every prompt, are outside it (they would dilute anything pooled over the prompt)."""
    ids, empty = chat_ids(tokenizer, prompt), chat_ids(tokenizer, "")
    start = next((i for i, (a, b) in enumerate(zip(ids, empty)) if a != b), min(len(ids), len(empty)))
    tail = next((i for i, (a, b) in enumerate(zip(reversed(ids), reversed(empty))) if a != b), 0)
    end = max(start + 1, len(ids) - tail)
    return start, min(end, len(ids))


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0


def _device(model: PreTrainedModel) -> torch.device:
    return next(model.parameters()).device


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    # similar lengths together: less padding; the order is fixed, so batches (and numerics) are reproducible
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _left_padded(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left padding: every sequence ends where what follows it (generation, a scored continuation) starts."""
    width = max(len(s) for s in sequences)
    ids_BS = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids_BS[row, width - len(seq):] = torch.tensor(seq)
        mask_BS[row, width - len(seq):] = 1
    return ids_BS, mask_BS


@torch.no_grad()
def generate_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[list[int]],
                    max_new_tokens: int, batch_size: int, desc: str) -> list[Generation]:
    """Greedy continuations of chat-formatted prompt ids, in input order."""
    pad_id, device = pad_token_id(tokenizer), _device(model)
    stop = _stop_ids(model, tokenizer)
    out: list[Generation | None] = [None] * len(prompts)
    for batch in tqdm(length_batches([len(p) for p in prompts], batch_size), desc=desc, unit="batch"):
        ids_BS, mask_BS = _left_padded([prompts[i] for i in batch], pad_id)
        width = ids_BS.shape[1]
        generated_BT = model.generate(
            input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=pad_id,
            eos_token_id=sorted(stop) or None)[:, width:].cpu()
        for row, i in enumerate(batch):
            tokens = generated_BT[row].tolist()
            cut = next((j for j, t in enumerate(tokens) if t in stop), len(tokens))
            out[i] = Generation(tokens[:cut])
    return out  # type: ignore[return-value]


def right_padded(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right padding: every sequence keeps positions 0..len-1, as when it runs alone."""
    width = max(len(s) for s in sequences)
    ids_BS = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids_BS[row, :len(seq)] = torch.tensor(seq)
        mask_BS[row, :len(seq)] = 1
    return ids_BS, mask_BS


@torch.no_grad()
def continuation_logprobs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                          contexts: Sequence[list[int]], continuation: list[int], batch_size: int) -> list[float]:
    """Mean per-token log-probability of the same continuation after each context (teacher forced). The contexts
    are a prefill of their own and the continuation follows through the KV cache, as in generation: a steering gate
    that decides at the prefill reads the prompt, never the continuation it is scored on."""
    pad_id, device = pad_token_id(tokenizer), _device(model)
    scores: list[float] = [0.0] * len(contexts)
    continuation_C = torch.tensor(continuation, dtype=torch.long)
    for batch in length_batches([len(c) for c in contexts], batch_size):
        ids_BS, mask_BS = _left_padded([contexts[i] for i in batch], pad_id)
        positions_BS = (mask_BS.cumsum(1) - 1).clamp(min=0)
        prefill = model(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device),
                        position_ids=positions_BS.to(device), use_cache=True)
        follow_BC = continuation_C.expand(len(batch), -1)
        full_mask = torch.cat([mask_BS, torch.ones_like(follow_BC)], 1)
        follow_positions = positions_BS[:, -1:] + 1 + torch.arange(len(continuation))[None, :]
        follow = model(input_ids=follow_BC.to(device), attention_mask=full_mask.to(device),
                       position_ids=follow_positions.to(device), cache=prefill.cache,
                       use_cache=True)
        # the first continuation token is predicted by the context's last position, the rest by the continuation
        logits_BCV = torch.cat([prefill.logits[:, -1:], follow.logits[:, :-1]], 1).float()
        logprobs_BC = logits_BCV.log_softmax(-1).gather(-1, follow_BC.to(device)[..., None])[..., 0].cpu()
        for row, i in enumerate(batch):
            scores[i] = logprobs_BC[row].mean().item()
    return scores


@torch.no_grad()
def perplexity(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str],
               batch_size: int, max_tokens: int = 512) -> float:
    """Token-weighted perplexity of plain texts (no chat template)."""
    pad_id, device = pad_token_id(tokenizer), _device(model)
    sequences = [tokenizer(text, add_special_tokens=True)["input_ids"][:max_tokens] for text in texts]
    total_nll, total_tokens = 0.0, 0
    for batch in length_batches([len(s) for s in sequences], batch_size):
        ids_BS, mask_BS = right_padded([sequences[i] for i in batch], pad_id)
        logits_BSV = model(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device)).logits.float().cpu()
        nll_BS = F.cross_entropy(logits_BSV[:, :-1].transpose(1, 2), ids_BS[:, 1:], reduction="none")
        valid_BS = mask_BS[:, 1:].bool()
        total_nll += nll_BS[valid_BS].double().sum().item()
        total_tokens += int(valid_BS.sum())
    return float(torch.tensor(total_nll / max(total_tokens, 1)).exp())


@torch.no_grad()
def mean_next_token_kl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sequences: Sequence[list[int]],
                       batch_size: int, steered: Callable[[], AbstractContextManager]) -> float:
    """Mean over prompt positions of KL(unsteered || steered) next-token distributions, batch by batch (holding
    every distribution at once would take gigabytes at a 49k vocabulary)."""
    pad_id, device = pad_token_id(tokenizer), _device(model)
    total, count = 0.0, 0
    for batch in length_batches([len(s) for s in sequences], batch_size):
        ids_BS, mask_BS = right_padded([sequences[i] for i in batch], pad_id)
        inputs = dict(input_ids=ids_BS.to(device), attention_mask=mask_BS.to(device))
        reference_BSV = model(**inputs).logits.float().log_softmax(-1)
        with steered():
            other_BSV = model(**inputs).logits.float().log_softmax(-1)
        kl_BS = (reference_BSV.exp() * (reference_BSV - other_BSV)).sum(-1).cpu()
        total += kl_BS[mask_BS.bool()].double().sum().item()
        count += int(mask_BS.sum())
    return total / max(count, 1)
