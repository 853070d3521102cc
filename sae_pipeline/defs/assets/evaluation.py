"""Evaluation assets: prompt_sets -> refusal_judge -> baseline_metrics, with the dataset, judge and redaction checks."""

import os
from collections import Counter
from pathlib import Path

import dagster as dg

from sae_pipeline.config import EvalConfig, Profile, load_gates
from sae_pipeline.defs.checks import (
    DATASET_SIZES, DATASETS_LOCK, JUDGE_ACCURACY, SPLITS_DISJOINT, gate_check_result, problems_check_result)
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.evaluation.datasets import (
    FILES, load_prompt_sets, lock_mismatches, size_shortfalls, split_overlaps)
from sae_pipeline.evaluation.harness import (
    EvalResult, Steering, load_fingerprints, load_metrics, load_records, select_prompts)
from sae_pipeline.evaluation.plots import rates_png
from sae_pipeline.evaluation.redaction import Fingerprints, ensure_clean, scan_paths
from sae_pipeline.evaluation.run import build_judges, evaluation_root, judge_gate_checks, run_frozen
from sae_pipeline.gates import check_gates
from sae_pipeline.model.loading import LoadedModel

GROUP = "evaluation"
BASELINE_COMPLETE, BASELINE_REDACTION = "baseline_complete", "redaction"


def require_judge(instance: dg.DagsterInstance) -> None:
    """Harness runs are judged only by a refusal judge that passed its accuracy gate."""
    passing_metadata(instance, dg.AssetKey("refusal_judge"), [JUDGE_ACCURACY.name])


def baseline_path(instance: dg.DagsterInstance) -> Path:
    """The baseline run's directory, read only if its blocking checks passed on it."""
    return Path(passing_metadata(instance, dg.AssetKey("baseline_metrics"),
                                 [BASELINE_COMPLETE, BASELINE_REDACTION])["path"])


def _rate_rows(rates: dict[str, dict], label: str) -> list[dict]:
    return [{label: name, "rate": r["rate"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "n": r["n"]}
            for name, r in rates.items()]


def evaluation_metadata(result: EvalResult, title: str, tracking: TrackingResource) -> dict:
    """A harness run as Dagster metadata (rates, per-group tables, bar chart; scalars and an artifact reference to
    W&B), checked against the run's redaction fingerprints before it leaves the step."""
    m = result.metrics
    run_name = f"{m['model_hash'][:8]}-{m['dataset_hash'][:8]}-a{m['alpha']:.2f}-{m['run_id'][:8]}"
    wandb_dir = tracking.log_metrics(run_name, m, {"evaluation": result.directory})
    harmful, benign = m["harmful_refusal_rate"], m["benign_false_refusal_rate"]
    metadata = {
        **numbers({"harmful_refusal_rate": harmful["overall"]["rate"],
                   "harmful_completion_rate": m["harmful_completion_rate"]["overall"]["rate"],
                   "benign_false_refusal_rate": benign["overall"]["rate"],
                   "borderline_false_refusal_rate": benign["borderline"]["rate"],
                   "perplexity": m["capability"]["perplexity"],
                   "next_token_kl": m["capability"]["next_token_kl"],
                   "task_accuracy": m["capability"]["task_accuracy"]["overall"]["rate"],
                   "judge_agreement": m["judges"]["agreement"]["rate"],
                   "wall_seconds": result.timing["wall_seconds"],
                   "generated_tokens_per_second": result.timing["generated_tokens_per_second"]}),
        "run_id": m["run_id"], "model_hash": m["model_hash"], "dataset_hash": m["dataset_hash"],
        "cfg_hash": m["cfg_hash"], "metrics_sha256": m["metrics_sha256"],
        "path": dg.MetadataValue.path(str(result.directory)),
        "wandb_dir": dg.MetadataValue.path(str(wandb_dir)) if wandb_dir else "disabled",
        "harmful_refusal_by_category": table(_rate_rows(harmful["per_category"], "category")),
        "benign_false_refusal_by_domain": table(_rate_rows(
            {**benign["per_domain"], "borderline": benign["borderline"]}, "domain")),
        "rates": png_markdown(rates_png({"harmful refused": harmful["per_category"],
                                         "benign falsely refused": {**benign["per_domain"],
                                                                    "borderline": benign["borderline"]}},
                                        title), "rates"),
    }
    ensure_clean(result.fingerprints, {k: str(v) for k, v in metadata.items()}, "evaluation metadata")
    return metadata


def redaction_scan(instance: dg.DagsterInstance, directory: Path, tracking: TrackingResource,
                   fingerprints: Fingerprints | None = None) -> tuple[bool, dict]:
    """Scan the evaluation artifacts (the run's own directory when it lies elsewhere, as the audit's do), the W&B
    directory and the Dagster storage with the fingerprints of the run in `directory` (or those the run holds in
    memory): (passed, check metadata)."""
    fingerprints = fingerprints or load_fingerprints(directory)
    instance_root = getattr(instance, "root_directory", None)
    if not instance_root or not Path(instance_root).is_dir():
        raise dg.Failure("the Dagster instance has no storage directory to scan: redaction cannot be verified")
    artifacts = evaluation_root() if directory.resolve().is_relative_to(evaluation_root().resolve()) else directory
    roots = [artifacts, Path(instance_root)]
    if tracking.resolved_mode() != "disabled":
        roots.append(tracking.root())
    missing = [str(root) for root in roots if not root.exists()]
    if missing:
        raise dg.Failure(f"expected output directories are missing, cannot scan them: {missing}")
    report = scan_paths(roots, fingerprints)
    gates = check_gates(load_gates().redaction, {"leaking_files_max": len(report.leaks)})
    return all(g.passed for g in gates), {
        "files_scanned": report.files_scanned, "bytes_scanned": report.bytes_scanned,
        "fingerprint_shingles": fingerprints.size, "leaking_files": len(report.leaks),
        "leaks": dg.MetadataValue.md("\n".join(report.leaks) or "none")}


def redaction_check(instance: dg.DagsterInstance, directory: Path, tracking: TrackingResource, check_name: str,
                    fingerprints: Fingerprints | None = None) -> tuple[int, dg.AssetCheckResult]:
    """`redaction_scan` as the named blocking check's result, with the count of leaking files for the metadata."""
    passed, scan = redaction_scan(instance, directory, tracking, fingerprints)
    return scan["leaking_files"], dg.AssetCheckResult(check_name=check_name, passed=passed,
                                                      severity=dg.AssetCheckSeverity.ERROR, metadata=scan)


def redaction_check_spec(name: str, asset: str) -> dg.AssetCheckSpec:
    """The blocking redaction check of an asset whose runs steer the model on harmful prompts."""
    return dg.AssetCheckSpec(name, asset=asset, blocking=True, description=(
        "No text generated from a harmful prompt under steering in any file the run wrote"))


def require_audit(reverse: bool) -> None:
    if reverse and os.environ.get("STEER_DEBUG") != "1":
        raise dg.Failure("the reverse-safety partition is an audit run: set STEER_DEBUG=1 to materialise it")


def steered_run(instance: dg.DagsterInstance, tracking: TrackingResource, loaded: LoadedModel, cfg: EvalConfig,
                steering: Steering, alpha: float, reverse: bool, readouts: list, title: str, check_name: str
                ) -> tuple[EvalResult, dict, dg.AssetCheckResult]:
    """One harness run under `steering` on the held-out sets: the result, its metadata (with the leaking-file
    count) and the redaction check's result."""
    require_judge(instance)
    result = run_frozen(loaded, cfg, steering, alpha, reverse, readouts)
    metadata = evaluation_metadata(result, f"{title}, 95% bootstrap CIs", tracking)
    leaking, check = redaction_check(instance, result.directory, tracking, check_name)
    return result, {**metadata, "redaction_leaking_files": leaking}, check


def build_evaluation_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg = profile.evaluation

    @dg.asset(group_name=GROUP, kinds={"json"}, check_specs=[DATASETS_LOCK, SPLITS_DISJOINT, DATASET_SIZES],
              description="Frozen harmful/benign/borderline prompts, clean domain QA, capability and judge sets, "
                          "verified against data/datasets.lock.")
    def prompt_sets(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        mismatches = lock_mismatches()
        if mismatches:
            # fail closed: nothing reads files that differ from the lock; the failed blocking checks stop downstream
            context.log.error("datasets do not match datasets.lock: " + "; ".join(mismatches))
            not_checked = ["not checked: the datasets do not match datasets.lock"]
            return dg.MaterializeResult(
                metadata={"lock_problems": len(mismatches)},
                check_results=[problems_check_result(DATASETS_LOCK, mismatches),
                               problems_check_result(SPLITS_DISJOINT, not_checked),
                               problems_check_result(DATASET_SIZES, not_checked)])
        sets = load_prompt_sets()
        counts = {name: len(getattr(sets, name)) for name in FILES}
        groups = Counter([("harmful", r.category, r.split) for r in sets.harmful]
                         + [("benign", r.domain, r.split) for r in sets.benign])
        return dg.MaterializeResult(
            metadata={"dataset_hash": sets.dataset_hash, **counts,
                      "splits": table([{"set": s, "group": g, "split": sp, "prompts": n}
                                       for (s, g, sp), n in sorted(groups.items())])},
            check_results=[problems_check_result(DATASETS_LOCK, mismatches),
                           problems_check_result(SPLITS_DISJOINT, split_overlaps(sets)),
                           problems_check_result(DATASET_SIZES, size_shortfalls(sets, load_gates().datasets))])

    @dg.asset(group_name=GROUP, deps=[prompt_sets], kinds={"pytorch"}, check_specs=[JUDGE_ACCURACY],
              description="Offline refusal judges (embedding head + prefix matcher), measured on the labelled set.")
    def refusal_judge(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        judges, directory = build_judges(load_prompt_sets())
        rows = [acc._asdict() for acc in judges.accuracy.values()]
        context.log.info(f"judges: {rows}")
        return dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(directory), "deciding_judge": cfg.refusal_judge,
                      "accuracy": table(rows),
                      **numbers({f"{a.judge}_accuracy": a.accuracy for a in judges.accuracy.values()})},
            check_results=[gate_check_result(JUDGE_ACCURACY, judge_gate_checks(
                judges.accuracy[cfg.refusal_judge], load_gates().judge_accuracy))])

    @dg.asset(**gpu, group_name=GROUP, deps=[refusal_judge], kinds={"pytorch"},
              description="The unsteered model on the held-out sets: metrics.json with bootstrap CIs (alpha 0.00).")
    def baseline_metrics(context: dg.AssetExecutionContext, model: ModelResource,
                         tracking: TrackingResource) -> dg.MaterializeResult:
        loaded = model.load(profile, dtype=cfg.model_dtype)
        result = run_frozen(loaded, cfg)
        metadata = evaluation_metadata(result, "baseline (alpha 0.00), 95% bootstrap CIs", tracking)
        return dg.MaterializeResult(metadata=metadata)

    @dg.asset_check(asset=baseline_metrics, name=BASELINE_COMPLETE, blocking=True,
                    description="metrics.json verifies against its sha256 and every selected prompt has a record")
    def baseline_complete(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        directory = _latest_path(context, baseline_metrics.key)
        metrics = load_metrics(directory)
        selection = select_prompts(load_prompt_sets(), cfg)
        expected = {r.id for r in selection.harmful + selection.benign}
        judged = {r["id"] for r in load_records(directory)} & expected
        gates = check_gates(load_gates().baseline, {"coverage_min": len(judged) / max(len(expected), 1)})
        return dg.AssetCheckResult(
            passed=all(g.passed for g in gates), severity=dg.AssetCheckSeverity.ERROR,
            metadata={"judged": len(judged), "expected": len(expected), "metrics_sha256": metrics["metrics_sha256"],
                      "missing": dg.MetadataValue.md(", ".join(sorted(expected - judged)[:50]) or "none")})

    @dg.asset_check(asset=baseline_metrics, name=BASELINE_REDACTION, blocking=True,
                    description="No text generated from a harmful prompt in the evaluation artifacts, the W&B "
                                "directory or the Dagster storage (scanned with the run's redaction fingerprints)")
    def redaction(context: dg.AssetCheckExecutionContext, tracking: TrackingResource) -> dg.AssetCheckResult:
        passed, metadata = redaction_scan(context.instance, _latest_path(context, baseline_metrics.key), tracking)
        return dg.AssetCheckResult(passed=passed, severity=dg.AssetCheckSeverity.ERROR, metadata=metadata)

    return [prompt_sets, refusal_judge, baseline_metrics, baseline_complete, redaction]


def _latest_path(context: dg.AssetCheckExecutionContext, key: dg.AssetKey) -> Path:
    return Path(required_metadata(context.instance, key)["path"])
