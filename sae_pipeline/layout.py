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
