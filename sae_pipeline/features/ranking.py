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
    return [latent_record(scores, f, rank, provenance) for rank, f in enumerate(order.tolist())]


def ranking_provenance(sae_path: Path, seed: int, layer: int, dataset_hash: str, cfg_hash: str) -> dict:
    """What every ranking row carries: seed, layer, the SAE's last training step and hash, the scoring hashes."""
    from sae_pipeline.sae.run import METRICS_FILE

    history = json.loads((sae_path / METRICS_FILE).read_text()).get("history") or [{"step": 0}]
    return {"seed": seed, "layer": layer, "step": int(history[-1]["step"]),
            "sae_hash": json.loads((sae_path / "cfg.json").read_text())["sae_hash"],
            "scoring_hashes": {"dataset_hash": dataset_hash, "cfg_hash": cfg_hash}}


def latent_record(scores: LatentScores, f: int, rank: int, provenance: dict) -> dict:
    """One ranking row (the schema of top512_ranking_l{L}.json)."""
    return {
        "rank": rank, "feature_id": int(f), "delta_mu": round(float(scores.delta_mu_F[f]), 6),
        "refusal_corr": round(float(scores.refusal_corr_F[f]), 6),
        "auroc_harmful": round(float(scores.auroc_F[f]), 6), "liveness": round(float(scores.liveness_F[f]), 6),
        "mean_activation": round(float(scores.mean_activation_F[f]), 6),
        "pos_profile": [round(float(v), 6) for v in scores.profile_BF[:, f]], **provenance}


def ranking_path(directory: Path, layer: int, top_n: int, behavior: str | None = None) -> Path:
    return directory / f"top{top_n}_ranking_l{layer}{'_' + behavior if behavior else ''}.json"


def write_ranking(records: list[dict], directory: Path, layer: int, top_n: int, behavior: str | None = None) -> Path:
    """The JSON the issue names, plus the same table as parquet and CSV (pos_profile as a JSON string there)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = ranking_path(directory, layer, top_n, behavior)
    path.write_text(json.dumps(records, indent=1, sort_keys=True))
    frame = pd.DataFrame([{**r, "pos_profile": json.dumps(r["pos_profile"]),
                           "scoring_hashes": json.dumps(r["scoring_hashes"], sort_keys=True)} for r in records])
    frame.to_parquet(path.with_suffix(".parquet"), index=False)
    frame.to_csv(path.with_suffix(".csv"), index=False)
    return path
