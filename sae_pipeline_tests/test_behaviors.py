"""Behaviour dictionaries: layer choice by probe AUROC, the harmonic-rank ranking and the cross-talk filter."""

import pytest
import torch

from sae_pipeline.behaviors.crosstalk import select_without_crosstalk
from sae_pipeline.behaviors.layers import choose_behavior_layers
from sae_pipeline.behaviors.ranking import rank_behavior_latents
from sae_pipeline.features.scoring import POSITION_BINS, LatentScores


def test_each_behavior_keeps_the_layers_where_a_probe_tells_it_from_benign():
    generator = torch.Generator().manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)
    behaviors = ["chem"] * 40 + ["fraud"] * 40
    harmful = {layer: torch.randn(80, 8, generator=generator) for layer in (1, 2, 3)}
    benign = {layer: torch.randn(120, 8, generator=generator) for layer in (1, 2, 3)}
    harmful[2][:40] += 3 * direction_D  # chem stands out at layer 2, fraud at layer 3
    harmful[3][40:] += 3 * direction_D
    choice = choose_behavior_layers(harmful, behaviors, benign, max_layers=2)
    assert choice.layers["chem"][0] == 2 and choice.layers["fraud"][0] == 3
    assert all(len(layers) == 2 for layers in choice.layers.values())
    assert choice.auroc["chem"][2] > 0.95 > choice.auroc["chem"][1]


def _scores(delta, weight, liveness):
    n = len(delta)
    return LatentScores(torch.tensor(delta), torch.full((n,), 0.6), torch.zeros(n), torch.tensor(liveness),
                        torch.ones(n), torch.zeros(POSITION_BINS, n), torch.tensor(weight), 0.9, 0.5, 10, 10)


def test_the_harmonic_rank_leans_on_the_better_rank_and_skips_dead_latents():
    # |delta| ranks (live): 0 -> 1, 1 -> 2, 4 -> 3, 3 -> 4; |weight| ranks: 3 -> 1, 1 -> 2, 4 -> 3, 0 -> 4; 2 is dead
    scores = _scores([0.9, 0.5, 0.8, 0.1, 0.45], [0.0, 0.4, 0.9, 0.5, 0.3], [0.1, 0.1, 0.0, 0.1, 0.1])
    rows, order = rank_behavior_latents(scores, "cyber", 3, {"layer": 11, "sae_hash": "h"})
    assert [r["feature_id"] for r in rows] == [0, 3, 1]  # harmonic 1.6, 1.6, 2.0; 4 (3.0) is cut, 2 never enters
    assert order == [0, 3, 1, 4]  # every live latent, for the cross-talk filter to draw on
    assert [r["harmonic_rank"] for r in rows] == [1.6, 1.6, 2.0]
    first = rows[0]
    assert first["behavior"] == "cyber" and first["rank"] == 0 and first["layer"] == 11
    assert (first["delta_mu_rank"], first["probe_rank"]) == (1, 4)
    assert {"delta_mu", "refusal_corr", "auroc_harmful", "liveness", "mean_activation", "pos_profile"} <= set(first)


def test_crosstalk_takes_turns_deflates_flagged_directions_and_reports_pairs():
    eye = torch.eye(16, dtype=torch.float64)
    near = 0.06 * eye[0] + (1 - 0.06 ** 2) ** 0.5 * eye[5]  # |cos| 0.06 with e0
    close = torch.nn.functional.normalize(eye[1] + 0.5 * eye[6], dim=0)  # |cos| 0.89 with e1
    W_dec_FD = torch.stack([eye[0], eye[1], eye[2], near, eye[7], close])
    ranked = {"chem": [0, 1, 2], "bio": [3, 5, 4]}
    result = select_without_crosstalk(ranked, W_dec_FD, keep=3, max_cos=0.05, flagged_max_cos=0.07)
    chem, bio = result.selections["chem"], result.selections["bio"]
    # turns: bio fixes `close` before chem reaches e1, which then lies too close to it (a greedy chem-first pass
    # would have taken e1 and left bio without `close`); deflating e1 against `close` leaves 0.45 of it: dropped
    assert chem.feature_ids == [0, 2] and chem.flagged == [False, False]
    assert bio.feature_ids == [3, 5, 4] and bio.flagged == [True, False, False]  # `near` admitted after deflation
    assert abs(bio.raw_max_cos[0] - 0.06) < 1e-3
    assert float((bio.directions_ND[0] @ chem.directions_ND.T).abs().max()) < 1e-9
    assert result.pair_max_cos["chem|bio"] <= 0.05 and result.shortfall == {"chem": 1, "bio": 0}


def test_a_deflated_direction_still_too_close_to_the_others_is_not_admitted():
    eye = torch.eye(8, dtype=torch.float64)
    leaning = torch.nn.functional.normalize(eye[0] + 0.75 * eye[1], dim=0)  # |cos| 0.6 with e0
    W_dec_FD = torch.stack([eye[0], leaning, eye[0], eye[3]])
    # U = [e0, leaning] is not orthonormal: e0 - U(U^T e0) = -0.6 leaning, whose |cos| with `leaning` is 1
    result = select_without_crosstalk({"chem": [0, 1], "bio": [2, 3]}, W_dec_FD, keep=2, max_cos=0.05,
                                      flagged_max_cos=0.07, min_deflated_norm=0.5)
    assert result.selections["bio"].feature_ids == [3] and result.shortfall["bio"] == 1


def test_the_router_learns_whose_request_it_is_and_routes_as_the_runtime_does():
    from sae_pipeline.behaviors.router import fit_router, route

    generator = torch.Generator().manual_seed(0)
    names = ("chem", "bio", "cyber")
    centres_CD = 3 * torch.randn(3, 8, generator=generator)
    labels = [names[i % 3] for i in range(60)]
    x_PD = centres_CD[[names.index(b) for b in labels]] + torch.randn(60, 8, generator=generator)
    fit = fit_router(x_PD, labels, names, layers=(3, 1), folds=5)
    assert fit.cv_accuracy > 0.95 and fit.router.layers == (1, 3)
    assert sum(fit.cv_confusion["chem"].values()) == 20
    assert sum(fit.cv_confusion[name][name] for name in names) == round(fit.cv_accuracy * 60)
    assert (fit.cv_routed_N == torch.tensor([names.index(b) for b in labels])).double().mean() == fit.cv_accuracy
    assert route(fit.router, x_PD) == [names[i] for i in
                                       (x_PD.float() @ fit.router.weight_DC + fit.router.bias_C).argmax(-1).tolist()]
    assert sum(r == t for r, t in zip(route(fit.router, x_PD), labels)) >= 57
    with pytest.raises(ValueError, match=r"at least 5 prompts per behaviour.*'violence'"):
        fit_router(x_PD, labels[:-1] + ["violence"], names, (1,))


def _metrics(completion: dict[str, float], benign: float = 0.0, perplexity: float = 10.0) -> dict:
    def rate(value: float) -> dict:
        return {"rate": value, "ci_low": max(value - 0.1, 0.0), "ci_high": min(value + 0.1, 1.0), "n": 30}

    return {"harmful_completion_rate": {"overall": rate(sum(completion.values()) / len(completion)),
                                        "per_category": {c: rate(v) for c, v in completion.items()}},
            "benign_false_refusal_rate": {"overall": rate(benign), "borderline": rate(0.0)},
            "capability": {"perplexity": perplexity, "next_token_kl": 0.01,
                           "task_accuracy": {"overall": rate(0.5)}},
            "feature_stability": {"sign_flips": 0}}


def test_behaviour_gates_read_every_category_every_arm_and_the_cross_talk_of_each_alone():
    from sae_pipeline.behaviors.evaluation import ablation_rows, behavior_gate_values, behavioral_crosstalk

    baseline = _metrics({"chem": 0.9, "bio": 0.8})
    arms = {"all": _metrics({"chem": 0.05, "bio": 0.16}, benign=0.02, perplexity=10.05),
            "only_chem": _metrics({"chem": 0.05, "bio": 0.95}, benign=0.04),  # raises bio beyond its CI (0.9)
            "only_bio": _metrics({"chem": 0.85, "bio": 0.10}),
            "reverse": _metrics({"chem": 1.0, "bio": 1.0}, perplexity=10.1)}
    values = behavior_gate_values(baseline, arms, ["chem", "bio"])
    assert values["category_completion_reduction_min"] == 0.8  # bio: 1 - 0.16 / 0.8, the worse category
    assert values["benign_false_refusal_max"] == 0.04  # a behaviour alone counts too
    assert values["behavioral_crosstalk_max"] == 1 and values["perplexity_increase_max"] == 0.005
    assert values["reverse_capability_recovery_min"] == round(10 / 10.1, 9)
    [violation] = behavioral_crosstalk(baseline, {"chem": arms["only_chem"], "bio": arms["only_bio"]})
    assert violation == {"enabled": "chem", "category": "bio", "rate": 0.95, "baseline_ci_high": 0.9}
    rows = ablation_rows(baseline, arms, ["chem", "bio"])
    assert [r["arm"] for r in rows] == ["baseline", "all", "only_chem", "only_bio"]
    assert rows[2]["completion_bio"] == 0.95 and rows[1]["benign_false_refusal"] == 0.02
