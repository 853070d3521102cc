"""Dagster resources: thin wrappers that hand core objects to assets."""

from __future__ import annotations

from functools import lru_cache

import dagster as dg
import torch

from sae_pipeline.config import Profile
from sae_pipeline.model.loading import LoadedModel, load_model

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@lru_cache(maxsize=2)
def _cached_load(name_or_path: str | None, dtype: str) -> LoadedModel:
    return load_model(name_or_path, dtype=_DTYPES[dtype])


class ModelResource(dg.ConfigurableResource):
    """The model under study. Unset fields take the profile's model (the embedded SmolLM2 by default) and its
    harvest dtype."""

    name_or_path: str | None = None
    dtype: str | None = None

    def load(self, profile: Profile, dtype: str | None = None) -> LoadedModel:
        """dtype: the stage's own choice (evaluation decodes in its configured dtype); the resource's wins."""
        dtype = self.dtype or dtype or profile.harvest.model_dtype
        if dtype not in _DTYPES:
            raise dg.Failure(f"ModelResource.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _cached_load(self.name_or_path or profile.model, dtype)
