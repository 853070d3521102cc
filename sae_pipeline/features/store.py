"""Persist and reload latent scores (tensors as safetensors, scalars as JSON), keyed by what made them."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_pipeline.features.scoring import LatentScores
from sae_pipeline.hashing import file_sha256

_TENSORS = ("delta_mu_F", "auroc_F", "refusal_corr_F", "liveness_F", "mean_activation_F", "profile_BF",
            "probe_weight_F")


SCORES_VERSION = 2  # 2: adds probe_weight_F


class ScoresLoadError(RuntimeError):
    """Saved scores are missing, from an older version, or do not match their recorded sha256."""


def save_scores(scores: LatentScores, directory: Path, provenance: dict) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({name: getattr(scores, name).float().contiguous() for name in _TENSORS}, directory / "scores.safetensors")
    sha256 = file_sha256(directory / "scores.safetensors")
    summary = {name: getattr(scores, name) for name in LatentScores._fields if name not in _TENSORS}
    info = {**summary, "version": SCORES_VERSION, "scores_sha256": sha256, "provenance": provenance}
    (directory / "scores.json").write_text(json.dumps(info, indent=2, sort_keys=True))
    return sha256


def load_scores(directory: Path) -> tuple[LatentScores, dict]:
    try:
        info = json.loads((directory / "scores.json").read_text())
        if info.get("version") != SCORES_VERSION:
            raise ScoresLoadError(f"{directory} holds scores of version {info.get('version', 1)}, this code reads "
                                  f"{SCORES_VERSION}; materialise feature_scores again")
        if file_sha256(directory / "scores.safetensors") != info["scores_sha256"]:
            raise ScoresLoadError(f"{directory / 'scores.safetensors'} does not match its recorded sha256")
        tensors = load_file(directory / "scores.safetensors")
        scalars = {name: info[name] for name in LatentScores._fields if name not in _TENSORS}
        return LatentScores(**{name: tensors[name] for name in _TENSORS}, **scalars), info["provenance"]
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise ScoresLoadError(f"cannot read latent scores in {directory}: {err}") from err


def load_matching_scores(directory: Path, provenance: dict) -> LatentScores | None:
    """The scores saved in `directory` when they were made for exactly `provenance` (a rerun after an interruption
    keeps a finished layer's scoring, ~1 minute on 2 CPU cores), else None: none there, made otherwise, or failing
    their own checks, and then they are made again."""
    if not (directory / "scores.json").exists():
        return None
    try:
        scores, saved = load_scores(directory)
    except ScoresLoadError:
        return None
    return scores if saved == provenance else None
