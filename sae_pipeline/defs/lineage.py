"""Where an upstream asset's outputs are: read from its latest materialisation's metadata, so a step needs no model
load or recomputation just to find paths."""

from __future__ import annotations

import dagster as dg


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict | None:
    """The latest materialisation's metadata (values unwrapped), or None if there is none."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None),
        limit=1).records
    if not records:
        return None
    return {name: getattr(value, "value", value) for name, value in records[0].asset_materialization.metadata.items()}


def required_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    """As latest_metadata, failing the step with the reason when the upstream was never materialised."""
    metadata = latest_metadata(instance, key, partition)
    if metadata is None:
        where = f" partition {partition}" if partition is not None else ""
        raise dg.Failure(f"{key.to_user_string()}{where} has no materialisation yet; materialise it first")
    return metadata
