"""Evidence beside the per-category reduction gate: could a harm-gate threshold per routed behaviour, instead of one
shared threshold, lift the weakest category's recall within the same benign budget?

On the tuning prompts only, out of fold: the gate refit as refusal_gate fits it (checked equal to the release's)
gives each prompt's out-of-fold margin over its threshold; the router refit as behavior_router fits it gives each
harmful prompt's out-of-fold behaviour (benign prompts take the release's router, as the runtime routes them). Then
(a) the shared threshold and (b) thresholds per routed behaviour, lowered greedily for the behaviour with the lowest
recall while the pooled out-of-fold benign fire stays within the shared threshold's (max-min recall). Appends one
record to data/evidence/behavior_release.jsonl.
Run after behavior_release: python scripts/route_threshold_frontier.py"""

import json
from datetime import date

import torch

from sae_pipeline.behaviors.router import fit_router, route
from sae_pipeline.behaviors.release import read_release
from sae_pipeline.config import artifacts_root, data_dir, load_profile
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.features.gate import BorderlineBudget, concat_layers, fit_probe_gate, prompt_summaries


def max_min_thresholds(harmful_N, label_N, routed_N, benign_N, benign_routed_N, classes: int, budget: int):
    """Per-route thresholds: repeatedly catch the best-scored missed prompt of the least-recalled behaviour by
    lowering its route's threshold, unless the benign fire would pass `budget`."""
    thresholds_C = torch.full((classes,), float("inf"), dtype=torch.float64)
    given_up = torch.zeros(len(harmful_N), dtype=torch.bool)

    def recall(t_C):
        fired_N = harmful_N > t_C[routed_N]
        return torch.stack([fired_N[label_N == c].double().mean() for c in range(classes)]), fired_N

    while True:
        recall_C, fired_N = recall(thresholds_C)
        open_N = ~fired_N & ~given_up
        worst = next((c for c in torch.argsort(recall_C).tolist() if (open_N & (label_N == c)).any()), None)
        if worst is None:
            return thresholds_C, recall(thresholds_C)[0]
        rows = (open_N & (label_N == worst)).nonzero().flatten()
        row = rows[harmful_N[rows].argmax()]
        moved = thresholds_C.clone()
        moved[routed_N[row]] = min(moved[routed_N[row]].item(), harmful_N[row].item() - 1e-9)
        if int((benign_N > moved[benign_routed_N]).sum()) <= budget:
            thresholds_C = moved
        else:
            given_up[row] = True


def main() -> None:
    profile = load_profile()
    release = read_release(artifacts_root() / "behaviors" / "release", accept_failed_gates=True)
    names, layers = release.refusal.router.names, release.refusal.gate.layers
    loaded = ModelResource().load(profile, dtype=profile.evaluation.model_dtype)
    sets = load_prompt_sets()
    harmful = [r for r in sets.harmful if r.split == "tuning" and r.category in names]
    benign = [r for r in sets.benign if r.split == "tuning"]
    summarise = lambda rows, text: concat_layers(  # noqa: E731
        prompt_summaries(loaded.model, loaded.tokenizer, layers, [text(r) for r in rows]), layers)
    harmful_PD, benign_PD = summarise(harmful, lambda r: r.prompt), summarise(benign, lambda r: r.prompt)
    steering = profile.steering
    mask_N = torch.tensor([r.domain == "borderline" for r in benign])
    borderline = BorderlineBudget(mask_N, steering.borderline_max_fire, steering.borderline_weight)
    gate = fit_probe_gate(harmful_PD, benign_PD, steering.max_benign_fire, steering.gate_folds, layers, borderline)
    if gate.gate.weight_D.shape != release.refusal.gate.weight_D.shape or not torch.allclose(
            gate.gate.weight_D, release.refusal.gate.weight_D, rtol=1e-3, atol=1e-6):
        raise SystemExit("the refit gate differs from the release's: materialise refusal_gate and the release again")
    harmful_N, benign_N = gate.cv_margin_N[:len(harmful)], gate.cv_margin_N[len(harmful):]
    router = fit_router(harmful_PD, [r.category for r in harmful], names, layers, steering.gate_folds)
    label_N = torch.tensor([names.index(r.category) for r in harmful])
    benign_routed_N = torch.tensor([names.index(n) for n in route(release.refusal.router, benign_PD)])
    shared_recall = [(harmful_N[label_N == c] > 0).double().mean().item() for c in range(len(names))]
    budget = int((benign_N > 0).sum())  # the gate's own out-of-fold benign fire
    _, per_route_recall = max_min_thresholds(harmful_N, label_N, router.cv_routed_N, benign_N, benign_routed_N,
                                             len(names), budget)
    record = {"design": "harm-gate thresholds per routed behaviour (max-min recall) vs the shared threshold, at the "
                        "gate's benign budget", "gate_layers": list(layers), "gate_l2": gate.l2,
              "router_l2": router.l2, "benign_fire_budget": budget, "benign_prompts": len(benign),
              "cv_recall_shared": dict(zip(names, map(lambda v: round(v, 4), shared_recall))),
              "cv_recall_per_route": dict(zip(names, map(lambda v: round(v, 4), per_route_recall.tolist()))),
              "measured": f"{date.today().isoformat()}, tuning prompts out of fold, SmolLM2 "
                          f"{profile.evaluation.model_dtype}"}
    with (data_dir() / "evidence" / "behavior_release.jsonl").open("a") as out:
        out.write(json.dumps(record, sort_keys=True) + "\n")
    print(record)


if __name__ == "__main__":
    main()
