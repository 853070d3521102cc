"""Where an upstream asset's outputs are: read from its latest materialisation's metadata, so a step needs no model
load or recomputation just to find paths.

Dagster's blocking checks stop what follows them within one run; the driver and `dagster asset materialize
--select` run each stage in a run of its own, so `passing_metadata` carries the block across runs: a stage reads
its upstream only if the upstream's blocking checks passed on the very materialisation it reads."""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

CHECK_HISTORY = 500  # evaluations searched per check for the one of the materialisation read (newest first)


def _latest_record(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition] if partition is not None else None),
        limit=1).records
    return records[0] if records else None


def _unwrapped(record) -> dict:
    return {name: getattr(value, "value", value) for name, value in record.asset_materialization.metadata.items()}


def _where(key: dg.AssetKey, partition: str | None) -> str:
    return key.to_user_string() + (f" partition {partition}" if partition is not None else "")


def latest_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict | None:
    """The latest materialisation's metadata (values unwrapped), or None if there is none."""
    record = _latest_record(instance, key, partition)
    return None if record is None else _unwrapped(record)


def _required_record(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None):
    record = _latest_record(instance, key, partition)
    if record is None:
        raise dg.Failure(f"{_where(key, partition)} has no materialisation yet; materialise it first")
    return record


def required_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, partition: str | None = None) -> dict:
    """As latest_metadata, failing the step with the reason when the upstream was never materialised."""
    return _unwrapped(_required_record(instance, key, partition))


def check_verdict(instance: dg.DagsterInstance, key: dg.AssetKey, check: str, storage_id: int) -> bool | None:
    """The newest evaluation of `check` that targeted materialisation `storage_id`: passed or not; None if none."""
    history = instance.event_log_storage.get_asset_check_execution_history(dg.AssetCheckKey(key, check),
                                                                           limit=CHECK_HISTORY)
    for execution in history:
        evaluation = execution.evaluation  # a planned check whose step never got to it holds no evaluation
        target = evaluation.target_materialization_data if isinstance(evaluation, dg.AssetCheckEvaluation) else None
        if target is not None and target.storage_id == storage_id:
            return evaluation.passed
    return None


def passing_metadata(instance: dg.DagsterInstance, key: dg.AssetKey, checks: Sequence[str],
                     partition: str | None = None) -> dict:
    """As required_metadata, and each of the upstream's blocking `checks` must have passed on that materialisation
    (one that failed or never ran blocks the step, naming it)."""
    record = _required_record(instance, key, partition)
    verdicts = {check: check_verdict(instance, key, check, record.storage_id) for check in checks}
    blocked = [f"{check} {'failed' if verdict is False else 'never ran'}" for check, verdict in verdicts.items()
               if verdict is not True]
    if blocked:
        raise dg.Failure(f"{_where(key, partition)}: its blocking check {', '.join(blocked)} on the latest "
                         f"materialisation, so nothing is built on it; mend the cause and materialise it again")
    return _unwrapped(record)
