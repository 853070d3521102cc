"""The Dagster layer: wires the core into assets, checks, jobs and resources. No pipeline logic lives here."""

from sae_pipeline.config import load_profile
from sae_pipeline.defs.definitions import build_defs

defs = build_defs(load_profile())
