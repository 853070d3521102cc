"""Definitions for one profile. `sae_pipeline.defs.defs` is the active profile's (SAE_PIPELINE_PROFILE)."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.config import Profile
from sae_pipeline.defs.assets.foundation import build_foundation_assets
from sae_pipeline.defs.jobs import main_job
from sae_pipeline.defs.resources import ModelResource


def build_defs(profile: Profile) -> dg.Definitions:
    return dg.Definitions(
        assets=build_foundation_assets(profile),
        jobs=[main_job],
        resources={"model": ModelResource()},
    )
