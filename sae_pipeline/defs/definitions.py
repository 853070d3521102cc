"""Definitions for one profile. `sae_pipeline.defs.defs` is the active profile's (SAE_PIPELINE_PROFILE)."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.config import Profile
from sae_pipeline.defs.assets.audit import build_audit_assets
from sae_pipeline.defs.assets.behavior_evaluation import build_behavior_evaluation_assets
from sae_pipeline.defs.assets.behaviors import build_behavior_assets
from sae_pipeline.defs.assets.ensemble import build_ensemble_assets
from sae_pipeline.defs.assets.evaluation import build_evaluation_assets
from sae_pipeline.defs.assets.features import build_feature_assets
from sae_pipeline.defs.assets.foundation import build_foundation_assets
from sae_pipeline.defs.assets.fused import build_fused_assets
from sae_pipeline.defs.assets.operating_point import build_operating_point_assets
from sae_pipeline.defs.assets.release import build_release_assets
from sae_pipeline.defs.assets.steering import build_steering_assets
from sae_pipeline.defs.execution import build_executor
from sae_pipeline.defs.jobs import (audit_job, behavior_arms_job, behaviors_job, ensemble_job, fused_arms_job,
                                   fused_job, main_job, screens_job, sweep_job)
from sae_pipeline.defs.resources import ModelResource, TrackingResource


def build_defs(profile: Profile) -> dg.Definitions:
    built = [*build_foundation_assets(profile), *build_evaluation_assets(profile), *build_feature_assets(profile),
             *build_steering_assets(profile), *build_operating_point_assets(profile), *build_ensemble_assets(profile),
             *build_behavior_assets(profile), *build_behavior_evaluation_assets(profile), *build_fused_assets(profile)]
    release, release_integrity, smoke_reference, smoke_metrics, smoke_job, nightly_smoke = build_release_assets(profile)
    built += [release, release_integrity, smoke_reference, smoke_metrics, *build_audit_assets(profile)]
    return dg.Definitions(
        assets=[d for d in built if not isinstance(d, dg.AssetChecksDefinition)],
        asset_checks=[d for d in built if isinstance(d, dg.AssetChecksDefinition)],
        jobs=[main_job, sweep_job, ensemble_job, behaviors_job, screens_job, behavior_arms_job, fused_job,
              fused_arms_job, smoke_job, audit_job],
        schedules=[nightly_smoke],
        resources={"model": ModelResource(), "tracking": TrackingResource()},
        executor=build_executor(profile.execution),
    )
