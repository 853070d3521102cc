"""Evidence for widening the harmful tuning split: would short, blunt self_harm and chem requests
(data/prompts/harmful_tuning_candidates.jsonl) make the probe gate catch more held-out requests without firing on
more benign ones? The gate is fit as `refusal_gate` fits it (same layer sets, benign and borderline budgets, folds),
once on today's tuning split and once with the candidates added, and both are scored on the held-out split, which
neither fit reads. Candidates sharing half or more of their content words with a held-out request are dropped first
(the session that wrote them had seen the gate's held-out misses, so this is the guard against copying them).
Writes data/evidence/gate_tuning_data.jsonl. Run: python scripts/gate_tuning_data.py"""

import json
import re
from datetime import date

import torch

from sae_pipeline.config import data_dir, load_profile
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import BorderlineBudget, choose_gate, concat_layers, prompt_summaries
from sae_pipeline.model.loading import load_model

CANDIDATES = "prompts/harmful_tuning_candidates.jsonl"


def content_words(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", text.lower()) if len(word) >= 4}


def too_close(prompt: str, heldout: list[str], share: float = 0.5) -> bool:
    words = content_words(prompt)
    return any(len(words & content_words(other)) >= share * max(len(words), 1) for other in heldout)


def main() -> None:
    profile, cfg = load_profile(), load_profile().steering
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    sets = load_prompt_sets()
    heldout_harmful = [r for r in sets.harmful if r.split == "heldout"]
    candidates = [json.loads(line) for line in (data_dir() / CANDIDATES).read_text().splitlines() if line]
    kept = [c for c in candidates if not too_close(c["prompt"], [r.prompt for r in heldout_harmful])]
    print(f"{len(kept)} of {len(candidates)} candidates kept after the overlap guard")
    read = sorted({layer for layers in cfg.gate_layer_sets for layer in layers})

    def summaries(prompts: list[str]) -> dict[int, torch.Tensor]:
        return prompt_summaries(loaded.model, loaded.tokenizer, read, prompts)

    tuning_benign = [r for r in sets.benign if r.split == "tuning"]
    heldout_benign = [r for r in sets.benign if r.split == "heldout"]
    inputs = {"tuning_harmful": summaries([r.prompt for r in sets.harmful if r.split == "tuning"]),
              "candidates": summaries([c["prompt"] for c in kept]),
              "tuning_benign": summaries([r.prompt for r in tuning_benign]),
              "heldout_harmful": summaries([r.prompt for r in heldout_harmful]),
              "heldout_benign": summaries([r.prompt for r in heldout_benign])}
    mask_N = torch.tensor([r.domain == "borderline" for r in tuning_benign])
    borderline = BorderlineBudget(mask_N, cfg.borderline_max_fire, cfg.borderline_weight)
    arms = {"tuning split": inputs["tuning_harmful"],
            "tuning split + candidates": {layer: torch.cat([inputs["tuning_harmful"][layer],
                                                            inputs["candidates"][layer]]) for layer in read}}
    path = data_dir() / "evidence" / "gate_tuning_data.jsonl"
    with path.open("a") as out:
        for arm, harmful in arms.items():
            fit, _ = choose_gate(harmful, inputs["tuning_benign"], cfg.gate_layer_sets, cfg.max_benign_fire,
                                 cfg.gate_folds, borderline)

            def fires(rows: dict[int, torch.Tensor]) -> torch.Tensor:
                x_PD = concat_layers(rows, fit.gate.layers).float()
                return x_PD @ fit.gate.weight_D + fit.gate.bias > 0

            harmful_fire, benign_fire = fires(inputs["heldout_harmful"]), fires(inputs["heldout_benign"])
            borderline_N = torch.tensor([r.domain == "borderline" for r in heldout_benign])
            by_category = {category: round(harmful_fire[torch.tensor([r.category == category for r in
                                                                      heldout_harmful])].float().mean().item(), 4)
                           for category in sorted({r.category for r in heldout_harmful})}
            record = {"arm": arm, "gate_layers": list(fit.gate.layers), "l2": fit.l2,
                      "cv_harmful_fire": round(fit.cv_harmful_fire, 4), "cv_benign_fire": round(fit.cv_benign_fire, 4),
                      "heldout_harmful_fire": round(harmful_fire.float().mean().item(), 4),
                      "heldout_harmful_fire_by_category": by_category,
                      "heldout_benign_fire": round(benign_fire[~borderline_N].float().mean().item(), 4),
                      "heldout_borderline_fire": round(benign_fire[borderline_N].float().mean().item(), 4),
                      "heldout_harmful_missed": [r.id for r, fired in zip(heldout_harmful, harmful_fire) if not fired],
                      "heldout_benign_fired": [r.id for r, fired in zip(heldout_benign, benign_fire) if fired],
                      "candidates_kept": len(kept) if arm != "tuning split" else 0,
                      "dataset_hash": sets.dataset_hash, "model_hash": loaded.model_hash,
                      "date": date.today().isoformat()}
            out.write(json.dumps(record) + "\n")
            print(json.dumps(record))


if __name__ == "__main__":
    main()
