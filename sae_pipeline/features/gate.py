"""Fit the probe gate that decides the conditional refusal mode.

Inputs are what the runtime hook sees at a prefill: the layer's MLP output averaged over the prompt's tokens past
the chat template's fixed prefix. The probe is a class-balanced logistic regression on standardised inputs; its L2
penalty and threshold come from deterministic k-fold cross-validation on the tuning prompts only: the threshold
lets at most `max_benign_fire` of the out-of-fold benign prompts through, and the penalty that then catches the most
out-of-fold harmful prompts wins. Standardisation and threshold are folded into (weight_D, bias)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.evaluation.generation import chat_ids, user_token_span
from sae_pipeline.linear import fit_logistic
from sae_pipeline.model.hooks import mlp_outputs
from sae_pipeline.steering.runtime import ProbeGate
from sae_pipeline.tensorfiles import TensorFileError, load_tensors, save_tensors

L2_GRID = (1e-2, 1e-1, 1.0, 10.0)


class GateFit(NamedTuple):
    gate: ProbeGate
    l2: float
    cv_harmful_fire: float
    cv_benign_fire: float
    cv_by_l2: dict  # l2 -> (harmful fire, benign fire) out of fold, for the record


def template_prefix_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """Tokens before the user's words in a chat turn: the runtime's gate_skip."""
    return user_token_span(tokenizer, "x")[0]


@torch.no_grad()
def prompt_means(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, layer: int, prompts: Sequence[str]
                 ) -> torch.Tensor:
    """(P, D) mean MLP output over each chat-formatted prompt past the template prefix (float64)."""
    device = next(model.parameters()).device
    skip = max(1, template_prefix_length(tokenizer))
    rows = []
    for prompt in prompts:
        acts_SD = mlp_outputs(model, torch.tensor([chat_ids(tokenizer, prompt)], device=device), [layer])[layer][0]
        rows.append(acts_SD[skip:].double().mean(0).cpu())
    return torch.stack(rows)


def fit_probe_gate(harmful_PD: torch.Tensor, benign_PD: torch.Tensor, max_benign_fire: float = 0.02,
                   folds: int = 5) -> GateFit:
    x_ND = torch.cat([harmful_PD, benign_PD]).double()
    y_N = torch.cat([torch.ones(len(harmful_PD)), torch.zeros(len(benign_PD))]).double()
    mean_D, std_D = x_ND.mean(0), x_ND.std(0).clamp(min=1e-6)
    z_ND = (x_ND - mean_D) / std_D
    fold_N = torch.arange(len(y_N)) % folds
    best, by_l2 = None, {}
    for l2 in L2_GRID:
        out_of_fold_N = torch.zeros(len(y_N), dtype=torch.float64)
        for fold in range(folds):
            held = fold_N == fold
            weight, bias = fit_logistic(z_ND[~held], y_N[~held], l2)
            out_of_fold_N[held] = z_ND[held] @ weight + bias
        threshold = torch.quantile(out_of_fold_N[y_N == 0], 1 - max_benign_fire).item()
        harmful_fire = (out_of_fold_N[y_N == 1] > threshold).double().mean().item()
        benign_fire = (out_of_fold_N[y_N == 0] > threshold).double().mean().item()
        by_l2[l2] = (round(harmful_fire, 6), round(benign_fire, 6))
        if best is None or harmful_fire > best[0]:
            best = (harmful_fire, benign_fire, l2, threshold)
    harmful_fire, benign_fire, l2, threshold = best
    weight, bias = fit_logistic(z_ND, y_N, l2)
    # fold standardisation and threshold in: (x - mean)/std . w + b - t  ==  x . (w/std) + (b - t - mean . w/std)
    weight_D = weight / std_D
    folded_bias = float(bias - threshold - mean_D @ weight_D)
    return GateFit(ProbeGate(weight_D.float(), folded_bias), l2, harmful_fire, benign_fire, by_l2)


GATE_INFO_FILE = "refusal_gate.json"


def save_refusal_gate(directory: Path, layer: int, fit: GateFit, refusal_D: torch.Tensor, provenance: dict) -> dict:
    """gate_l{L}.safetensors, refusal_l{L}.safetensors and refusal_gate.json (the CV record and both sha256)."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {"layer": layer, "l2": fit.l2, "cv_harmful_fire": fit.cv_harmful_fire,
            "cv_benign_fire": fit.cv_benign_fire, "cv_by_l2": {str(k): v for k, v in fit.cv_by_l2.items()},
            "refusal_norm": float(refusal_D.norm()), **provenance,
            "gate_sha256": save_tensors({"weight_D": fit.gate.weight_D, "bias": torch.tensor([fit.gate.bias])},
                                        directory / f"gate_l{layer}.safetensors"),
            "refusal_sha256": save_tensors({"refusal_D": refusal_D}, directory / f"refusal_l{layer}.safetensors")}
    (directory / GATE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
    return info


def load_refusal_gate(directory: Path) -> tuple[ProbeGate, torch.Tensor, dict]:
    """(gate, refusal_D, info), both tensor files verified against refusal_gate.json."""
    try:
        info = json.loads((directory / GATE_INFO_FILE).read_text())
        layer = info["layer"]
        gate = load_tensors(directory / f"gate_l{layer}.safetensors", info["gate_sha256"])
        refusal = load_tensors(directory / f"refusal_l{layer}.safetensors", info["refusal_sha256"])
        return ProbeGate(gate["weight_D"], float(gate["bias"][0])), refusal["refusal_D"], info
    except (OSError, ValueError, KeyError) as err:
        raise TensorFileError(f"cannot read the refusal gate in {directory}: {err}") from err
