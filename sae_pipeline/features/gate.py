"""Fit the probe gate that decides the conditional refusal mode.

Inputs are what the runtime hooks see at a prefill: the residual stream after each gate layer, summarised as its mean
over the prompt's tokens past the chat template's fixed prefix and its value at the last token
(`runtime.prompt_summary`), concatenated over the layers (the runtime decides at the refusal layer, after them). The
probe is a class-balanced logistic regression on standardised inputs; its L2 penalty and threshold come from
deterministic k-fold cross-validation on the tuning prompts only: the threshold lets at most `max_benign_fire` of the
out-of-fold benign prompts through, and at most `BorderlineBudget.max_fire` of the borderline-safe ones (which share
words with harmful requests: under a pooled budget the gate spent most of it on them, 5.8 % out of fold at 2 % overall,
data/evidence/gate_borderline.jsonl); the penalty that then catches the most out-of-fold harmful prompts wins.
Standardisation and threshold are folded into (weight_D, bias)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.evaluation.generation import chat_ids, user_token_span
from sae_pipeline.linear import fit_logistic
from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.steering.runtime import ProbeGate, prompt_summary
from sae_pipeline.tensorfiles import TensorFileError, load_tensors, save_tensors

L2_GRID = (1e-3, 1e-2, 1e-1, 1.0)  # with ~1,300 prompts the weakest penalties won most often


class BorderlineBudget(NamedTuple):
    """The borderline-safe benign rows, held to their own out-of-fold fire budget and weighted up in the fit."""
    mask_N: torch.Tensor  # bool over the benign rows
    max_fire: float  # 1.0: their fire is reported, not bounded
    weight: float


class GateFit(NamedTuple):
    gate: ProbeGate
    l2: float
    cv_harmful_fire: float
    cv_benign_fire: float
    cv_borderline_fire: float | None
    cv_by_l2: dict  # l2 -> (harmful fire, benign fire, borderline fire or None) out of fold, for the record
    cv_margin_N: torch.Tensor  # at the chosen L2: each prompt's out-of-fold score minus the threshold, harmful first


def template_prefix_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens before the user's words in a chat turn: the runtime's gate_skip."""
    return user_token_span(tokenizer, "x")[0]


@torch.no_grad()
def prompt_summaries(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layers: Sequence[int],
                     prompts: Sequence[str]) -> dict[int, torch.Tensor]:
    """layer -> (P, 2D) float64: the residual stream after the layer summarised over each chat-formatted prompt, as
    the runtime summarises it."""
    device = next(model.parameters()).device
    skip = max(1, template_prefix_length(tokenizer))
    rows: dict[int, list] = {layer: [] for layer in layers}
    for prompt in tqdm(prompts, desc="prompt summaries", unit="prompt"):
        ids = chat_ids(tokenizer, prompt)
        captured = layer_outputs(model, torch.tensor([ids], device=device), list(layers), site="residual")
        admitted_1S = (torch.arange(len(ids), device=device) >= skip)[None, :]
        last_1 = torch.tensor([len(ids) - 1], device=device)
        for layer in layers:
            rows[layer].append(prompt_summary(captured[layer], admitted_1S, last_1)[0].double().cpu())
    return {layer: torch.stack(r) for layer, r in rows.items()}


def concat_layers(summaries: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """(P, len(layers) * 2D): the gate's input for a layer set, in the runtime's order (increasing layers)."""
    return torch.cat([summaries[layer] for layer in sorted(layers)], 1)


def gate_fires(gate: ProbeGate, summaries: dict[int, torch.Tensor]) -> torch.Tensor:
    """(P,) bool: whether the gate fires on each prompt (summaries from `prompt_summaries`), as the runtime decides."""
    return concat_layers(summaries, gate.layers).float() @ gate.weight_D.float() + gate.bias > 0


def fit_probe_gate(harmful_PD: torch.Tensor, benign_PD: torch.Tensor, max_benign_fire: float = 0.02,
                   folds: int = 5, layers: Sequence[int] = (), borderline: BorderlineBudget | None = None) -> GateFit:
    x_ND = torch.cat([harmful_PD, benign_PD]).double()
    y_N = torch.cat([torch.ones(len(harmful_PD)), torch.zeros(len(benign_PD))]).double()
    mean_D, std_D = x_ND.mean(0), x_ND.std(0).clamp(min=1e-6)
    z_ND = (x_ND - mean_D) / std_D
    borderline_N = torch.zeros(len(y_N), dtype=torch.bool)
    weight_N = torch.ones(len(y_N), dtype=torch.float64)
    if borderline is not None:
        if borderline.mask_N.shape != (len(benign_PD),) or not borderline.mask_N.any():
            raise ValueError(f"the borderline mask must mark some of the {len(benign_PD)} benign rows, got "
                             f"shape {tuple(borderline.mask_N.shape)} with {int(borderline.mask_N.sum())} marked")
        borderline_N[len(harmful_PD):] = borderline.mask_N
        weight_N[borderline_N] = borderline.weight
        weight_N[y_N == 0] /= weight_N[y_N == 0].mean()  # mean 1 per class keeps the class balance
    fold_N = torch.arange(len(y_N)) % folds
    best, by_l2 = None, {}
    for l2 in L2_GRID:
        out_of_fold_N = torch.zeros(len(y_N), dtype=torch.float64)
        for fold in range(folds):
            held = fold_N == fold
            weight, bias = fit_logistic(z_ND[~held], y_N[~held], l2, sample_weight_N=weight_N[~held])
            out_of_fold_N[held] = z_ND[held] @ weight + bias
        threshold = torch.quantile(out_of_fold_N[y_N == 0], 1 - max_benign_fire).item()
        if borderline is not None and borderline.max_fire < 1:
            threshold = max(threshold, torch.quantile(out_of_fold_N[borderline_N], 1 - borderline.max_fire).item())
        fire = lambda rows: (out_of_fold_N[rows] > threshold).double().mean().item()  # noqa: E731
        harmful_fire, benign_fire = fire(y_N == 1), fire(y_N == 0)
        borderline_fire = fire(borderline_N) if borderline is not None else None
        by_l2[l2] = tuple(None if f is None else round(f, 6) for f in (harmful_fire, benign_fire, borderline_fire))
        if best is None or harmful_fire > best[0]:
            best = (harmful_fire, benign_fire, borderline_fire, l2, threshold, out_of_fold_N - threshold)
    harmful_fire, benign_fire, borderline_fire, l2, threshold, margin_N = best
    weight, bias = fit_logistic(z_ND, y_N, l2, sample_weight_N=weight_N)
    # fold standardisation and threshold in: (x - mean)/std . w + b - t  ==  x . (w/std) + (b - t - mean . w/std)
    weight_D = weight / std_D
    folded_bias = float(bias - threshold - mean_D @ weight_D)
    gate = ProbeGate(weight_D.float(), folded_bias, tuple(sorted(layers)))
    return GateFit(gate, l2, harmful_fire, benign_fire, borderline_fire, by_l2, margin_N)


GATE_INFO_FILE = "refusal_gate.json"
# recorded, so a gate fit on other inputs (MLP-output means, before) is refused
GATE_READS = "residual-mean-last"


def save_refusal_gate(directory: Path, layer: int, fit: GateFit, refusal_D: torch.Tensor, provenance: dict) -> dict:
    """gate_l{L}.safetensors, refusal_l{L}.safetensors and refusal_gate.json (the CV record and both sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {"layer": layer, "l2": fit.l2, "cv_harmful_fire": fit.cv_harmful_fire,
            "cv_benign_fire": fit.cv_benign_fire, "cv_borderline_fire": fit.cv_borderline_fire,
            "cv_by_l2": {str(k): v for k, v in fit.cv_by_l2.items()},
            "refusal_norm": float(refusal_D.norm()), **provenance,
            "gate_layers": list(fit.gate.layers), "gate_reads": GATE_READS,
            "gate_sha256": save_tensors(fit.gate.tensors(), directory / f"gate_l{layer}.safetensors"),
            "refusal_sha256": save_tensors({"refusal_D": refusal_D}, directory / f"refusal_l{layer}.safetensors")}
    (directory / GATE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def load_refusal_gate(directory: Path) -> tuple[ProbeGate, torch.Tensor, dict]:
    """(gate, refusal_D, info), both tensor files verified against refusal_gate.json."""
    try:
        info = json.loads((directory / GATE_INFO_FILE).read_text())
        if info.get("gate_reads") != GATE_READS:
            raise ValueError(f"the gate reads {info.get('gate_reads', 'MLP outputs')!r}, the runtime "
                             f"{GATE_READS!r}; materialise refusal_gate again")
        layer = info["layer"]
        gate = load_tensors(directory / f"gate_l{layer}.safetensors", info["gate_sha256"])
        refusal = load_tensors(directory / f"refusal_l{layer}.safetensors", info["refusal_sha256"])
        return ProbeGate.from_tensors(gate), refusal["refusal_D"], info
    except (OSError, ValueError, KeyError) as err:
        raise TensorFileError(f"cannot read the refusal gate in {directory}: {err}") from err


def choose_gate(harmful: dict[int, torch.Tensor], benign: dict[int, torch.Tensor],
                layer_sets: Sequence[Sequence[int]], max_benign_fire: float, folds: int,
                borderline: BorderlineBudget | None = None) -> tuple[GateFit, list[dict]]:
    """Fit a gate on each layer set (inputs from `prompt_summaries`); the one that catches the most out-of-fold
    harmful prompts within the benign budgets wins, ties going to fewer layers. Also returns every set's record."""
    fits = [fit_probe_gate(concat_layers(harmful, layers), concat_layers(benign, layers), max_benign_fire, folds,
                           layers, borderline) for layers in layer_sets]
    best = max(fits, key=lambda fit: (fit.cv_harmful_fire, -len(fit.gate.layers)))
    return best, [{"layers": ",".join(map(str, fit.gate.layers)), "l2": fit.l2, "cv_harmful_fire": fit.cv_harmful_fire,
                   "cv_benign_fire": fit.cv_benign_fire, "cv_borderline_fire": fit.cv_borderline_fire,
                   "chosen": fit is best} for fit in fits]
