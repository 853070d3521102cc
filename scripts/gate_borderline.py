"""Evidence for the probe gate's borderline budget: out-of-fold fire on harmful, benign and borderline-safe tuning
prompts (tuning split only) for each candidate layer set, with the pooled 2 % benign budget alone and with the
borderline prompts held to their own budget at several fit weights (`features.gate.BorderlineBudget`).
Writes data/evidence/gate_borderline.jsonl. Run: python scripts/gate_borderline.py"""

import json
from datetime import date

import torch

from sae_pipeline.config import data_dir, load_profile
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import BorderlineBudget, concat_layers, fit_probe_gate, prompt_summaries
from sae_pipeline.model.loading import load_model

LAYER_SETS = [[11], [13], [14], [11, 13], [13, 14], [11, 14]]
BORDERLINE_BUDGETS = [1.0, 0.03, 0.02, 0.013]  # 1.0: the pooled budget alone
WEIGHTS = [1.0, 3.0, 10.0]


def main() -> None:
    profile = load_profile()
    cfg = profile.steering
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    sets = load_prompt_sets()
    harmful_prompts = [r.prompt for r in sets.harmful if r.split == "tuning"]
    benign_rows = [r for r in sets.benign if r.split == "tuning"]
    mask_N = torch.tensor([r.domain == "borderline" for r in benign_rows])
    layers = sorted({layer for layer_set in LAYER_SETS for layer in layer_set})
    harmful = prompt_summaries(loaded.model, loaded.tokenizer, layers, harmful_prompts)
    benign = prompt_summaries(loaded.model, loaded.tokenizer, layers, [r.prompt for r in benign_rows])
    path = data_dir() / "evidence" / "gate_borderline.jsonl"
    with path.open("w") as out:
        for layer_set in LAYER_SETS:
            for budget in BORDERLINE_BUDGETS:
                for weight in WEIGHTS if budget < 1 else [1.0]:
                    borderline = BorderlineBudget(mask_N, budget, weight)
                    fit = fit_probe_gate(concat_layers(harmful, layer_set), concat_layers(benign, layer_set),
                                         cfg.max_benign_fire, cfg.gate_folds, layer_set, borderline)
                    record = {"layers": layer_set, "benign_budget": cfg.max_benign_fire,
                              "borderline_budget": budget, "borderline_weight": weight, "l2": fit.l2,
                              "cv_harmful_fire": round(fit.cv_harmful_fire, 4),
                              "cv_benign_fire": round(fit.cv_benign_fire, 4),
                              "cv_borderline_fire": round(fit.cv_borderline_fire, 4),
                              "harmful_tuning_prompts": len(harmful_prompts),
                              "benign_tuning_prompts": len(benign_rows), "borderline_tuning_prompts": int(mask_N.sum()),
                              "dataset_hash": sets.dataset_hash, "model_hash": loaded.model_hash,
                              "date": date.today().isoformat()}
                    out.write(json.dumps(record) + "\n")
                    print(layer_set, budget, weight, record["cv_harmful_fire"], record["cv_borderline_fire"])


if __name__ == "__main__":
    main()
