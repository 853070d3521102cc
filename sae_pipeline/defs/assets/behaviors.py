"""Behaviour dictionaries (issue #5): behavior_layers -> behavior_features[behavior x layer] -> behavior_crosstalk
(blocking check `crosstalk`: the |cos| limits; check `crosstalk_count`: the kept count, recorded in the release) and
behavior_screen[behavior x layer] (causal quick screen) and behavior_router (whose request is it, on the refusal gate's
summary) -> behavior_release (sidecars per behaviour and layer, grouped per layer, the per-behaviour refusal mode and
multi_behavior_config.json). Only layers whose SAE passes sae_quality can be chosen; the others are scored and
reported."""

import json
import shutil
from pathlib import Path

import dagster as dg

from sae_pipeline.behaviors.crosstalk import (crosstalk_measures, load_directions, save_selections,
                                              select_without_crosstalk)
from sae_pipeline.behaviors.layers import choose_behavior_layers, pooled_mlp_outputs
from sae_pipeline.behaviors.plots import crosstalk_figure, ranking_scatter
from sae_pipeline.behaviors.ranking import rank_behavior_latents
from sae_pipeline.behaviors.release import CONFIG_FILE, RefusalRouting, behavior_sidecar, write_release
from sae_pipeline.behaviors.router import fit_router, load_router, save_router
from sae_pipeline.config import Profile, artifacts_root, load_gates
from sae_pipeline.corpus.build import load_manifest
from sae_pipeline.defs.assets.behavior_screen import build_behavior_screen_assets
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.checks import CROSSTALK
from sae_pipeline.defs.lineage import passing_metadata, required_metadata
from sae_pipeline.defs.metadata import numbers, png_markdown, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.features.gate import concat_layers, load_refusal_gate, prompt_summaries
from sae_pipeline.features.ranking import ranking_provenance, write_ranking
from sae_pipeline.features.scoring import score_latents
from sae_pipeline.gates import check_gates
from sae_pipeline.hashing import config_hash, file_sha256
from sae_pipeline.layout import corpus_dir, features_dir, sae_layer_dir
from sae_pipeline.sae.gates import sae_gate_failures
from sae_pipeline.sae.model import TopKSAE

GROUP = "behaviors"
CROSSTALK_COUNT = "crosstalk_count"
COS_GATES = ("crosstalk_cos_max", "crosstalk_flagged_cos_max")  # blocking: what the release's directions must meet
COUNT_GATES = ("crosstalk_shortfall_max",)  # recorded in the release (apply_behaviors refuses it by default)


def build_behavior_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg = profile.behaviors
    layers = profile.harvest.layers
    partitions = dg.MultiPartitionsDefinition({
        "behavior": dg.StaticPartitionsDefinition(cfg.behaviors),
        "layer": dg.StaticPartitionsDefinition([str(layer) for layer in layers])})

    def sae_paths(loaded) -> dict[int, Path]:
        corpus_sha256 = load_manifest(corpus_dir(profile)).sha256
        return {layer: sae_layer_dir(profile, loaded, corpus_sha256, layer) for layer in layers}

    @dg.asset(**gpu, group_name=GROUP, deps=["sae", "prompt_sets"], kinds={"pytorch"},
              description="Per behaviour, a probe (its harmful tuning prompts vs the benign ones, pooled MLP outputs) "
                          "at every SAE layer, AUROC on the held-back half; each behaviour keeps its best layers "
                          "among those whose SAE passes its gates.")
    def behavior_layers(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        loaded = model.load(profile)
        gates = load_gates()
        failures = {layer: sae_gate_failures(path, gates) for layer, path in sae_paths(loaded).items()}
        eligible = [layer for layer, failed in failures.items() if not failed]
        sets = load_prompt_sets()
        tuning = [r for r in sets.harmful if r.split == profile.features.split and r.category in cfg.behaviors]
        benign = [r.prompt for r in sets.benign if r.split == profile.features.split]
        batch = profile.features.batch_size
        with deterministic(profile.features.seed):
            choice = choose_behavior_layers(
                pooled_mlp_outputs(loaded.model, loaded.tokenizer, layers, [r.prompt for r in tuning], batch),
                [r.category for r in tuning],
                pooled_mlp_outputs(loaded.model, loaded.tokenizer, layers, benign, batch), cfg.max_layers, eligible)
        key = config_hash({"behaviors": cfg.model_dump(mode="json"), "model": loaded.model_hash,
                           "data": sets.dataset_hash, "eligible": eligible, "split": profile.features.split,
                           "seed": profile.features.seed})
        directory = artifacts_root() / "behaviors" / key[:16]
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "behavior_layers.json"
        path.write_text(json.dumps({"layers": choice.layers, "auroc": choice.auroc, "eligible": eligible,
                                    "sae_gate_failures": {str(k): v for k, v in failures.items()},
                                    "model_hash": loaded.model_hash, "dataset_hash": sets.dataset_hash},
                                   indent=2, sort_keys=True))
        rows = [{"behavior": b, **{f"L{layer}": choice.auroc[b][layer] for layer in layers},
                 "chosen": ",".join(map(str, choice.layers[b]))} for b in cfg.behaviors]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "eligible_layers": ",".join(map(str, eligible)) or "none",
            "auroc": table(rows)})

    @dg.asset(**gpu, group_name=GROUP, deps=[behavior_layers, "sae"], partitions_def=partitions, kinds={"pandas"},
              description=f"At a layer the behaviour chose: every latent scored on that behaviour's harmful tuning "
                          f"prompts vs the benign ones, and the top {cfg.top_n} by the harmonic mean of the ranks "
                          "of |delta_mu| and probe contribution. A layer the behaviour did not choose records why.")
    def behavior_features(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        keys = context.partition_key.keys_by_dimension
        behavior, layer = keys["behavior"], int(keys["layer"])
        chosen = json.loads(Path(required_metadata(context.instance, behavior_layers.key)["path"]).read_text())
        if layer not in chosen["layers"][behavior]:
            return dg.MaterializeResult(metadata={"chosen": False, "reason": (
                f"{behavior} chose layers {chosen['layers'][behavior]} (AUROC "
                f"{chosen['auroc'][behavior][str(layer)]:.3f} here; eligible: {chosen['eligible']})")})
        loaded = model.load(profile)
        sae_path = sae_paths(loaded)[layer]
        sae, sae_cfg = TopKSAE.load(sae_path)
        sets = load_prompt_sets()
        harmful = [r.prompt for r in sets.harmful if r.split == profile.features.split and r.category == behavior]
        benign = [r.prompt for r in sets.benign if r.split == profile.features.split]
        with deterministic(profile.features.seed):
            scores = score_latents(loaded.model, loaded.tokenizer, sae, layer, harmful, benign,
                                   profile.features.batch_size)
        cfg_hash = config_hash({"features": profile.features.model_dump(mode="json"),
                                "behaviors": cfg.model_dump(mode="json")})
        provenance = ranking_provenance(sae_path, profile.features.seed, layer, sets.dataset_hash, cfg_hash)
        records, order = rank_behavior_latents(scores, behavior, cfg.top_n, provenance)
        path = write_ranking(records, features_dir(sae_path, sets.dataset_hash, cfg_hash) / "behaviors", layer,
                             cfg.top_n, behavior)
        candidates = path.parent / f"candidates_l{layer}_{behavior}.json"  # every live latent, ranked
        candidates.write_text(json.dumps({"sae_hash": sae_cfg["sae_hash"], "feature_ids": order}))
        shown = ("rank", "feature_id", "delta_mu", "probe_weight", "harmonic_rank", "auroc_harmful", "liveness")
        return dg.MaterializeResult(metadata={
            "chosen": True, "path": dg.MetadataValue.path(str(path)),
            "candidates": dg.MetadataValue.path(str(candidates)),
            "sae_path": dg.MetadataValue.path(str(sae_path)), "sae_hash": sae_cfg["sae_hash"],
            **numbers({"features": len(records), "probe_auroc": scores.probe_auroc,
                       "harmful_prompts": scores.n_harmful, "benign_prompts": scores.n_benign}),
            "top_25": table([{k: r[k] for k in shown} for r in records[:25]]),
            "ranking": png_markdown(ranking_scatter(scores.delta_mu_F, scores.probe_weight_F, order,
                                                    [r["feature_id"] for r in records],
                                                    f"{behavior}, layer {layer}"), "behaviour ranking")})

    every = dg.AllPartitionMapping()

    @dg.asset(group_name=GROUP, deps=[dg.AssetDep(behavior_features, partition_mapping=every)], kinds={"pytorch"},
              description="Per layer, the behaviours take turns keeping their ranked features whose decoder "
                          "directions stay nearly orthogonal to those fixed for the others (when too few do, "
                          "deflated against them and flagged); the cross-talk report with every pair's max |cos|.")
    def behavior_crosstalk(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        section = load_gates().behaviors
        directory = Path(required_metadata(context.instance, behavior_layers.key)["path"]).parent
        report, rows = {}, []
        for layer in layers:
            ranked, pinned_candidates, sae_path, sae_hash = {}, {}, None, None
            for behavior in cfg.behaviors:
                key = dg.MultiPartitionKey({"behavior": behavior, "layer": str(layer)})
                made = required_metadata(context.instance, behavior_features.key, key)
                if made["chosen"]:
                    candidates = json.loads(Path(made["candidates"]).read_text())
                    ranked[behavior] = candidates["feature_ids"]
                    pinned_candidates[behavior] = {"path": made["candidates"],
                                                   "sha256": file_sha256(Path(made["candidates"]))}
                    sae_path, sae_hash = Path(made["sae_path"]), candidates["sae_hash"]
            if not ranked:
                continue
            sae, sae_cfg = TopKSAE.load(sae_path)
            if sae_cfg["sae_hash"] != sae_hash:
                raise dg.Failure(f"layer {layer}: the rankings were made with SAE {sae_hash[:12]}, the SAE is now "
                                 f"{sae_cfg['sae_hash'][:12]}; materialise behavior_features again")
            result = select_without_crosstalk(ranked, sae.W_dec_FD.detach(), cfg.top_n,
                                              section["crosstalk_cos_max"].value,
                                              section["crosstalk_flagged_cos_max"].value, cfg.min_deflated_norm)
            path = directory / f"crosstalk_l{layer}.safetensors"
            report[str(layer)] = {
                "sae_path": str(sae_path), "sae_hash": sae_hash, "order": list(ranked), "candidates": pinned_candidates,
                "directions": {"path": str(path), "sha256": save_selections(result, path)},
                "pair_max_cos": result.pair_max_cos, "shortfall": result.shortfall,
                "behaviors": {b: {"feature_ids": s.feature_ids, "flagged": s.flagged, "raw_max_cos": s.raw_max_cos}
                              for b, s in result.selections.items()}}
            rows += [{"layer": layer, "behavior": b, "kept": len(s.feature_ids), "flagged": sum(s.flagged),
                      "shortfall": result.shortfall[b], "flagged_raw_max_cos": max(
                          (c for c, f in zip(s.raw_max_cos, s.flagged) if f), default=0.0)}
                     for b, s in result.selections.items()]
        if not report:
            raise dg.Failure("no behaviour chose any layer (no SAE passes its gates?): nothing to select")
        path = directory / "crosstalk_report.json"
        path.write_text(json.dumps({"layers": report, "keep": cfg.top_n}, indent=2, sort_keys=True))
        pairs = [{"layer": int(layer), "pair": pair, "max_cos": value}
                 for layer, entry in report.items() for pair, value in entry["pair_max_cos"].items()]
        figures = {f"crosstalk_l{layer}": png_markdown(crosstalk_figure(
            int(layer), entry["pair_max_cos"], {b: len(s["feature_ids"]) for b, s in entry["behaviors"].items()},
            {b: sum(s["flagged"]) for b, s in entry["behaviors"].items()}, cfg.top_n,
            section["crosstalk_cos_max"].value, section["crosstalk_flagged_cos_max"].value), f"cross-talk l{layer}")
            for layer, entry in report.items()}
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(path)), "selections": table(rows),
                                              "pairs": table(pairs) if pairs else "one behaviour per layer",
                                              **figures})

    def crosstalk_results(context: dg.AssetCheckExecutionContext, names: tuple[str, ...]) -> dg.AssetCheckResult:
        report = json.loads(Path(required_metadata(context.instance, behavior_crosstalk.key)["path"]).read_text())
        try:
            measured = crosstalk_measures(report)
        except ValueError as err:  # an inconsistent selection fails the check (a tampered file raises on its own)
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                       metadata={"error": str(err)})
        section = load_gates().behaviors
        results = check_gates({name: section[name] for name in names}, measured)
        return dg.AssetCheckResult(passed=all(g.passed for g in results), severity=dg.AssetCheckSeverity.ERROR,
                                   metadata={"gates": table([g._asdict() for g in results])})

    @dg.asset_check(asset=behavior_crosstalk, name=CROSSTALK, blocking=True,
                    description="Representation cross-talk against data/gates.yaml `behaviors`, recomputed from the "
                                "hash-pinned directions and the SAE (never read from the report): max |cos| between "
                                "two behaviours' unflagged directions, and max |cos| where a flagged (deflated) one "
                                "is involved")
    def crosstalk(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return crosstalk_results(context, COS_GATES)

    @dg.asset_check(asset=behavior_crosstalk, name=CROSSTALK_COUNT, blocking=False,
                    description="How many features a behaviour fell short of the configured count after the filter. "
                                "Not blocking, so the release can still be evaluated; the release records it and "
                                "apply_behaviors refuses a release that failed it unless accept_failed_gates")
    def crosstalk_count(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        return crosstalk_results(context, COUNT_GATES)

    @dg.asset(**gpu, group_name=GROUP, deps=["refusal_gate", "prompt_sets"], kinds={"pytorch"},
              description="Whose request is it: a one-vs-rest classifier over the behaviours on the refusal gate's "
                          "prompt summary (the harmful tuning prompts), L2 by cross-validated accuracy; the release "
                          "routes each prompt the gate fires on to one behaviour's refusal strength.")
    def behavior_router(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        gate_dir = Path(required_metadata(context.instance, dg.AssetKey("refusal_gate"))["path"])
        gate, _, info = load_refusal_gate(gate_dir)
        loaded = model.load(profile, dtype=profile.evaluation.model_dtype)
        if info["model_hash"] != loaded.model_hash:
            raise dg.Failure(f"the refusal gate in {gate_dir} was fit on another model; materialise it again")
        sets = load_prompt_sets()
        tuning = [r for r in sets.harmful if r.split == "tuning" and r.category in cfg.behaviors]
        with deterministic(profile.evaluation.seed):
            summaries = prompt_summaries(loaded.model, loaded.tokenizer, gate.layers, [r.prompt for r in tuning])
        fit = fit_router(concat_layers(summaries, gate.layers), [r.category for r in tuning], cfg.behaviors,
                         gate.layers, profile.steering.gate_folds)
        key = config_hash({"gate": info["gate_sha256"], "data": sets.dataset_hash, "behaviors": cfg.behaviors,
                           "folds": profile.steering.gate_folds})
        directory = artifacts_root() / "behaviors" / "router" / key[:16]
        directory.mkdir(parents=True, exist_ok=True)
        info_path = directory / "router.json"
        info_path.write_text(json.dumps({
            "behaviors": list(fit.router.names), "layers": list(fit.router.layers), "l2": fit.l2,
            "cv_accuracy": fit.cv_accuracy, "cv_confusion": fit.cv_confusion,
            "cv_by_l2": {str(k): v for k, v in fit.cv_by_l2.items()}, "gate_dir": str(gate_dir),
            "gate_sha256": info["gate_sha256"], "refusal_sha256": info["refusal_sha256"],
            "router_sha256": save_router(fit.router, directory / "router.safetensors"),
            "model_hash": loaded.model_hash, "dataset_hash": sets.dataset_hash}, indent=2, sort_keys=True))
        confusion = [{"behavior": true, **routed} for true, routed in fit.cv_confusion.items()]
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(info_path)), **numbers({"cv_accuracy": fit.cv_accuracy, "l2": fit.l2,
                                                                      "prompts": len(tuning)}),
            "gate_layers": ",".join(map(str, gate.layers)), "cv_confusion": table(confusion)})

    [behavior_screen] = build_behavior_screen_assets(profile, partitions)
    screen_key = behavior_screen.key

    @dg.asset(group_name=GROUP, deps=[behavior_crosstalk, dg.AssetDep(behavior_screen, partition_mapping=every),
                                      behavior_router, "refusal_gate"], kinds={"pytorch"},
              description="The behaviour release, artifacts/behaviors/release/: per behaviour and layer a sidecar "
                          f"(dense and SAE8) of the (at most {cfg.sidecar_features}) features that passed the "
                          "cross-talk filter and its causal quick screen (steering along the filter's directions, "
                          "each in its wanted sign), a grouped sidecar per layer, "
                          "the per-behaviour refusal mode (gate, router, refusal vector) and "
                          "multi_behavior_config.json pinning every file by sha256 with each behaviour's alpha and "
                          "the cross-talk gates it was written under. apply_behaviors(model, that directory) applies "
                          "it; one that failed a gate only with accept_failed_gates=True.")
    def behavior_release(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        report_path = Path(passing_metadata(context.instance, behavior_crosstalk.key, [CROSSTALK])["path"])
        report = json.loads(report_path.read_text())
        section = load_gates().behaviors
        gates = check_gates({name: section[name] for name in COS_GATES + COUNT_GATES}, crosstalk_measures(report))
        router_info_path = Path(required_metadata(context.instance, behavior_router.key)["path"])
        router_info = json.loads(router_info_path.read_text())
        gate_dir = Path(router_info["gate_dir"])
        gate, refusal_D, gate_info = load_refusal_gate(gate_dir)
        if (gate_info["gate_sha256"], gate_info["refusal_sha256"]) != (router_info["gate_sha256"],
                                                                       router_info["refusal_sha256"]):
            raise dg.Failure("the refusal gate changed since the router was fit; materialise behavior_router again")
        router = load_router(router_info_path.parent / "router.safetensors", router_info["router_sha256"],
                             router_info["behaviors"])
        refusal = RefusalRouting(int(gate_info["layer"]), refusal_D, gate, router, profile.steering.refusal_beta,
                                 int(gate_info["gate_skip"]))
        sidecars, saes, rankings, rows, ids_by_layer, dictionaries = {}, {}, {}, [], {}, {}
        for layer, entry in report["layers"].items():
            sae, _ = TopKSAE.load(Path(entry["sae_path"]))  # its hash was just checked by crosstalk_measures
            directions = load_directions(Path(entry["directions"]["path"]), entry["directions"]["sha256"])
            saes[layer] = {"path": entry["sae_path"], "sae_hash": entry["sae_hash"]}
            for behavior in entry["order"]:
                partition = dg.MultiPartitionKey({"behavior": behavior, "layer": layer})
                screened = required_metadata(context.instance, screen_key, partition)
                screen = json.loads(Path(screened["path"]).read_text())
                if file_sha256(Path(screened["path"])) != screened["sha256"] or screen["directions"] != \
                        entry["directions"]:
                    raise dg.Failure(f"behavior_screen {behavior}|{layer} changed or screened another selection; "
                                     "materialise it again")
                made = required_metadata(context.instance, behavior_features.key, partition)
                rankings[f"{behavior}|{layer}"] = {"ranking": {"path": made["path"],
                                                               "sha256": file_sha256(Path(made["path"]))},
                                                   "candidates": entry["candidates"][behavior],
                                                   "screen": {"path": screened["path"], "sha256": screened["sha256"]}}
                selection, ids = directions[behavior], screen["selected"]
                dictionaries.setdefault(int(layer), {})[behavior] = selection.feature_ids
                rows_N = [selection.feature_ids.index(i) for i in ids]
                rows.append({"layer": int(layer), "behavior": behavior, "features": len(ids),
                             "flagged": int(selection.flagged_N[rows_N].sum())})
                if not ids:
                    continue  # the screen kept none: the behaviour steers by its refusal routing alone here
                sidecars.setdefault(int(layer), {})[behavior] = behavior_sidecar(
                    sae, ids, selection.directions_ND[rows_N], screen["signs"])
                ids_by_layer.setdefault(int(layer), {})[behavior] = ids
        directory = artifacts_root() / "behaviors" / "release"
        shutil.rmtree(directory, ignore_errors=True)  # this asset's own output: no stale sidecar may linger
        recorded = [{**g._asdict(), "passed": bool(g.passed)} for g in gates]
        config = write_release(directory, sidecars, {b: cfg.alpha for b in cfg.behaviors},
                               profile.steering.sidecar_nnz, {
                                   "sae": saes, "rankings": rankings, "epsilon": profile.steering.epsilon,
                                   "model_hash": router_info["model_hash"],
                                   "router_info": {"path": str(router_info_path),
                                                   "sha256": file_sha256(router_info_path),
                                                   "cv_accuracy": router_info["cv_accuracy"]},
                                   "crosstalk": {"path": str(report_path), "sha256": file_sha256(report_path),
                                                 "pair_max_cos": {layer: e["pair_max_cos"]
                                                                  for layer, e in report["layers"].items()}}},
                               refusal, recorded, ids_by_layer, dictionaries)
        sizes = {f"grouped_l{layer}_sae8_bytes": (directory / entry["sae8"]["path"]).stat().st_size
                 for layer, entry in config["layers"].items()}
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory / CONFIG_FILE)), "sidecars": table(rows),
            "gates_passed": config["gates"]["passed"], "gates": table([g._asdict() for g in gates]),
            "refusal_layer": refusal.layer, **numbers(sizes)})

    return [behavior_layers, behavior_features, behavior_crosstalk, crosstalk, crosstalk_count, behavior_router,
            behavior_screen, behavior_release]
