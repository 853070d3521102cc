"""Score every SAE latent of one layer as a harm detector, from the tuning prompts only.

Each prompt runs as a chat turn; the layer's MLP output over the user's own tokens (the chat template's system
prompt and role markers, the same for every prompt, left out) is encoded by the SAE. Per latent:
  delta_mu        E[z | harmful] - E[z | benign], z mean-pooled over each prompt's tokens
  auroc_harmful   how well the pooled z alone separates harmful from benign prompts (Mann-Whitney)
  refusal_corr    Pearson correlation of the pooled z with the model's refusal log-probability
  liveness        share of prompt tokens where the latent fires; mean_activation where it does
  pos_profile     mean z in 8 position deciles of the prompt
and, over all latents, a logistic probe on pooled z (fit on one half of the prompts, AUROC on the other; refit on
all of them, its standardised weights say how much each latent contributes) and the Spearman rank stability of
delta_mu between the two halves."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.evaluation.generation import (
    CANONICAL_REFUSAL, chat_ids, continuation_logprobs, length_batches, pad_token_id, right_padded, user_token_span)
from sae_pipeline.linear import fit_logistic
from sae_pipeline.model.hooks import capture_outputs, run_until_captured
from sae_pipeline.sae.model import TopKSAE

POSITION_BINS = 8


class PromptCodes(NamedTuple):
    pooled_PF: torch.Tensor  # mean z over each prompt's tokens
    bin_sums_PBF: torch.Tensor  # sum of z per position decile (a prompt shorter than 8 tokens leaves bins empty)
    bin_counts_PB: torch.Tensor  # tokens per position decile
    fired_tokens_F: torch.Tensor  # tokens where each latent fired (all prompts)
    activation_sum_F: torch.Tensor  # sum of z where it fired
    tokens: int


class LatentScores(NamedTuple):
    delta_mu_F: torch.Tensor
    auroc_F: torch.Tensor
    refusal_corr_F: torch.Tensor
    liveness_F: torch.Tensor
    mean_activation_F: torch.Tensor
    profile_BF: torch.Tensor  # harmful prompts' mean z per position decile
    probe_weight_F: torch.Tensor  # the all-prompt probe's weight per standardised latent (its contribution)
    probe_auroc: float
    rank_stability: float  # Spearman of delta_mu between the two halves of the prompts
    n_harmful: int
    n_benign: int


@torch.no_grad()
def user_token_outputs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                       layers: Sequence[int], batch_size: int, desc: str = "user tokens"
                       ) -> Iterator[tuple[int, dict[int, torch.Tensor]]]:
    """(index into prompts, layer -> (S, D) MLP output over that prompt's own tokens in its chat turn, never
    position 0, the attention sink), once per prompt: what the feature scores, the screen's sigmas and the behaviour
    layer probes pool. Prompts of similar length run together, right-padded so each keeps its positions, and the
    forward stops after the last layer (2x a prompt per forward on 2 CPU cores: the bare forward's tokens/s)."""
    device = next(model.parameters()).device
    sequences = [chat_ids(tokenizer, p) for p in prompts]
    for batch in tqdm(length_batches([len(s) for s in sequences], batch_size), desc=desc, unit="batch"):
        ids_BS, mask_BS = right_padded([sequences[i] for i in batch], pad_token_id(tokenizer))
        with capture_outputs(model, list(layers)) as captured:
            run_until_captured(model, ids_BS.to(device), mask_BS.to(device))
        for row, i in enumerate(batch):
            start, end = user_token_span(tokenizer, prompts[i])
            yield i, {layer: captured[layer][row, max(start, 1):end] for layer in layers}


@torch.no_grad()
def encode_prompts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sae: TopKSAE, layer: int,
                   prompts: Sequence[str], desc: str, batch_size: int = 16) -> PromptCodes:
    device = next(model.parameters()).device
    sae = sae.to(device)
    pooled, bin_sums, bin_counts = [None] * len(prompts), [None] * len(prompts), [None] * len(prompts)
    fired_F = torch.zeros(sae.n_latents, dtype=torch.float64)
    activation_F = torch.zeros(sae.n_latents, dtype=torch.float64)
    tokens = 0
    for i, captured in user_token_outputs(model, tokenizer, prompts, [layer], batch_size, desc):
        acts_SD = captured[layer].float()
        codes = sae.encode(acts_SD)
        z_SF = torch.zeros(acts_SD.shape[0], sae.n_latents, device=device).scatter_(
            1, codes.top_indices, codes.top_acts).cpu()
        pooled[i] = z_SF.mean(0)
        chunks = z_SF.tensor_split(POSITION_BINS)
        bin_sums[i] = torch.stack([chunk.sum(0) for chunk in chunks])
        bin_counts[i] = torch.tensor([len(chunk) for chunk in chunks])
        fired_F += (z_SF > 0).sum(0)
        activation_F += z_SF.sum(0)
        tokens += z_SF.shape[0]
    return PromptCodes(torch.stack(pooled), torch.stack(bin_sums), torch.stack(bin_counts), fired_F, activation_F,
                       tokens)


def auroc_per_column(scores_PF: torch.Tensor, positive_P: torch.Tensor) -> torch.Tensor:
    """AUROC of each column as a score for the positive class (ties count half), via ranks."""
    values = scores_PF.double().numpy()
    ranks = np.apply_along_axis(_average_ranks, 0, values)
    pos = positive_P.numpy().astype(bool)
    n_pos, n_neg = pos.sum(), (~pos).sum()
    u = ranks[pos].sum(0) - n_pos * (n_pos + 1) / 2
    return torch.from_numpy(u / (n_pos * n_neg))


def _average_ranks(column: np.ndarray) -> np.ndarray:
    order = np.argsort(column, kind="stable")
    ranks = np.empty(len(column))
    ranks[order] = np.arange(1, len(column) + 1)
    values = column[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends):
        if end - start > 1:
            ranks[order[start:end]] = (start + 1 + end) / 2
    return ranks


def _pearson_columns(x_PF: torch.Tensor, y_P: torch.Tensor) -> torch.Tensor:
    x = x_PF.double() - x_PF.double().mean(0)
    y = y_P.double() - y_P.double().mean()
    denominator = x.norm(dim=0) * y.norm()
    return torch.where(denominator > 0, (x * y[:, None]).sum(0) / denominator.clamp(min=1e-12),
                       torch.zeros_like(denominator))


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = (torch.from_numpy(_average_ranks(v.double().numpy())) for v in (a, b))
    return float(_pearson_columns(ra[:, None], rb)[0])


def standardised_probe(x_PF: torch.Tensor, y_P: torch.Tensor, train_P: torch.Tensor, l2: float = 1e-3,
                       balanced: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight_F, logits_P): a logistic probe on x standardised with the training rows' statistics."""
    x = x_PF.double()
    mean, std = x[train_P].mean(0), x[train_P].std(0).clamp(min=1e-6)
    x = (x - mean) / std
    weight_F, bias = fit_logistic(x[train_P], y_P[train_P], l2, balanced=balanced, max_iter=200)
    return weight_F, (x @ weight_F + bias).detach()


def probe_auroc(x_PF: torch.Tensor, y_P: torch.Tensor, train_P: torch.Tensor, l2: float = 1e-3) -> float:
    """Logistic probe on standardised features, fit on the train rows, AUROC on the others."""
    _, logits_P = standardised_probe(x_PF, y_P, train_P, l2)
    return float(auroc_per_column(logits_P[~train_P][:, None], y_P[~train_P].bool())[0])


def score_latents(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, sae: TopKSAE, layer: int,
                  harmful: Sequence[str], benign: Sequence[str], batch_size: int = 16) -> LatentScores:
    codes = encode_prompts(model, tokenizer, sae, layer, list(harmful) + list(benign), f"encode L{layer}",
                           batch_size)
    n_harmful = len(harmful)
    is_harmful_P = torch.tensor([True] * n_harmful + [False] * len(benign))
    pooled_PF = codes.pooled_PF
    contexts = [chat_ids(tokenizer, p) for p in list(harmful) + list(benign)]
    refusal_ids = tokenizer(CANONICAL_REFUSAL, add_special_tokens=False)["input_ids"]
    refusal_logprob_P = torch.tensor(continuation_logprobs(model, tokenizer, contexts, refusal_ids, batch_size))
    delta_mu_F = pooled_PF[is_harmful_P].mean(0) - pooled_PF[~is_harmful_P].mean(0)
    half_P = torch.arange(len(is_harmful_P)) % 2 == 0  # deterministic halves, both classes in each

    def delta(mask_P: torch.Tensor) -> torch.Tensor:
        return pooled_PF[mask_P & is_harmful_P].mean(0) - pooled_PF[mask_P & ~is_harmful_P].mean(0)

    live_F = codes.fired_tokens_F > 0
    return LatentScores(
        delta_mu_F=delta_mu_F,
        auroc_F=auroc_per_column(pooled_PF, is_harmful_P),
        refusal_corr_F=_pearson_columns(pooled_PF, refusal_logprob_P).float(),
        liveness_F=(codes.fired_tokens_F / max(codes.tokens, 1)).float(),
        mean_activation_F=torch.where(live_F, codes.activation_sum_F / codes.fired_tokens_F.clamp(min=1),
                                      torch.zeros_like(codes.activation_sum_F)).float(),
        # token-weighted mean per decile over the harmful prompts; a decile no prompt reached stays 0
        profile_BF=codes.bin_sums_PBF[is_harmful_P].sum(0)
        / codes.bin_counts_PB[is_harmful_P].sum(0).clamp(min=1)[:, None],
        # class-balanced: one behaviour's ~46 prompts against ~1,000 benign would otherwise tilt the weights
        probe_weight_F=standardised_probe(pooled_PF, is_harmful_P.double(), torch.ones_like(is_harmful_P),
                                          balanced=True)[0].float(),
        probe_auroc=probe_auroc(pooled_PF, is_harmful_P.double(), half_P),
        rank_stability=_spearman(delta(half_P)[live_F], delta(~half_P)[live_F]),
        n_harmful=n_harmful, n_benign=len(benign))
