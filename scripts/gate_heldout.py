"""Evidence for two ways to widen the probe gate, each fit as `refusal_gate` fits it (benign and borderline budgets,
folds, L2 and threshold by cross-validation on the tuning prompts) and scored on the held-out split, which no fit
reads (`data/evidence/gate_heldout.jsonl`, one row per arm):
- "tuning data": short, blunt self_harm and chem requests (data/prompts/harmful_tuning_candidates.jsonl) added to the
  harmful tuning prompts. Candidates sharing half or more of their content words with a held-out request are dropped
  first: the session that wrote them had seen the gate's held-out misses.
- "layer sets": residual layers 12 and 14 beside the configured sets (the refusal layer is 15; a gate reads layers
  before it), each set alone; `choose_gate`'s rule (most out-of-fold harmful fire, ties to fewer layers) marks the
  one it would take.
Run: python scripts/gate_heldout.py"""

import json
import re
from datetime import date

import torch

from sae_pipeline.config import data_dir, load_profile
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import BorderlineBudget, choose_gate, gate_fires, prompt_summaries
from sae_pipeline.model.loading import load_model

CANDIDATES = "prompts/harmful_tuning_candidates.jsonl"
EXTRA_LAYER_SETS = [[12], [14], [12, 13], [13, 14], [12, 13, 14]]


def content_words(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z]+", text.lower()) if len(word) >= 4}


def too_close(prompt: str, heldout: list[str], share: float = 0.5) -> bool:
    words = content_words(prompt)
    return any(len(words & content_words(other)) >= share * max(len(words), 1) for other in heldout)


def main() -> None:
    profile = load_profile()
    cfg = profile.steering
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    sets = load_prompt_sets()
    heldout_harmful = [r for r in sets.harmful if r.split == "heldout"]
    tuning_benign = [r for r in sets.benign if r.split == "tuning"]
    heldout_benign = [r for r in sets.benign if r.split == "heldout"]
    candidates = [json.loads(line) for line in (data_dir() / CANDIDATES).read_text().splitlines() if line]
    kept = [c for c in candidates if not too_close(c["prompt"], [r.prompt for r in heldout_harmful])]
    layer_sets = [list(layers) for layers in cfg.gate_layer_sets] + EXTRA_LAYER_SETS
    read = sorted({layer for layers in layer_sets for layer in layers})

    def summaries(prompts: list[str]) -> dict[int, torch.Tensor]:
        return prompt_summaries(loaded.model, loaded.tokenizer, read, prompts)

    tuning_harmful = summaries([r.prompt for r in sets.harmful if r.split == "tuning"])
    with_candidates = {layer: torch.cat([tuning_harmful[layer], rows])
                       for layer, rows in summaries([c["prompt"] for c in kept]).items()}
    tuning_benign_x = summaries([r.prompt for r in tuning_benign])
    heldout_harmful_x = summaries([r.prompt for r in heldout_harmful])
    heldout_benign_x = summaries([r.prompt for r in heldout_benign])
    borderline = BorderlineBudget(torch.tensor([r.domain == "borderline" for r in tuning_benign]),
                                  cfg.borderline_max_fire, cfg.borderline_weight)
    heldout_borderline_N = torch.tensor([r.domain == "borderline" for r in heldout_benign])
    # question, arm, harmful tuning inputs, the layer sets the arm chooses among
    arms = [("tuning data", "tuning split", tuning_harmful, cfg.gate_layer_sets),
            ("tuning data", "tuning split + candidates", with_candidates, cfg.gate_layer_sets)]
    arms += [("layer sets", ",".join(map(str, layers)), tuning_harmful, [layers]) for layers in layer_sets]
    fits = {arm: choose_gate(harmful, tuning_benign_x, sets_, cfg.max_benign_fire, cfg.gate_folds, borderline)[0]
            for _, arm, harmful, sets_ in arms}
    chosen = max((arm for question, arm, _, _ in arms if question == "layer sets"),
                 key=lambda arm: (fits[arm].cv_harmful_fire, -len(fits[arm].gate.layers)))
    with (data_dir() / "evidence" / "gate_heldout.jsonl").open("a") as out:
        for question, arm, _, _ in arms:
            fit = fits[arm]
            harmful_fire, benign_fire = gate_fires(fit.gate, heldout_harmful_x), gate_fires(fit.gate, heldout_benign_x)
            by_category = {category: round(harmful_fire[torch.tensor(
                [r.category == category for r in heldout_harmful])].float().mean().item(), 4)
                for category in sorted({r.category for r in heldout_harmful})}
            record = {"question": question, "arm": arm, "gate_layers": list(fit.gate.layers), "l2": fit.l2,
                      "cv_harmful_fire": round(fit.cv_harmful_fire, 4), "cv_benign_fire": round(fit.cv_benign_fire, 4),
                      "heldout_harmful_fire": round(harmful_fire.float().mean().item(), 4),
                      "heldout_harmful_fire_by_category": by_category,
                      "heldout_benign_fire": round(benign_fire[~heldout_borderline_N].float().mean().item(), 4),
                      "heldout_borderline_fire": round(benign_fire[heldout_borderline_N].float().mean().item(), 4),
                      "heldout_harmful_missed": [r.id for r, fired in zip(heldout_harmful, harmful_fire) if not fired],
                      "heldout_benign_fired": [r.id for r, fired in zip(heldout_benign, benign_fire) if fired],
                      "candidates_kept": len(kept) if arm.endswith("candidates") else 0,
                      "rule_would_choose": arm == chosen if question == "layer sets" else None,
                      "dataset_hash": sets.dataset_hash, "model_hash": loaded.model_hash,
                      "date": date.today().isoformat()}
            out.write(json.dumps(record) + "\n")
            print(json.dumps({k: record[k] for k in ("question", "arm", "cv_harmful_fire", "heldout_harmful_fire",
                                                     "heldout_harmful_fire_by_category", "heldout_benign_fire",
                                                     "heldout_borderline_fire", "rule_would_choose")}))


if __name__ == "__main__":
    main()
