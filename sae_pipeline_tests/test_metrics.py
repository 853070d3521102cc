import numpy as np
import pytest
import torch

from sae_pipeline.config import load_gates
from sae_pipeline.sae.gates import evaluate_sae_gates
from sae_pipeline.sae.metrics import coherence_metrics, reconstruction_metrics, splice_metrics
from sae_pipeline.sae.model import TopKSAE


def test_coherence_matches_a_brute_force_computation():
    W = torch.randn(300, 24)
    unit = torch.nn.functional.normalize(W, dim=1)
    cos = (unit @ unit.T).abs()
    pairs = cos[torch.triu(torch.ones(300, 300, dtype=torch.bool), diagonal=1)].numpy()
    got = coherence_metrics(W, 0.5, chunk=64)
    assert abs(got.mean - pairs.mean()) < 1e-5
    assert abs(got.p95 - np.quantile(pairs, 0.95)) < 2e-4
    assert abs(got.max - pairs.max()) < 1e-6
    assert got.near_duplicates == int((pairs > 0.5).sum())


def test_reconstruction_metrics_on_a_known_sae():
    sae = TopKSAE(4, 8, 4)
    with torch.no_grad():
        sae.W_enc_DF.zero_()
        sae.W_dec_FD.zero_()
        for i in range(4):  # latent i reads and writes coordinate i: exact for non-negative inputs
            sae.W_enc_DF[i, i] = 1
            sae.W_dec_FD[i, i] = 1
    x = torch.rand(100, 4) + 0.1
    metrics = reconstruction_metrics(sae, x)
    assert metrics.r2 > 0.999999 and metrics.mse < 1e-10
    assert metrics.dead_fraction == 0.5  # latents 4..7 never win a top-4 slot with positive activation
    assert metrics.k_active_p50 == 4
    assert metrics.massive_token_fraction == 0 and metrics.r2_ordinary == pytest.approx(metrics.r2)


def test_massive_tokens_cannot_carry_r2_alone():
    """A dictionary that only knows the attention-sink direction scores a high R2 when sinks hold the variance;
    r2_ordinary shows it explains nothing of the other tokens."""
    sae = TopKSAE(4, 8, 1)
    with torch.no_grad():
        sae.W_enc_DF.zero_()
        sae.W_dec_FD.zero_()
        sae.W_enc_DF[0, 0] = sae.W_dec_FD[0, 0] = 1
    ordinary = torch.randn(1000, 4) * torch.tensor([0.0, 1.0, 1.0, 1.0])
    massive = torch.zeros(5, 4)
    massive[:, 0] = 500.0
    metrics = reconstruction_metrics(sae, torch.cat([ordinary, massive]))
    assert metrics.massive_token_fraction == pytest.approx(5 / 1005)
    assert metrics.massive_variance_share > 0.9 and metrics.r2 > 0.9
    assert abs(metrics.r2_ordinary) < 0.01  # the ordinary tokens' variance is all in dims 1..3, left unexplained


def test_zero_sae_splice_recovers_nothing(tiny):
    sae = TopKSAE(64, 16, 2)
    torch.nn.init.zeros_(sae.W_enc_DF)
    torch.nn.init.zeros_(sae.W_dec_FD)
    ids = torch.randint(3, 200, (4, 24))
    splice = splice_metrics(tiny.model, sae, 2, ids, skip_positions=1)
    assert abs(splice.ce_spliced - splice.ce_zero_ablated) < 1e-5
    assert abs(splice.loss_recovered) < 1e-3
    assert splice.kl_spliced > 0


def test_gates_compare_in_the_right_direction():
    good = {"r2": 0.95, "dead_fraction": 0.0, "coherence_p95": 0.05, "near_duplicates": 0}
    assert all(g.passed for g in evaluate_sae_gates(good, load_gates()))
    bad = {**good, "r2": 0.85, "near_duplicates": 1}
    failed = {g.name for g in evaluate_sae_gates(bad, load_gates()) if not g.passed}
    assert failed == {"r2_min", "near_duplicates_max"}
