"""Per behaviour and layer, the top latents by the harmonic mean of two ranks (issue #5): |delta_mu| (this
behaviour's harmful prompts against the benign ones) and the probe's contribution (|standardised weight|). The
harmonic mean leans on the better rank, so the top of either list ranks high, and between two latents with the same
better rank the one also high on the other list comes first."""

from __future__ import annotations

import torch

from sae_pipeline.features.ranking import latent_record
from sae_pipeline.features.scoring import LatentScores


def _ranks_descending(values_F: torch.Tensor) -> torch.Tensor:
    """1 for the largest value; ties broken by latent id (deterministic)."""
    order = torch.argsort(values_F, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


def rank_behavior_latents(scores: LatentScores, behavior: str, top_n: int, provenance: dict
                          ) -> tuple[list[dict], list[int]]:
    """(rows, order): ranking rows for the top_n live latents, best first (the 512 ranking's schema plus behavior,
    the two ranks and their harmonic mean), and every live latent's id in the same order (the cross-talk filter
    draws from it when top latents are rejected)."""
    live = torch.nonzero(scores.liveness_F > 0).flatten()
    delta_rank = _ranks_descending(scores.delta_mu_F[live].abs()).double()
    probe_rank = _ranks_descending(scores.probe_weight_F[live].abs()).double()
    harmonic = 2 * delta_rank * probe_rank / (delta_rank + probe_rank)
    order = torch.argsort(harmonic, stable=True)
    rows = [{**latent_record(scores, int(live[i]), rank, provenance), "behavior": behavior,
             "probe_weight": round(float(scores.probe_weight_F[live[i]]), 6),
             "delta_mu_rank": int(delta_rank[i]), "probe_rank": int(probe_rank[i]),
             "harmonic_rank": round(float(harmonic[i]), 3)}
            for rank, i in enumerate(order[:top_n].tolist())]
    return rows, live[order].tolist()
