"""Evidence for the probe gate's inputs: out-of-fold harmful fire at fixed benign budgets, tuning prompts only, for
MLP-output means over the prompt's own tokens (close to what the gate read before 2026-11-29, which also pooled the
assistant header), residual-stream means, and the residual mean + last token the gate reads now
(`features.gate.prompt_summaries`, as the runtime computes it).
Writes data/evidence/gate_inputs.jsonl. Run: python scripts/gate_inputs.py"""

import json
from datetime import date

import torch

from sae_pipeline.behaviors.layers import pooled_mlp_outputs
from sae_pipeline.config import data_dir, load_profile
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import fit_probe_gate, prompt_summaries
from sae_pipeline.model.loading import load_model

LAYERS = [9, 11, 13, 15, 17]
LAYER_SETS = [[9], [11], [13], [15], [17], [11, 13], [13, 15], [15, 17]]
BUDGETS = [0.01, 0.02]


def inputs(model, tokenizer, prompts: list[str]) -> dict[str, dict[int, torch.Tensor]]:
    summaries = prompt_summaries(model, tokenizer, LAYERS, prompts)  # (P, 2D): mean, then last token
    d_model = summaries[LAYERS[0]].shape[1] // 2
    return {"mlp mean": pooled_mlp_outputs(model, tokenizer, LAYERS, prompts),
            "residual mean": {layer: s[:, :d_model] for layer, s in summaries.items()},
            "residual mean+last": summaries}


def main() -> None:
    profile = load_profile()
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    sets = load_prompt_sets()
    harmful_prompts = [r.prompt for r in sets.harmful if r.split == "tuning"]
    benign_prompts = [r.prompt for r in sets.benign if r.split == "tuning"]
    harmful = inputs(loaded.model, loaded.tokenizer, harmful_prompts)
    benign = inputs(loaded.model, loaded.tokenizer, benign_prompts)
    path = data_dir() / "evidence" / "gate_inputs.jsonl"
    with path.open("w") as out:
        for kind in harmful:
            for layers in LAYER_SETS:
                for budget in BUDGETS:
                    fit = fit_probe_gate(torch.cat([harmful[kind][layer] for layer in layers], 1),
                                         torch.cat([benign[kind][layer] for layer in layers], 1), budget,
                                         profile.steering.gate_folds, layers)
                    record = {"inputs": kind, "layers": layers, "benign_budget": budget, "l2": fit.l2,
                              "cv_harmful_fire": round(fit.cv_harmful_fire, 4),
                              "cv_benign_fire": round(fit.cv_benign_fire, 4),
                              "harmful_tuning_prompts": len(harmful_prompts),
                              "benign_tuning_prompts": len(benign_prompts), "dataset_hash": sets.dataset_hash,
                              "model_hash": loaded.model_hash, "date": date.today().isoformat()}
                    out.write(json.dumps(record) + "\n")
                    print(kind, layers, budget, record["cv_harmful_fire"])


if __name__ == "__main__":
    main()
