"""The release as a service of record (issue #8): `release` (the bundle of what was evaluated, manifest and optional
ed25519 signature; check `release_integrity`), and the nightly smoke: smoke_reference (the current release on a
fixed held-out shard, recorded once per release) -> smoke_metrics (the same shard again, held against the reference;
check `smoke_gates`), run by the `smoke` job on the `nightly_smoke` schedule. Both smoke runs are scanned for leaked
completions (`smoke_redaction`)."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg

from sae_pipeline.config import Profile, artifacts_root, gates_path, load_gates
from sae_pipeline.defs.assets.behavior_evaluation import BEHAVIOR_GATES
from sae_pipeline.defs.assets.evaluation import redaction_check_spec, steered_run
from sae_pipeline.defs.assets.fused import FUSED_GATES
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.release.bundle import (
    SIGNATURE, SIGNING_KEY_ENV, VERIFY_KEY_ENV, BundleError, sign_bundle, verify_bundle, write_bundle)
from sae_pipeline.release.smoke import (
    SmokeError, current_release, load_reference, record_reference, smoke_config, smoke_dir, smoke_verdict)

GROUP = "release"
SMOKE_GATES, REFERENCE_REDACTION, SMOKE_REDACTION = "smoke_gates", "smoke_reference_redaction", "smoke_redaction"
RELEASE_INTEGRITY = "release_integrity"


def build_release_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    eval_cfg, per_group = profile.evaluation, profile.smoke.per_group

    @dg.asset(group_name=GROUP, deps=["behavior_evaluation", "fused_evaluation"], kinds={"json"},
              description="The release bundle, artifacts/release/bundle/: the behaviour release, the fused release, "
                          "the gates file and the metrics that evaluated them, with manifest.json (sha256 and size "
                          "of every file, model and tokenizer hashes, package version), signed with ed25519 when "
                          f"{SIGNING_KEY_ENV} is set; built only on evaluations whose behavior_gates and fused_gates "
                          "passed. apply_release(model, that directory) verifies it and applies "
                          "fused nets, else sidecars, else nothing.")
    def release(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        behaviors = Path(required_metadata(context.instance, dg.AssetKey("behavior_release"))["path"]).parent
        fused = Path(required_metadata(context.instance, dg.AssetKey("fused_release"))["path"]).parent
        # only evaluations whose blocking gates passed are released
        metrics = {f"metrics/{name}.json": Path(passing_metadata(context.instance, dg.AssetKey(key), [gates])["path"])
                   for name, key, gates in (("fused_metrics", "fused_evaluation", FUSED_GATES),
                                            ("ensemble_behavior_metrics", "behavior_evaluation", BEHAVIOR_GATES))}
        loaded = model.load(profile, dtype=eval_cfg.model_dtype, tokenizer_and_hashes_only=True)
        directory = artifacts_root() / "release" / "bundle"
        manifest = write_bundle(directory, behaviors, fused, {"gates.yaml": gates_path(), **metrics},
                                loaded.model_hash, loaded.tokenizer_hash)
        signed = False
        if os.environ.get(SIGNING_KEY_ENV):
            sign_bundle(directory)
            signed = True
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory)), "signed": signed, "files": len(manifest["files"]),
            "bytes": sum(f["bytes"] for f in manifest["files"].values()), "model_hash": manifest["model_hash"]})

    @dg.asset_check(asset=release, name=RELEASE_INTEGRITY, blocking=True,
                    description="The bundle against its manifest, read back from disk: every file present with its "
                                "sha256, nothing unlisted, and the ed25519 signature when SAE_PIPELINE_VERIFY_KEY is "
                                "set")
    def release_integrity(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        directory = Path(required_metadata(context.instance, release.key)["path"])
        try:
            manifest = verify_bundle(directory)
        except BundleError as err:
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                       metadata={"error": str(err)})
        return dg.AssetCheckResult(passed=True, severity=dg.AssetCheckSeverity.ERROR, metadata={
            "files": len(manifest["files"]), "signature_checked": bool(os.environ.get(VERIFY_KEY_ENV)),
            "signed": (directory / SIGNATURE).exists()})

    def smoke_run(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource,
                  check_name: str):
        """The harness on the shard with the current release, as every steered run (figures, redaction check)."""
        try:
            policy, release_sha256 = current_release()
        except SmokeError as err:
            raise dg.Failure(str(err)) from err
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        result, metadata, check = steered_run(context.instance, tracking, loaded, smoke_config(eval_cfg, per_group),
                                              policy, 1.0, False, policy.readouts(), f"smoke, {policy.name}",
                                              check_name)
        return result, metadata, policy.name, release_sha256, check

    @dg.asset(**gpu, group_name=GROUP, deps=["behavior_release", "refusal_judge"], kinds={"pytorch"},
              check_specs=[redaction_check_spec(REFERENCE_REDACTION, "smoke_reference")],
              description=f"The current release (the fused release at its default backend, else the behaviour "
                          f"release) on the first {per_group} held-out prompts of every category, domain and task "
                          "kind: the reference the nightly smoke is held against. Materialise it once per release.")
    def smoke_reference(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        result, metadata, release, release_sha256, check = smoke_run(context, model, tracking, REFERENCE_REDACTION)
        path = record_reference(result, release, release_sha256, per_group)
        yield dg.MaterializeResult(metadata={
            **metadata, "path": dg.MetadataValue.path(str(path)), "release": release,
            "release_sha256": release_sha256,
            "metrics_sha256": result.metrics["metrics_sha256"], "per_group": per_group}, check_results=[check])

    @dg.asset(**gpu, group_name=GROUP, deps=[smoke_reference], kinds={"pytorch"},
              check_specs=[redaction_check_spec(SMOKE_REDACTION, "smoke_metrics"),
                           dg.AssetCheckSpec(SMOKE_GATES, asset="smoke_metrics", blocking=True, description=(
                               "The smoke run against its reference (data/gates.yaml `smoke`): per category harmful "
                               "completion within a point, capability gates, byte-identical metrics"))],
              description="The nightly smoke: the current release on the reference's shard again, compared with the "
                          "reference (smoke.json beside it).")
    def smoke_metrics(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        result, metadata, release, release_sha256, redaction = smoke_run(context, model, tracking, SMOKE_REDACTION)
        pinned = passing_metadata(context.instance, smoke_reference.key, [REFERENCE_REDACTION])
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
            metadata={**metadata, "path": dg.MetadataValue.path(str(path)), "release": release,
                      "passed": verdict.passed, **numbers({g.name: g.value for g in verdict.gates})},
            check_results=[redaction, dg.AssetCheckResult(
                check_name=SMOKE_GATES, passed=verdict.passed, severity=dg.AssetCheckSeverity.ERROR,
                metadata={"gates": table(rows)})])

    smoke_job = dg.define_asset_job("smoke", selection=dg.AssetSelection.assets(smoke_metrics),
                                    description="The nightly smoke: the current release on a fixed held-out shard "
                                                "against its reference.")
    nightly_smoke = dg.ScheduleDefinition(name="nightly_smoke", job=smoke_job, cron_schedule=profile.smoke.cron,
                                          execution_timezone="UTC",
                                          default_status=dg.DefaultScheduleStatus.RUNNING)
    return [release, release_integrity, smoke_reference, smoke_metrics, smoke_job, nightly_smoke]
