"""The strength sweep and the operating point: alpha_sweep[alpha | reverse] -> operating_point, checked by
steering_gates (blocking). The candidate is assembled from the latest refusal_gate and every layer's latest sidecars."""

import shutil
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.config import Profile, artifacts_root, load_gates
from sae_pipeline.defs.assets.evaluation import redaction_check_spec, require_audit, steered_run
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import latest_metadata, passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.evaluation.harness import REVERSE_ARM, load_metrics
from sae_pipeline.evaluation.stability import FeatureReadout
from sae_pipeline.model.loading import LoadedModel
from sae_pipeline.steering.operating_point import load_operating_point, save_operating_point
from sae_pipeline.steering.overhead import measure_overhead
from sae_pipeline.steering.plots import ab_rows, alpha_curves_png
from sae_pipeline.steering.sweep import (
    Candidate, choose_alpha, load_candidate, operating_point_results, strength_results)

GROUP = "steering"
REVERSE_ALPHA = 1.0  # reverse-safety runs the candidate at full strength, flipped
SWEEP_REDACTION = "sweep_redaction"
STEERING_GATES = "steering_gates"


def sweep_key(alpha: float) -> str:
    return f"{alpha:.2f}"


def build_candidate(instance: dg.DagsterInstance, profile: Profile, loaded: LoadedModel
                    ) -> tuple[Candidate, list[FeatureReadout], dict]:
    """The candidate from the latest refusal_gate and sidecars materialisations, its feature readouts, and where
    each part came from. A layer without sidecars (its SAE failed its gates) has no features."""
    sources = {"refusal_gate": required_metadata(instance, dg.AssetKey("refusal_gate"))["path"]}
    for layer in profile.harvest.layers:
        meta = latest_metadata(instance, dg.AssetKey("sidecars"), str(layer))
        if meta is not None:
            sources[f"sidecar_l{layer}"] = meta["path"]
    sidecar_infos = {int(key.removeprefix("sidecar_l")): Path(path) for key, path in sources.items()
                     if key.startswith("sidecar_l")}
    candidate, readouts = load_candidate(Path(sources["refusal_gate"]), sidecar_infos, profile.steering.refusal_beta,
                                         profile.steering.epsilon, loaded.model_hash)
    return candidate, readouts, sources


def build_operating_point_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg, eval_cfg = profile.steering, profile.evaluation
    sweep_keys = [sweep_key(alpha) for alpha in cfg.alpha_grid]
    sweep_partitions = dg.StaticPartitionsDefinition([*sweep_keys, REVERSE_ARM])

    every_layer = dg.AllPartitionMapping()  # the candidate reads each layer's sidecars, whatever the alpha

    @dg.asset(**gpu, group_name=GROUP, deps=["refusal_gate", dg.AssetDep("sidecars", partition_mapping=every_layer),
                                      "refusal_judge"], partitions_def=sweep_partitions,
              kinds={"pytorch"}, check_specs=[redaction_check_spec(SWEEP_REDACTION, "alpha_sweep")],
              description="The candidate operating point on the held-out sets at one strength of the grid (metrics."
                          "json with bootstrap CIs); `reverse` runs it flipped (needs STEER_DEBUG=1).")
    def alpha_sweep(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        reverse = context.partition_key == REVERSE_ARM
        require_audit(reverse)
        alpha = REVERSE_ALPHA if reverse else float(context.partition_key)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        candidate, readouts, sources = build_candidate(context.instance, profile, loaded)
        result, metadata, check = steered_run(context.instance, tracking, loaded, eval_cfg, candidate, alpha, reverse,
                                              readouts, "reverse-safety" if reverse else f"alpha {alpha:.2f}",
                                              SWEEP_REDACTION)
        stability = result.metrics.get("feature_stability", {})
        yield dg.MaterializeResult(
            metadata={**metadata, "candidate_sha256": candidate.sha256, "alpha": alpha, "reverse": reverse,
                      "feature_layers": ",".join(map(str, candidate.features)) or "none",
                      "gate_layers": ",".join(map(str, candidate.gate.layers)),
                      **numbers({"sign_flips": stability.get("sign_flips", 0)}),
                      "sources": dg.MetadataValue.json(sources)},
            check_results=[check])

    @dg.asset(**gpu, group_name=GROUP, deps=["refusal_gate", dg.AssetDep("sidecars", partition_mapping=every_layer),
                                      dg.AssetDep(alpha_sweep, partition_mapping=dg.AllPartitionMapping())],
              kinds={"json"},
              description="The chosen strength (smallest alpha of the sweep that passes every per-strength steering "
                          "gate) written as artifacts/steering/operating_point/ for apply_patch, with its measured "
                          "throughput overhead, the A/B table and the alpha curves.")
    def operating_point(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        candidate, _, sources = build_candidate(context.instance, profile, loaded)
        runs = {}
        for key in [*sweep_keys, REVERSE_ARM]:
            meta = passing_metadata(context.instance, alpha_sweep.key, [SWEEP_REDACTION], key)
            if meta["candidate_sha256"] != candidate.sha256:
                raise dg.Failure(f"alpha_sweep {key} evaluated another candidate ({meta['candidate_sha256'][:12]}, "
                                 f"now {candidate.sha256[:12]}): materialise the sweep again")
            runs[key] = (Path(meta["path"]), load_metrics(Path(meta["path"])))
        baseline = runs[sweep_key(0.0)][1]  # the grid starts at 0.0 (validated with the profile)
        gates = load_gates().steering
        results = {alpha: strength_results(gates, baseline, runs[sweep_key(alpha)][1]) for alpha in cfg.alpha_grid}
        chosen = choose_alpha(results)
        steered = runs[sweep_key(chosen)][1]

        prompts = [r.prompt for r in load_prompt_sets().benign if r.split == "tuning"][:cfg.overhead_prompts]
        device = next(loaded.model.parameters()).device
        overhead = measure_overhead(loaded.model, [torch.tensor([chat_ids(loaded.tokenizer, p)], device=device)
                                                   for p in prompts],
                                    candidate.layers_at(chosen), candidate.gate_skip, cfg.overhead_new_tokens,
                                    cfg.overhead_rounds)
        verdict = operating_point_results(gates, baseline, steered, runs[REVERSE_ARM][1], overhead.overhead)
        directory = artifacts_root() / "steering" / "operating_point"
        if directory.exists():
            shutil.rmtree(directory)  # a fresh directory: no file of an earlier operating point survives in it
        sweep_rows = [{"alpha": alpha, **{g.name: round(g.value, 6) for g in results[alpha]},
                       "gates_passed": sum(g.passed for g in results[alpha])} for alpha in cfg.alpha_grid]
        save_operating_point(directory, candidate.layers_at(chosen), candidate.gate_skip, {
            "mode": ("features+gated_refusal" if candidate.features else "gated_refusal"),
            "alpha": chosen, "refusal_beta_per_alpha": cfg.refusal_beta, "candidate_sha256": candidate.sha256,
            "model_hash": loaded.model_hash, "components": candidate.component_hashes, "sources": sources,
            "rule": "smallest alpha of the grid passing every per-strength steering gate; else one meeting the "
                    "harmful-completion gate, then most gates passed, then largest harmful-completion reduction, "
                    "then smallest alpha",
            "evaluation": {key: {"path": str(path), "metrics_sha256": m["metrics_sha256"]}
                           for key, (path, m) in runs.items()},
            "sweep": sweep_rows,
            # apply_patch refuses a point that failed its gates unless asked to (audits)
            "gates": {"passed": all(g.passed for g in verdict),
                      "results": [{**g._asdict(), "passed": bool(g.passed)} for g in verdict]},
            "throughput": {"overhead": overhead.overhead, "device": str(device),
                           "unsteered_tokens_per_s": overhead.unsteered_tokens_per_s,
                           "steered_tokens_per_s": overhead.steered_tokens_per_s}})
        ab = ab_rows(baseline, steered)
        curves = {alpha: runs[sweep_key(alpha)][1] for alpha in cfg.alpha_grid}
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory)), "alpha": chosen, "candidate_sha256": candidate.sha256,
            **numbers({"throughput_overhead": overhead.overhead,
                       "harmful_completion_reduction": next(g.value for g in results[chosen]
                                                            if g.name == "harmful_completion_reduction_min"),
                       "benign_false_refusal_rate": steered["benign_false_refusal_rate"]["overall"]["rate"],
                       "borderline_false_refusal_rate": steered["benign_false_refusal_rate"]["borderline"]["rate"]}),
            "ab_table": table(ab), "sweep": table(sweep_rows),
            "gates_passed": all(g.passed for g in verdict), "gates": table([g._asdict() for g in verdict]),
            "alpha_curves": png_markdown(alpha_curves_png(curves, runs[REVERSE_ARM][1], REVERSE_ALPHA, chosen),
                                         "alpha curves")})

    @dg.asset_check(asset=operating_point, name=STEERING_GATES, blocking=True,
                    description="The operating point against data/gates.yaml `steering`: harmful completion "
                                "reduction, benign and borderline false refusal, KL, perplexity, task accuracy, sign "
                                "flips, reverse-safety capability recovery and throughput overhead")
    def steering_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        directory = Path(required_metadata(context.instance, operating_point.key)["path"])
        _, _, config = load_operating_point(directory, accept_failed_gates=True)  # every file verified by sha256
        metrics = {key: load_metrics(Path(run["path"])) for key, run in config["evaluation"].items()}
        for key, m in metrics.items():
            if m["metrics_sha256"] != config["evaluation"][key]["metrics_sha256"]:
                raise dg.Failure(f"the {key} metrics changed since the operating point was chosen")
        results = operating_point_results(load_gates().steering, metrics[sweep_key(0.0)],
                                          metrics[sweep_key(config["alpha"])], metrics[REVERSE_ARM],
                                          config["throughput"]["overhead"])
        return dg.AssetCheckResult(
            passed=all(g.passed for g in results), severity=dg.AssetCheckSeverity.ERROR,
            metadata={"alpha": config["alpha"], **{g.name: g.value for g in results},
                      "gates": table([g._asdict() for g in results])})

    return [alpha_sweep, operating_point, steering_gates]
