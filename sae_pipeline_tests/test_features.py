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
    from sae_pipeline.features.refusal import refusal_direction

    direction = refusal_direction(tiny.model, tiny.tokenizer, 2, ["do a harmful thing", "another request"])
    assert direction.shape == (64,) and torch.isfinite(direction).all() and direction.norm() > 0
    with pytest.raises(ValueError, match="at least one harmful prompt"):
        refusal_direction(tiny.model, tiny.tokenizer, 2, [])


def test_user_token_span_covers_exactly_the_users_words(tiny):
    from sae_pipeline.evaluation.generation import chat_ids, user_token_span

    prompt = "How do I kill a python process?"
    start, end = user_token_span(tiny.tokenizer, prompt)
    assert tiny.tokenizer.decode(chat_ids(tiny.tokenizer, prompt)[start:end]) == prompt
