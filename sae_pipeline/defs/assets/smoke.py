"""The nightly smoke (issue #8): smoke_reference (the current release on a fixed held-out shard, recorded once per
release) -> smoke_metrics (the same shard again, held against the reference; check `smoke_gates`), run by the
`smoke` job on the `nightly_smoke` schedule. Both runs are scanned for leaked completions (`smoke_redaction`)."""

import json
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from sae_pipeline.config import Profile, load_gates
from sae_pipeline.defs.assets.evaluation import redaction_check_spec, redaction_scan
from sae_pipeline.defs.lineage import required_metadata
from sae_pipeline.defs.metadata import numbers, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.release.smoke import SmokeError, load_reference, record_reference, run_smoke, smoke_dir, smoke_verdict

GROUP = "smoke"
SMOKE_GATES, REFERENCE_REDACTION, SMOKE_REDACTION = "smoke_gates", "smoke_reference_redaction", "smoke_redaction"


def build_smoke_assets(profile: Profile) -> list:
    eval_cfg, per_group = profile.evaluation, profile.smoke.per_group

    def smoke_run(context: dg.AssetExecutionContext, model: ModelResource, check_name: str):
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        try:
            result, release, release_sha256 = run_smoke(loaded, eval_cfg, per_group)
        except SmokeError as err:
            raise dg.Failure(str(err)) from err
        passed, scan = redaction_scan(context.instance, result.directory)
        check = dg.AssetCheckResult(check_name=check_name, passed=passed, severity=dg.AssetCheckSeverity.ERROR,
                                    metadata=scan)
        return result, release, release_sha256, check

    @dg.asset(group_name=GROUP, deps=["behavior_release", "refusal_judge"], kinds={"pytorch"},
              check_specs=[redaction_check_spec(REFERENCE_REDACTION, "smoke_reference")],
              description=f"The current release (the fused release at its default backend, else the behaviour "
                          f"release) on the first {per_group} held-out prompts of every category, domain and task "
                          "kind: the reference the nightly smoke is held against. Materialise it once per release.")
    def smoke_reference(context: dg.AssetExecutionContext, model: ModelResource):
        result, release, release_sha256, check = smoke_run(context, model, REFERENCE_REDACTION)
        path = record_reference(result, release, release_sha256, per_group)
        yield dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "release": release, "release_sha256": release_sha256,
            "metrics_sha256": result.metrics["metrics_sha256"], "per_group": per_group}, check_results=[check])

    @dg.asset(group_name=GROUP, deps=[smoke_reference], kinds={"pytorch"},
              check_specs=[redaction_check_spec(SMOKE_REDACTION, "smoke_metrics"),
                           dg.AssetCheckSpec(SMOKE_GATES, asset="smoke_metrics", blocking=True, description=(
                               "The smoke run against its reference (data/gates.yaml `smoke`): per category harmful "
                               "completion within a point, capability gates, byte-identical metrics"))],
              description="The nightly smoke: the current release on the reference's shard again, compared with the "
                          "reference (smoke.json beside it).")
    def smoke_metrics(context: dg.AssetExecutionContext, model: ModelResource):
        result, release, release_sha256, redaction = smoke_run(context, model, SMOKE_REDACTION)
        pinned = required_metadata(context.instance, smoke_reference.key)
        if pinned["release_sha256"] != release_sha256:
            raise dg.Failure(f"the release changed since smoke_reference ({pinned['release_sha256'][:16]} -> "
                             f"{release_sha256[:16]}); materialise smoke_reference for the new release first")
        try:
            verdict = smoke_verdict(load_gates().smoke, load_reference(release_sha256, per_group), result.metrics)
        except SmokeError as err:
            raise dg.Failure(str(err)) from err
        rows = [{**g._asdict(), "passed": bool(g.passed)} for g in verdict.gates]
        path = smoke_dir(release_sha256) / "smoke.json"
        path.write_text(json.dumps({"ran": datetime.now(timezone.utc).isoformat(), "release": release,
                                    "release_sha256": release_sha256, "passed": verdict.passed, "gates": rows,
                                    "metrics_sha256": verdict.metrics_sha256,
                                    "reference_sha256": verdict.reference_sha256}, indent=2, sort_keys=True))
        yield dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(path)), "release": release, "passed": verdict.passed,
                      **numbers({g.name: g.value for g in verdict.gates})},
            check_results=[redaction, dg.AssetCheckResult(
                check_name=SMOKE_GATES, passed=verdict.passed, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"gates": table(rows)})])

    smoke_job = dg.define_asset_job("smoke", selection=dg.AssetSelection.assets(smoke_metrics),
                                    description="The nightly smoke: the current release on a fixed held-out shard "
                                                "against its reference.")
    nightly_smoke = dg.ScheduleDefinition(name="nightly_smoke", job=smoke_job, cron_schedule=profile.smoke.cron,
                                          execution_timezone="UTC",
                                          default_status=dg.DefaultScheduleStatus.RUNNING)
    return [smoke_reference, smoke_metrics, smoke_job, nightly_smoke]
