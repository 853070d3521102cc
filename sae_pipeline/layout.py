"""Where each stage's artifacts live under the artifact root, derived from the profile and their inputs' hashes."""

from __future__ import annotations

from pathlib import Path

from sae_pipeline.activations.harvest import harvest_root
from sae_pipeline.hashing import config_hash
from sae_pipeline.config import Profile, artifacts_root
from sae_pipeline.model.loading import LoadedModel


def corpus_dir(profile: Profile) -> Path:
    return artifacts_root() / "corpus" / config_hash(profile.corpus.model_dump(mode="json"))[:8]


def activations_root(profile: Profile, loaded: LoadedModel, corpus_sha256: str) -> Path:
    return harvest_root(artifacts_root() / "activations", loaded.model_hash, corpus_sha256, profile.harvest)


def sae_layer_dir(profile: Profile, loaded: LoadedModel, corpus_sha256: str, layer: int) -> Path:
    from sae_pipeline.sae.run import sae_dir

    return sae_dir(artifacts_root() / "sae", activations_root(profile, loaded, corpus_sha256), profile.sae, layer)


def features_dir(sae_directory: Path, dataset_hash: str, features_cfg_hash: str) -> Path:
    """artifacts/features/<activations>/<sae-cfg>/layer_L/<dataset>_<features-cfg>/"""
    relative = sae_directory.relative_to(artifacts_root() / "sae")
    return artifacts_root() / "features" / relative / f"{dataset_hash[:12]}_{features_cfg_hash[:8]}"
