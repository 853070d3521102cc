"""The behaviour release on the held-out sets (issue #5): behavior_arms[arm] (every behaviour on, each alone,
reverse) -> behavior_evaluation (ensemble_behavior_metrics.json, the ablation table, throughput), checked by
behavior_gates (blocking)."""

import json
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.behaviors.evaluation import (
    ALL, ONLY, ReleasePolicy, ablation_rows, arm_behaviors, arm_names, behavior_results,
    ensemble_behavior_metrics)
from sae_pipeline.behaviors.release import CONFIG_FILE, read_release
from sae_pipeline.config import Profile, artifacts_root, load_gates
from sae_pipeline.defs.assets.evaluation import baseline_path, redaction_check_spec, require_audit, steered_run
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.evaluation.harness import REVERSE_ARM, load_metrics
from sae_pipeline.evaluation.plots import rates_png
from sae_pipeline.hashing import file_sha256
from sae_pipeline.steering.overhead import measure_overhead
from sae_pipeline.steering.behaviors import behavior_layers

GROUP = "behaviors"
ARM_REDACTION = "arm_redaction"
BEHAVIOR_GATES = "behavior_gates"
RELEASE_ALPHA = 1.0  # the harness's alpha multiplies every behaviour's alphas: 1.0 evaluates the release as written


def _release_dir(instance: dg.DagsterInstance) -> Path:
    return Path(required_metadata(instance, dg.AssetKey("behavior_release"))["path"]).parent


def build_behavior_evaluation_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    behaviors, eval_cfg = profile.behaviors.behaviors, profile.evaluation
    arms = dg.StaticPartitionsDefinition(arm_names(behaviors))

    @dg.asset(**gpu, group_name=GROUP, deps=["behavior_release", "refusal_judge"], partitions_def=arms,
              kinds={"pytorch"},
              check_specs=[redaction_check_spec(ARM_REDACTION, "behavior_arms")],
              description="The behaviour release on the held-out sets with one arm's behaviours on (metrics.json "
                          f"with bootstrap CIs): `{ALL}`, `{ONLY}<behaviour>` alone, `{REVERSE_ARM}` (every behaviour "
                          "flipped, needs STEER_DEBUG=1).")
    def behavior_arms(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        arm = context.partition_key
        reverse = arm == REVERSE_ARM
        require_audit(reverse)
        enabled = arm_behaviors(arm, behaviors)
        policy = ReleasePolicy.load(_release_dir(context.instance), enabled)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        _, metadata, check = steered_run(context.instance, tracking, loaded, eval_cfg, policy, RELEASE_ALPHA, reverse,
                                         policy.readouts(), f"behaviour arm {arm}", ARM_REDACTION)
        yield dg.MaterializeResult(
            metadata={**metadata, "arm": arm, "behaviors": ",".join(enabled), "policy_sha256": policy.sha256,
                      "release_config_sha256": policy.config_sha256},
            check_results=[check])

    def arm_metrics(instance: dg.DagsterInstance, directory: Path) -> tuple[dict, dict]:
        """arm -> metrics.json (verified, of this release), arm -> {path, metrics_sha256}."""
        release_sha256 = file_sha256(directory / CONFIG_FILE)
        metrics, pinned = {}, {}
        for arm in arm_names(behaviors):
            meta = passing_metadata(instance, behavior_arms.key, [ARM_REDACTION], arm)
            if meta["release_config_sha256"] != release_sha256:
                raise dg.Failure(f"behavior_arms {arm} evaluated another release; materialise the arms again")
            metrics[arm] = load_metrics(Path(meta["path"]))
            pinned[arm] = {"path": meta["path"], "metrics_sha256": metrics[arm]["metrics_sha256"]}
        return metrics, pinned

    @dg.asset(**gpu, group_name=GROUP, deps=[dg.AssetDep(behavior_arms, partition_mapping=dg.AllPartitionMapping()),
                                      "baseline_metrics", "behavior_release"], kinds={"json"},
              description="ensemble_behavior_metrics.json: per behaviour its alpha, harmful completion (every "
                          "behaviour on, and alone) against the baseline, benign false refusal; global capability, "
                          "reverse-safety and decode throughput (interleaved arms); the ablation table (each "
                          "behaviour alone), behavioural cross-talk and the representation cross-talk maxima.")
    def behavior_evaluation(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        directory = _release_dir(context.instance)
        release = read_release(directory, accept_failed_gates=True)  # every file verified against its sha256
        config = release.config
        metrics, pinned = arm_metrics(context.instance, directory)
        baseline_dir = baseline_path(context.instance)
        baseline = load_metrics(baseline_dir)
        results = behavior_results(load_gates().behavior_evaluation, baseline, metrics, behaviors)

        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        steering_cfg = profile.steering
        prompts = [r.prompt for r in load_prompt_sets().benign if r.split == "tuning"][:steering_cfg.overhead_prompts]
        device = next(loaded.model.parameters()).device
        layers, gate_skip = behavior_layers(release)
        overhead = measure_overhead(loaded.model, [torch.tensor([chat_ids(loaded.tokenizer, p)], device=device)
                                                   for p in prompts], layers, gate_skip,
                                    steering_cfg.overhead_new_tokens, steering_cfg.overhead_rounds)
        throughput = {"overhead": round(overhead.overhead, 6), "device": str(device),
                      "unsteered_tokens_per_s": overhead.unsteered_tokens_per_s,
                      "steered_tokens_per_s": overhead.steered_tokens_per_s}
        alphas = {b: config["behaviors"][b]["alpha"] for b in behaviors}
        report = ensemble_behavior_metrics(baseline, metrics, behaviors, alphas, results, throughput, {
            "release": {"path": str(directory), "config_sha256": file_sha256(directory / CONFIG_FILE),
                        "gates": config["gates"]},
            "baseline": {"path": str(baseline_dir), "metrics_sha256": baseline["metrics_sha256"]},
            "arms": pinned, "sae": config["sae"], "rankings": config["rankings"],
            "router_cv_accuracy": config["router_info"]["cv_accuracy"],
            "representation_crosstalk": config["crosstalk"]["pair_max_cos"]})
        out_dir = artifacts_root() / "behaviors" / "evaluation" / report["release"]["config_sha256"][:16]
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "ensemble_behavior_metrics.json"
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        per_behavior = [{"behavior": b, "alpha": e["alpha"], "completion": e["harmful_completion_rate"]["rate"],
                         "baseline_completion": e["baseline_harmful_completion_rate"]["rate"],
                         "reduction": e["harmful_completion_reduction"],
                         "completion_alone": e["alone"]["harmful_completion_rate"]["rate"],
                         "benign_false_refusal_alone": e["alone"]["benign_false_refusal_rate"]["rate"]}
                        for b, e in report["behaviors"].items()]
        panels = {"baseline": baseline["harmful_completion_rate"]["per_category"],
                  "every behaviour on": metrics[ALL]["harmful_completion_rate"]["per_category"]}
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "gates_passed": report["gates"]["passed"],
            **numbers({"throughput_overhead": overhead.overhead,
                       "benign_false_refusal_rate": report["global"]["benign_false_refusal_rate"]["rate"],
                       "harmful_completion_rate": report["global"]["harmful_completion_rate"]["rate"],
                       "reverse_capability_recovery": report["global"]["reverse_capability_recovery"]}),
            "per_behavior": table(per_behavior), "ablation": table(ablation_rows(baseline, metrics, behaviors)),
            "gates": table([g._asdict() for g in results]),
            "sign_flips": table([{"behavior": key.split("|")[0], "layer": int(key.split("|")[1]), "sign_flips": n}
                                 for key, n in report["global"]["sign_flips_by_behavior_layer"].items()]),
            "completion": png_markdown(rates_png(panels, "harmful completion by category, 95% CIs"),
                                       "harmful completion")})

    @dg.asset_check(asset=behavior_evaluation, name=BEHAVIOR_GATES, blocking=True,
                    description="The release against data/gates.yaml `behavior_evaluation`, recomputed from the "
                                "hash-verified metrics of every arm and the baseline: per-category harmful "
                                "completion reduction, benign false refusal in every arm, KL, perplexity, task "
                                "accuracy, sign flips, reverse-safety recovery and behavioural cross-talk")
    def behavior_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        report = json.loads(Path(required_metadata(context.instance, behavior_evaluation.key)["path"]).read_text())
        metrics = {arm: load_metrics(Path(run["path"])) for arm, run in report["arms"].items()}
        baseline = load_metrics(Path(report["baseline"]["path"]))
        pinned = {**{arm: run["metrics_sha256"] for arm, run in report["arms"].items()},
                  "baseline": report["baseline"]["metrics_sha256"]}
        changed = [arm for arm, m in [*metrics.items(), ("baseline", baseline)]
                   if m["metrics_sha256"] != pinned[arm]]
        if changed:
            raise dg.Failure(f"the metrics of {changed} changed since ensemble_behavior_metrics.json was written")
        results = behavior_results(load_gates().behavior_evaluation, baseline, metrics, behaviors)
        return dg.AssetCheckResult(
            passed=all(g.passed for g in results), severity=dg.AssetCheckSeverity.ERROR,
            metadata={**{g.name: g.value for g in results}, "gates": table([g._asdict() for g in results])})

    return [behavior_arms, behavior_evaluation, behavior_gates]
