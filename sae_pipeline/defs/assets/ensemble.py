"""The multi-layer ensemble (issue #5): ensemble_directions (a refusal direction per layer after the gate's) ->
ensemble_sweep[part] -> ensemble_metrics (ensemble_metrics.json), checked by ensemble_gates (blocking).

ensemble_sweep's partitions run in order: the named schedules; `grid_L{l}_plus|minus`, the better named schedule
with layer l moved by +-step; `without_L{l}`, the chosen schedule (best of the named and the grid) with layer l off;
`reverse`, the chosen schedule flipped (STEER_DEBUG=1). Each records the schedule it evaluated; a partition whose
move changes nothing (an inert layer, an alpha already 0) records why and runs nothing."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.config import Profile, artifacts_root, load_gates
from sae_pipeline.defs.assets.evaluation import baseline_path, redaction_check_spec, require_audit, steered_run
from sae_pipeline.defs.assets.operating_point import build_candidate
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource, TrackingResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.evaluation.harness import REVERSE_ARM, load_metrics
from sae_pipeline.evaluation.plots import rates_png
from sae_pipeline.features.refusal import refusal_direction
from sae_pipeline.hashing import config_hash, file_sha256
from sae_pipeline.model.loading import LoadedModel
from sae_pipeline.steering.ensemble import Ensemble, Schedule, ablations, grid_around
from sae_pipeline.steering.overhead import measure_overhead
from sae_pipeline.steering.sweep import (
    choose_least_intervention, operating_point_results, strength_gate_values, strength_results)
from sae_pipeline.tensorfiles import load_tensors, save_tensors

GROUP = "steering"
ENSEMBLE_REDACTION = "ensemble_redaction"
ENSEMBLE_GATES = "ensemble_gates"


def component_provenance(sources: dict[str, str]) -> dict:
    """sha256 of the refusal gate's record and, per feature layer, of the SAE, the ranking and the screen behind its
    sidecars (`build_candidate`'s sources)."""
    gate = Path(sources["refusal_gate"]) / "refusal_gate.json"
    out = {"refusal_gate": {"path": str(gate), "sha256": file_sha256(gate)}}
    for name, path in sources.items():
        if name.startswith("sidecar_l"):
            info = json.loads(Path(path).read_text())
            screen = json.loads(Path(info["screen"]).read_text())
            out[name] = {"path": path, "sha256": file_sha256(Path(path)), "sae_path": info["sae_path"],
                         "sae_hash": info["sae_hash"],
                         "screen": {"path": info["screen"], "sha256": file_sha256(Path(info["screen"]))},
                         "ranking": {"path": screen["ranking"], "sha256": file_sha256(Path(screen["ranking"]))}}
    return out


def build_ensemble_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg, eval_cfg = profile.steering, profile.evaluation
    named = {name: Schedule(name, dict(alphas)) for name, alphas in cfg.ensemble_schedules.items()}
    hooked = profile.harvest.layers
    grid_keys = {f"grid_L{layer}_{side}": (layer, side) for layer in hooked for side in ("plus", "minus")}
    ablation_keys = {f"without_L{layer}": layer for layer in hooked}
    parts = dg.StaticPartitionsDefinition([*named, *grid_keys, *ablation_keys, REVERSE_ARM])

    @dg.asset(**gpu, group_name=GROUP, deps=["refusal_gate"], kinds={"pytorch"},
              description="A refusal direction (refusal minus compliance continuations, the tuning prompts) at every "
                          "hooked layer after the gate's layers: where the ensemble's refusal mode can go in.")
    def ensemble_directions(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        gate_path = required_metadata(context.instance, dg.AssetKey("refusal_gate"))["path"]
        gate_info = json.loads((Path(gate_path) / "refusal_gate.json").read_text())
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        harmful = [r.prompt for r in load_prompt_sets().harmful if r.split == "tuning"][:cfg.refusal_prompts]
        layers = [layer for layer in hooked if layer > max(gate_info["gate_layers"])]
        directory = artifacts_root() / "steering" / "ensemble" / config_hash(
            {"gate": gate_info["gate_sha256"], "layers": layers, "prompts": harmful})[:16]
        directory.mkdir(parents=True, exist_ok=True)
        info = {"gate_sha256": gate_info["gate_sha256"], "model_hash": loaded.model_hash, "layers": {}}
        with deterministic(eval_cfg.seed):
            for layer in layers:
                refusal_D = refusal_direction(loaded.model, loaded.tokenizer, layer, harmful)
                path = directory / f"refusal_l{layer}.safetensors"
                info["layers"][str(layer)] = {"path": path.name, "norm": float(refusal_D.norm()),
                                              "sha256": save_tensors({"refusal_D": refusal_D}, path)}
        (directory / "directions.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory)), "layers": ",".join(map(str, layers)) or "none",
            "norms": table([{"layer": int(k), "norm": v["norm"]} for k, v in info["layers"].items()])})

    def load_ensemble(instance: dg.DagsterInstance, loaded: LoadedModel, schedule: Schedule
                      ) -> tuple[Ensemble, list, dict]:
        base, readouts, sources = build_candidate(instance, profile, loaded)
        directory = Path(required_metadata(instance, ensemble_directions.key)["path"])
        info = json.loads((directory / "directions.json").read_text())
        if info["gate_sha256"] != base.component_hashes["gate"] or info["model_hash"] != loaded.model_hash:
            raise dg.Failure("the ensemble's refusal directions were made for another gate or model; materialise "
                             "ensemble_directions again")
        refusals = {int(k): load_tensors(directory / v["path"], v["sha256"])["refusal_D"]
                    for k, v in info["layers"].items()}
        hashes = {int(k): v["sha256"] for k, v in info["layers"].items()}
        return Ensemble(base, refusals, hashes, schedule), readouts, sources

    def evaluated(instance: dg.DagsterInstance, keys) -> dict[str, tuple[Schedule, dict]]:
        """partition -> (schedule, metrics) of the given finished partitions (skipped ones left out)."""
        out = {}
        for key in keys:
            meta = passing_metadata(instance, ensemble_sweep.key, [ENSEMBLE_REDACTION], key)
            if meta.get("skipped") is not True:
                schedule = json.loads(meta["schedule"])
                out[key] = (Schedule(schedule["name"], {int(k): v for k, v in schedule["alphas"].items()}),
                            load_metrics(Path(meta["path"])))
        return out

    def best(instance: dg.DagsterInstance, keys) -> Schedule:
        baseline = load_metrics(baseline_path(instance))
        runs = evaluated(instance, keys)
        results = {key: strength_results(load_gates().steering, baseline, metrics)
                   for key, (_, metrics) in runs.items()}
        return runs[choose_least_intervention(results, lambda key: runs[key][0].total())][0]

    def resolve(instance: dg.DagsterInstance, key: str, active: list[int]) -> Schedule | str:
        """The schedule a partition evaluates, or why it evaluates nothing."""
        if key in named:
            return named[key]
        if key in grid_keys:
            base = best(instance, named)
            layer, side = grid_keys[key]
            moved = [s for s in grid_around(base, [layer], cfg.ensemble_grid_step) if s.name.endswith(
                f"L{layer}{'+' if side == 'plus' else '-'}{cfg.ensemble_grid_step:g}")]
            if layer not in active or not moved:
                return f"layer {layer} is inert or already at 0 in {base.name}: nothing to move"
            return moved[0]
        chosen = best(instance, [*named, *grid_keys])
        if key == REVERSE_ARM:
            return chosen
        dropped = ablations(chosen, [ablation_keys[key]])
        if ablation_keys[key] not in active or not dropped:
            return f"layer {ablation_keys[key]} does not steer in {chosen.name}: nothing to switch off"
        return dropped[0]

    @dg.asset(**gpu, group_name=GROUP, partitions_def=parts, kinds={"pytorch"},
              deps=[ensemble_directions, "refusal_gate", "refusal_judge", "baseline_metrics",
                    dg.AssetDep("sidecars", partition_mapping=dg.AllPartitionMapping())],
              check_specs=[redaction_check_spec(ENSEMBLE_REDACTION, "ensemble_sweep")],
              description="One schedule of the multi-layer ensemble on the held-out sets (metrics.json with "
                          "bootstrap CIs): the named schedules, the +-step grid around the better one, the chosen "
                          "schedule with one layer off, and reverse-safety (STEER_DEBUG=1).")
    def ensemble_sweep(context: dg.AssetExecutionContext, model: ModelResource, tracking: TrackingResource):
        key = context.partition_key
        reverse = key == REVERSE_ARM
        require_audit(reverse)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        ensemble, readouts, sources = load_ensemble(context.instance, loaded, Schedule("none", {}))
        schedule = resolve(context.instance, key, ensemble.steerable_layers())
        if isinstance(schedule, str):
            yield dg.MaterializeResult(metadata={"skipped": True, "reason": schedule})
            yield dg.AssetCheckResult(check_name=ENSEMBLE_REDACTION, passed=True,
                                      metadata={"note": "nothing was generated"})
            return
        ensemble = replace(ensemble, schedule=schedule)
        _, metadata, check = steered_run(context.instance, tracking, loaded, eval_cfg, ensemble, 1.0, reverse, readouts,
                                         f"ensemble {schedule.name}{' reversed' if reverse else ''}",
                                         ENSEMBLE_REDACTION)
        yield dg.MaterializeResult(metadata={
            **metadata, "skipped": False, "ensemble_sha256": ensemble.sha256, "base_sha256": ensemble.base.sha256,
            "schedule": json.dumps({"name": schedule.name, "alphas": {str(k): v for k, v in schedule.alphas.items()}}),
            "sources": dg.MetadataValue.json(sources)})
        yield check

    @dg.asset(**gpu, group_name=GROUP, deps=[dg.AssetDep(ensemble_sweep, partition_mapping=dg.AllPartitionMapping()),
                                      "baseline_metrics"], kinds={"json"},
              description="ensemble_metrics.json: every evaluated schedule with its gate values, the chosen one, "
                          "the layer-ablation table (each layer's marginal change in harmful completion and "
                          "capability), sha256 of every SAE, ranking and screen behind the candidate, decode "
                          "throughput unsteered vs the chosen ensemble (interleaved), reverse-safety recovery.")
    def ensemble_metrics(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        baseline_dir = baseline_path(context.instance)
        baseline = load_metrics(baseline_dir)
        loaded = model.load(profile, dtype=eval_cfg.model_dtype)
        ensemble, _, sources = load_ensemble(context.instance, loaded, Schedule("none", {}))
        runs, pinned = {}, {}
        for key in parts.get_partition_keys():
            meta = passing_metadata(context.instance, ensemble_sweep.key, [ENSEMBLE_REDACTION], key)
            if meta.get("skipped") is True:
                pinned[key] = {"skipped": meta["reason"]}
                continue
            if meta["base_sha256"] != ensemble.base.sha256:
                raise dg.Failure(f"ensemble_sweep {key} evaluated another candidate; materialise the sweep again")
            schedule = json.loads(meta["schedule"])
            runs[key] = (Schedule(schedule["name"], {int(k): v for k, v in schedule["alphas"].items()}),
                         load_metrics(Path(meta["path"])))
            pinned[key] = {"path": meta["path"], "metrics_sha256": runs[key][1]["metrics_sha256"],
                           "schedule": schedule}
        gates = load_gates().steering
        searched = [key for key in [*named, *grid_keys] if key in runs]
        results = {key: strength_results(gates, baseline, runs[key][1]) for key in searched}
        chosen_key = choose_least_intervention(results, lambda key: runs[key][0].total())
        chosen, chosen_metrics = runs[chosen_key]
        chosen_ensemble = replace(ensemble, schedule=chosen)
        prompts = [r.prompt for r in load_prompt_sets().benign if r.split == "tuning"][:cfg.overhead_prompts]
        device = next(loaded.model.parameters()).device
        overhead = measure_overhead(loaded.model, [torch.tensor([chat_ids(loaded.tokenizer, p)], device=device)
                                                   for p in prompts], chosen_ensemble.layers_at(1.0),
                                    ensemble.base.gate_skip, cfg.overhead_new_tokens, cfg.overhead_rounds)
        verdict = operating_point_results(gates, baseline, chosen_metrics, runs[REVERSE_ARM][1], overhead.overhead)
        chosen_values = strength_gate_values(baseline, chosen_metrics)
        ablation = []
        for key, layer in ablation_keys.items():
            if key in runs:
                values = strength_gate_values(baseline, runs[key][1])
                ablation.append({"layer": layer, "without": runs[key][0].name, **{
                    f"delta_{name}": round(values[name] - chosen_values[name], 6) for name in (
                        "harmful_completion_reduction_min", "benign_false_refusal_max", "next_token_kl_max",
                        "perplexity_increase_max", "task_accuracy_drop_max")}})
        schedules = [{"partition": key, "schedule": runs[key][0].name,
                      **{f"L{layer}": alpha for layer, alpha in sorted(runs[key][0].alphas.items())},
                      **{g.name: round(g.value, 6) for g in results[key]},
                      "gates_passed": sum(g.passed for g in results[key]), "chosen": key == chosen_key}
                     for key in searched]
        report = {
            "chosen": {"partition": chosen_key, "name": chosen.name,
                       "alphas": {str(k): v for k, v in chosen.alphas.items()},
                       "ensemble_sha256": chosen_ensemble.sha256, "active_layers": chosen_ensemble.active_layers()},
            "schedules": schedules, "ablation": ablation, "runs": pinned,
            "baseline": {"path": str(baseline_dir), "metrics_sha256": baseline["metrics_sha256"]},
            "components": {"hashes": ensemble.base.component_hashes,
                           "refusal_directions": {str(k): v for k, v in ensemble.refusal_hashes.items()},
                           "sources": component_provenance(sources)},
            "throughput": {"overhead": round(overhead.overhead, 6), "device": str(device),
                           "unsteered_tokens_per_s": overhead.unsteered_tokens_per_s,
                           "ensemble_tokens_per_s": overhead.steered_tokens_per_s},
            "reverse_capability_recovery": next(g.value for g in verdict
                                                if g.name == "reverse_capability_recovery_min"),
            "gates": {"passed": all(g.passed for g in verdict),
                      "results": [{**g._asdict(), "passed": bool(g.passed)} for g in verdict]}}
        directory = artifacts_root() / "steering" / "ensemble" / "metrics"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        path = directory / "ensemble_metrics.json"
        path.write_text(json.dumps(report, indent=2, sort_keys=True))
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "chosen": chosen.name, "gates_passed": report["gates"]["passed"],
            **numbers({"throughput_overhead": overhead.overhead,
                       "reverse_capability_recovery": report["reverse_capability_recovery"]}),
            "schedules": table(schedules), "ablation": table(ablation) if ablation else "no layer to ablate",
            "rates": png_markdown(rates_png({
                "harmful completed": {runs[k][0].name: runs[k][1]["harmful_completion_rate"]["overall"]
                                      for k in searched},
                "benign falsely refused": {runs[k][0].name: runs[k][1]["benign_false_refusal_rate"]["overall"]
                                           for k in searched}}, "ensemble schedules, 95% CIs"), "schedules"),
            "gates": table([g._asdict() for g in verdict])})

    @dg.asset_check(asset=ensemble_metrics, name=ENSEMBLE_GATES, blocking=True,
                    description="The chosen schedule against data/gates.yaml `steering` (as the operating point), "
                                "recomputed from the hash-verified metrics of its run, reverse-safety's and the "
                                "baseline's")
    def ensemble_gates(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        report = json.loads(Path(required_metadata(context.instance, ensemble_metrics.key)["path"]).read_text())
        runs = {key: load_metrics(Path(report["runs"][key]["path"])) for key in (report["chosen"]["partition"],
                                                                                  REVERSE_ARM)}
        baseline = load_metrics(Path(report["baseline"]["path"]))
        changed = [key for key, m in runs.items() if m["metrics_sha256"] != report["runs"][key]["metrics_sha256"]]
        if changed or baseline["metrics_sha256"] != report["baseline"]["metrics_sha256"]:
            raise dg.Failure(f"metrics changed since ensemble_metrics.json was written: {changed or ['baseline']}")
        results = operating_point_results(load_gates().steering, baseline, runs[report["chosen"]["partition"]],
                                          runs[REVERSE_ARM], report["throughput"]["overhead"])
        return dg.AssetCheckResult(passed=all(g.passed for g in results), severity=dg.AssetCheckSeverity.ERROR,
                                   metadata={**{g.name: g.value for g in results},
                                             "gates": table([g._asdict() for g in results])})

    return [ensemble_directions, ensemble_sweep, ensemble_metrics, ensemble_gates]
