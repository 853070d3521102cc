"""Latent scoring and ranking: the statistics on known data, and the end-to-end path on the tiny model."""

import json

import pandas as pd
import pytest
import torch

from sae_pipeline.features.ranking import rank_latents, write_ranking
from sae_pipeline.features.scoring import POSITION_BINS, _spearman, auroc_per_column, score_latents
from sae_pipeline.sae.model import TopKSAE


def test_auroc_matches_its_definition_with_ties():
    scores = torch.tensor([[0.9, 1.0], [0.8, 1.0], [0.1, 1.0], [0.4, 1.0]])
    positive = torch.tensor([True, True, False, False])
    assert auroc_per_column(scores, positive).tolist() == [1.0, 0.5]
    assert auroc_per_column(-scores, positive).tolist() == [0.0, 0.5]


def test_spearman_of_monotone_and_reversed_orders():
    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert _spearman(a, a ** 3) == pytest.approx(1.0)
    assert _spearman(a, -a) == pytest.approx(-1.0)


def test_scores_and_ranking_on_the_tiny_model(tiny, tmp_path):
    sae = TopKSAE(64, 32, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    harmful = ["how do I build a weapon", "write malware for me", "steal an identity quickly", "poison a well"]
    benign = ["bake a cake", "sort a list in python", "what is 2 + 2", "plan a trip to Rome"]
    scores = score_latents(tiny.model, tiny.tokenizer, sae, 3, harmful, benign, batch_size=4)
    assert scores.delta_mu_F.shape == scores.auroc_F.shape == (32,)
    assert scores.profile_BF.shape == (POSITION_BINS, 32)
    assert ((0 <= scores.auroc_F) & (scores.auroc_F <= 1)).all()
    assert ((0 <= scores.liveness_F) & (scores.liveness_F <= 1)).all() and scores.liveness_F.sum() > 0
    assert -1 <= scores.rank_stability <= 1 and 0 <= scores.probe_auroc <= 1
    provenance = {"seed": 0, "layer": 3, "step": 0, "sae_hash": "x" * 64,
                  "scoring_hashes": {"dataset_hash": "d" * 64, "cfg_hash": "c" * 64}}
    records = rank_latents(scores, top_n=10, provenance=provenance)
    live = int((scores.liveness_F > 0).sum())
    assert len(records) == min(10, live)
    assert [r["delta_mu"] for r in records] == sorted((r["delta_mu"] for r in records), reverse=True)
    assert set(records[0]) >= {"feature_id", "delta_mu", "refusal_corr", "auroc_harmful", "liveness",
                               "mean_activation", "pos_profile", "seed", "layer", "step", "sae_hash",
                               "scoring_hashes"}
    path = write_ranking(records, tmp_path, layer=3, top_n=10)
    assert path.name == "top10_ranking_l3.json" and json.loads(path.read_text()) == records
    frame = pd.read_parquet(path.with_suffix(".parquet"))
    assert frame["feature_id"].tolist() == [r["feature_id"] for r in records]
    assert pd.read_csv(path.with_suffix(".csv"))["delta_mu"].tolist() == pytest.approx(frame["delta_mu"].tolist())


def test_refusal_direction_is_the_difference_of_continuation_means(tiny):
    from sae_pipeline.evaluation.generation import chat_ids
    from sae_pipeline.features.refusal import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS, refusal_direction

    prompts = ["do a harmful thing", "another request"]

    def independent_mean(openings):
        rows = []
        for prompt in prompts:
            context = chat_ids(tiny.tokenizer, prompt)
            for opening in openings:
                continuation = tiny.tokenizer(opening, add_special_tokens=False)["input_ids"]
                with torch.no_grad():
                    hidden = tiny.model(input_ids=torch.tensor([context + continuation]),
                                        output_hidden_states=True).hidden_states[3]  # after decoder layer 2
                rows.append(hidden[0, len(context) - 1:len(context) + len(continuation) - 1])
        return torch.cat(rows).mean(0)

    direction = refusal_direction(tiny.model, tiny.tokenizer, 2, prompts)
    expected = independent_mean(REFUSAL_OPENINGS) - independent_mean(COMPLIANCE_OPENINGS)
    assert torch.allclose(direction, expected, atol=1e-5)
    with pytest.raises(ValueError, match="at least one harmful prompt"):
        refusal_direction(tiny.model, tiny.tokenizer, 2, [])


def test_a_planted_harm_latent_is_ranked_first_with_its_statistics(tiny):
    """An SAE whose latent 0 reads a direction that harmful prompts carry more than benign ones (the difference of
    the two sets' mean activations) must come out with the largest delta_mu and a high AUROC, and rank first."""
    from sae_pipeline.features.scoring import encode_prompts

    harmful = ["how do I build a weapon", "write malware for me", "steal an identity quickly", "poison a well"]
    benign = ["bake a cake", "sort a list in python", "what is 2 + 2", "plan a trip to Rome"]
    sae = TopKSAE(64, 32, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    means = []
    for group in (harmful, benign):
        codes = encode_prompts(tiny.model, tiny.tokenizer, _identity_sae(), 3, group, "means")
        means.append(codes.pooled_PF.mean(0))
    direction = torch.nn.functional.normalize(means[0] - means[1], dim=0)
    with torch.no_grad():
        sae.W_enc_DF[:, 0] = direction * 50
        sae.b_enc_F[0] = 0.0
    scores = score_latents(tiny.model, tiny.tokenizer, sae, 3, harmful, benign)
    assert int(scores.delta_mu_F.argmax()) == 0 and scores.delta_mu_F[0] > 0
    assert scores.auroc_F[0] >= 0.75
    records = rank_latents(scores, 5, {"seed": 0, "layer": 3, "step": 0, "sae_hash": "h", "scoring_hashes": {}})
    assert records[0]["feature_id"] == 0


def _identity_sae():
    """An 'SAE' whose codes are the positive parts of the activations themselves (k = d_model, identity weights)."""
    sae = TopKSAE(64, 64, 64)
    with torch.no_grad():
        sae.W_enc_DF.copy_(torch.eye(64))
        sae.b_enc_F.zero_()
        sae.b_dec_D.zero_()
        sae.W_dec_FD.copy_(torch.eye(64))
    return sae


def test_user_token_span_covers_exactly_the_users_words(tiny):
    from sae_pipeline.evaluation.generation import chat_ids, user_token_span

    prompt = "How do I kill a python process?"
    start, end = user_token_span(tiny.tokenizer, prompt)
    assert tiny.tokenizer.decode(chat_ids(tiny.tokenizer, prompt)[start:end]) == prompt


def test_batched_user_token_outputs_match_each_prompt_run_alone(tiny):
    from sae_pipeline.evaluation.generation import chat_ids, user_token_span
    from sae_pipeline.features.scoring import user_token_outputs
    from sae_pipeline.model.hooks import layer_outputs

    prompts = ["bake a cake", "sort a list in python quickly and explain why it works", "hi",
               "plan a three-day trip to Rome for two", "what is 2 + 2"]
    seen = {}
    for i, captured in user_token_outputs(tiny.model, tiny.tokenizer, prompts, [1, 3], batch_size=3):
        assert i not in seen
        seen[i] = captured
    assert sorted(seen) == list(range(len(prompts)))
    for i, prompt in enumerate(prompts):  # independently: the prompt alone, unpadded, sliced to the user's words
        start, end = user_token_span(tiny.tokenizer, prompt)
        alone = layer_outputs(tiny.model, torch.tensor([chat_ids(tiny.tokenizer, prompt)]), [1, 3])
        for layer in (1, 3):
            assert seen[i][layer].shape == (end - max(start, 1), 64)
            assert torch.allclose(seen[i][layer], alone[layer][0, max(start, 1):end], atol=1e-5)


def test_tampered_scores_fail_closed(tmp_path):
    from sae_pipeline.features.scoring import LatentScores
    from sae_pipeline.features.store import ScoresLoadError, load_scores, save_scores

    scores = LatentScores(*(torch.zeros(4) for _ in range(5)), torch.zeros(POSITION_BINS, 4), torch.zeros(4),
                          0.5, 0.1, 2, 2)
    save_scores(scores, tmp_path, {"sae_hash": "h"})
    assert load_scores(tmp_path)[1] == {"sae_hash": "h"}
    info = json.loads((tmp_path / "scores.json").read_text())
    del info["probe_auroc"]
    (tmp_path / "scores.json").write_text(json.dumps(info))
    with pytest.raises(ScoresLoadError, match="probe_auroc"):
        load_scores(tmp_path)
    (tmp_path / "scores.safetensors").write_bytes(b"junk")
    with pytest.raises(ScoresLoadError, match="does not match its recorded sha256"):
        load_scores(tmp_path)


def test_saved_scores_are_reused_only_for_the_same_provenance_and_intact(tmp_path):
    from sae_pipeline.features.scoring import LatentScores
    from sae_pipeline.features.store import load_matching_scores, save_scores

    scores = LatentScores(*(torch.arange(4.0) for _ in range(5)), torch.ones(POSITION_BINS, 4), torch.zeros(4),
                          0.5, 0.1, 2, 2)
    provenance = {"sae_hash": "h", "step": 7, "scoring_hashes": {"dataset_hash": "d", "cfg_hash": "c"}}
    assert load_matching_scores(tmp_path, provenance) is None
    save_scores(scores, tmp_path, provenance)
    reused = load_matching_scores(tmp_path, provenance)
    assert reused is not None and torch.equal(reused.delta_mu_F, scores.delta_mu_F)
    assert reused.probe_auroc == scores.probe_auroc
    assert load_matching_scores(tmp_path, {**provenance, "step": 8}) is None
    (tmp_path / "scores.safetensors").write_bytes(b"junk")
    assert load_matching_scores(tmp_path, provenance) is None


def test_probe_gate_fit_respects_the_benign_budget_and_folds_exactly():
    from sae_pipeline.features.gate import fit_probe_gate

    generator = torch.Generator().manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    harmful = torch.randn(120, 16, generator=generator) + 2.5 * direction_D
    benign = torch.randn(120, 16, generator=generator) - 2.5 * direction_D
    fit = fit_probe_gate(harmful, benign, max_benign_fire=0.05)
    assert fit.cv_benign_fire <= 0.05 + 1 / 120 and fit.cv_harmful_fire > 0.9
    # the out-of-fold margins behind those rates: harmful rows first, firing where positive
    assert (fit.cv_margin_N[:len(harmful)] > 0).double().mean() == fit.cv_harmful_fire
    assert (fit.cv_margin_N[len(harmful):] > 0).double().mean() == fit.cv_benign_fire
    scores = lambda x: x.double() @ fit.gate.weight_D.double() + fit.gate.bias  # noqa: E731
    assert (scores(harmful) > 0).double().mean() > 0.9 and (scores(benign) > 0).double().mean() <= 0.1
    # swapping the classes' sides must flip the probe: it reads the data, not the order of the arguments
    flipped = fit_probe_gate(benign, harmful, max_benign_fire=0.05)
    assert float(flipped.gate.weight_D @ fit.gate.weight_D) < 0


def test_probe_gate_holds_borderline_prompts_to_their_own_budget():
    from sae_pipeline.features.gate import BorderlineBudget, fit_probe_gate

    generator = torch.Generator().manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    harmful = torch.randn(150, 16, generator=generator) + 2.0 * direction_D
    benign = torch.cat([torch.randn(200, 16, generator=generator) - 2.5 * direction_D,
                        torch.randn(50, 16, generator=generator) + 0.5 * direction_D])  # borderline: near harmful
    mask_N = torch.arange(250) >= 200
    pooled = fit_probe_gate(harmful, benign, max_benign_fire=0.05)
    held = fit_probe_gate(harmful, benign, max_benign_fire=0.05, borderline=BorderlineBudget(mask_N, 0.04, 3.0))
    borderline_fire = lambda fit: (benign[mask_N].double() @ fit.gate.weight_D.double() + fit.gate.bias > 0  # noqa
                                   ).double().mean().item()
    assert pooled.cv_borderline_fire is None and held.cv_borderline_fire <= 0.04 + 1 / 50
    assert borderline_fire(pooled) > 0.15 > borderline_fire(held)  # the pooled budget is spent on the borderline rows
    assert held.cv_harmful_fire < pooled.cv_harmful_fire  # and holding them costs harmful catches, as it should
    with pytest.raises(ValueError, match="borderline mask must mark some of the 250 benign rows"):
        fit_probe_gate(harmful, benign, borderline=BorderlineBudget(torch.zeros(250, dtype=torch.bool), 0.04, 3.0))


def test_prompt_summaries_read_what_the_runtime_gate_reads(tiny):
    from sae_pipeline.evaluation.generation import chat_ids
    from sae_pipeline.features.gate import prompt_summaries, template_prefix_length
    from sae_pipeline.model.hooks import capture_outputs, run_until_captured

    skip = template_prefix_length(tiny.tokenizer)
    assert tiny.tokenizer.decode(chat_ids(tiny.tokenizer, "x")[:skip]) == "<|im_start|>user\n"
    summaries = prompt_summaries(tiny.model, tiny.tokenizer, [1, 2], ["hello there", "bye"])
    with capture_outputs(tiny.model, [1, 2], site="residual") as captured:
        run_until_captured(tiny.model, torch.tensor([chat_ids(tiny.tokenizer, "bye")]))
    assert summaries[1].shape == summaries[2].shape == (2, 128)
    for layer in (1, 2):
        expected = torch.cat([captured[layer][0, skip:].mean(0), captured[layer][0, -1]])
        assert torch.allclose(summaries[layer][1].float(), expected, atol=1e-6)


def test_the_gate_layer_set_that_separates_best_wins():
    from sae_pipeline.features.gate import choose_gate

    generator = torch.Generator().manual_seed(0)
    direction_D = torch.nn.functional.normalize(torch.randn(16, generator=generator), dim=0)
    noise = {layer: (torch.randn(120, 16, generator=generator), torch.randn(120, 16, generator=generator))
             for layer in (1, 2)}
    harmful = {1: noise[1][0], 2: noise[2][0] + 2.5 * direction_D}  # only layer 2 tells the classes apart
    benign = {1: noise[1][1], 2: noise[2][1] - 2.5 * direction_D}
    fit, records = choose_gate(harmful, benign, [[1], [2], [1, 2]], max_benign_fire=0.05, folds=5)
    assert fit.gate.layers == (2,) and fit.gate.weight_D.shape == (16,)
    assert [r["layers"] for r in records] == ["1", "2", "1,2"]
    assert [r["chosen"] for r in records] == [False, True, False]
    assert records[1]["cv_harmful_fire"] > 0.9 > records[0]["cv_harmful_fire"]
