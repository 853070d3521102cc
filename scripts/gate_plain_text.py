"""Evidence for the probe gate's defaults from the training side only: how often a gate fit on the tuning prompts fires
on ordinary text, the benign SAE corpus rendered as the model reads it (no chat turn of its own, as the perplexity
check feeds text), first 256 tokens of each document. The prompt-only cross-validation cannot see this; a gate that
fires on plain text adds the refusal vector to it. Compares the pooled-budget gate at each candidate layer with the
borderline-budget gate evaluated on the held-out sets on 2026-11-29 (features.gate.BorderlineBudget: 2 %, weight 10).
Writes data/evidence/gate_plain_text.jsonl. Run: python scripts/gate_plain_text.py"""

import json
from datetime import date

import torch

from sae_pipeline.config import data_dir, load_profile
from sae_pipeline.corpus.build import iter_documents, render_document
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import BorderlineBudget, fit_probe_gate, prompt_summaries, template_prefix_length
from sae_pipeline.layout import corpus_dir
from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.model.loading import load_model
from sae_pipeline.steering.runtime import prompt_summary

LAYERS = [11, 13, 14]
DOCUMENTS = 300
MAX_TOKENS = 256
BORDERLINE_BUDGET, BORDERLINE_WEIGHT = 0.02, 10.0


@torch.no_grad()
def plain_text_summaries(model, tokenizer, texts: list[str], skip: int) -> dict[int, torch.Tensor]:
    rows: dict[int, list] = {layer: [] for layer in LAYERS}
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][:MAX_TOKENS]
        captured = layer_outputs(model, torch.tensor([ids]), LAYERS, site="residual")
        admitted_1S = (torch.arange(len(ids)) >= skip)[None, :]
        for layer in LAYERS:
            rows[layer].append(prompt_summary(captured[layer], admitted_1S, torch.tensor([len(ids) - 1]))[0].double())
    return {layer: torch.stack(r) for layer, r in rows.items()}


def main() -> None:
    profile = load_profile()
    cfg = profile.steering
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    sets = load_prompt_sets()
    harmful = prompt_summaries(loaded.model, loaded.tokenizer, LAYERS,
                               [r.prompt for r in sets.harmful if r.split == "tuning"])
    benign_rows = [r for r in sets.benign if r.split == "tuning"]
    benign = prompt_summaries(loaded.model, loaded.tokenizer, LAYERS, [r.prompt for r in benign_rows])
    documents = [render_document(d, loaded.tokenizer) for _, d in zip(range(DOCUMENTS),
                                                                        iter_documents(corpus_dir(profile)))]
    plain = plain_text_summaries(loaded.model, loaded.tokenizer, documents,
                                 max(1, template_prefix_length(loaded.tokenizer)))
    mask_N = torch.tensor([r.domain == "borderline" for r in benign_rows])
    designs = {"pooled budget": None,
               "borderline budget": BorderlineBudget(mask_N, BORDERLINE_BUDGET, BORDERLINE_WEIGHT)}
    with (data_dir() / "evidence" / "gate_plain_text.jsonl").open("w") as out:
        for layer in LAYERS:
            for design, borderline in designs.items():
                fit = fit_probe_gate(harmful[layer], benign[layer], cfg.max_benign_fire, cfg.gate_folds, [layer],
                                     borderline)
                fires = (plain[layer].float() @ fit.gate.weight_D + fit.gate.bias > 0).double().mean().item()
                record = {"layers": [layer], "design": design, "cv_harmful_fire": round(fit.cv_harmful_fire, 4),
                          "cv_benign_fire": round(fit.cv_benign_fire, 4),
                          "plain_text_fire": round(fires, 4), "plain_text_documents": len(documents),
                          "max_tokens": MAX_TOKENS, "dataset_hash": sets.dataset_hash,
                          "model_hash": loaded.model_hash, "date": date.today().isoformat()}
                out.write(json.dumps(record) + "\n")
                print(record)


if __name__ == "__main__":
    main()
