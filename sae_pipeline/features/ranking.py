"""The ranking: the top latents by delta_mu (harmful minus benign), one record each, as JSON, parquet and CSV."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from sae_pipeline.features.scoring import LatentScores


def rank_latents(scores: LatentScores, top_n: int, provenance: dict) -> list[dict]:
    """Records for the top_n live latents by delta_mu, best first. provenance: seed, layer, step, sae_hash,
    scoring_hashes (dataset_hash, cfg_hash), copied into every record so a row stands on its own."""
    live = torch.nonzero(scores.liveness_F > 0).flatten()
    order = live[torch.argsort(scores.delta_mu_F[live], descending=True, stable=True)][:top_n]
    return [{
        "rank": rank, "feature_id": int(f), "delta_mu": round(float(scores.delta_mu_F[f]), 6),
        "refusal_corr": round(float(scores.refusal_corr_F[f]), 6),
        "auroc_harmful": round(float(scores.auroc_F[f]), 6), "liveness": round(float(scores.liveness_F[f]), 6),
        "mean_activation": round(float(scores.mean_activation_F[f]), 6),
        "pos_profile": [round(float(v), 6) for v in scores.profile_BF[:, f]], **provenance,
    } for rank, f in enumerate(order.tolist())]


def ranking_path(directory: Path, layer: int, top_n: int) -> Path:
    return directory / f"top{top_n}_ranking_l{layer}.json"


def write_ranking(records: list[dict], directory: Path, layer: int, top_n: int) -> Path:
    """The JSON the issue names, plus the same table as parquet and CSV (pos_profile as a JSON string there)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = ranking_path(directory, layer, top_n)
    path.write_text(json.dumps(records, indent=1, sort_keys=True))
    frame = pd.DataFrame([{**r, "pos_profile": json.dumps(r["pos_profile"]),
                           "scoring_hashes": json.dumps(r["scoring_hashes"], sort_keys=True)} for r in records])
    frame.to_parquet(path.with_suffix(".parquet"), index=False)
    frame.to_csv(path.with_suffix(".csv"), index=False)
    return path
