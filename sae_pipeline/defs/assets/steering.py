"""Steering: refusal_gate (probe gate and refusal direction, from raw activations: it does not wait on the SAEs),
causal_screen[layer] -> sidecars[layer] (the selected SAE features), alpha_sweep[alpha] (the candidate operating
point on the held-out sets at each strength, and reverse-safety) -> operating_point (the chosen strength on disk,
checked against the steering gates)."""

import json
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.config import Profile, artifacts_root
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import required_metadata
from sae_pipeline.defs.metadata import numbers, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.evaluation.run import build_judges, select_primary
from sae_pipeline.features.causal import Journal, journal_key, screen_features, sidecar_from_sae
from sae_pipeline.features.gate import (BorderlineBudget, choose_gate, prompt_summaries, save_refusal_gate,
                                        template_prefix_length)
from sae_pipeline.features.refusal import refusal_direction
from sae_pipeline.hashing import config_hash, file_sha256
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.sidecar import read_sae8, save_dense, write_sae8

GROUP = "steering"


def build_steering_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    cfg = profile.steering

    @dg.asset(**gpu, group_name=GROUP, deps=["prompt_sets"], kinds={"pytorch"},
              description="Probe gate for the conditional refusal mode: one per candidate layer set (L2 and "
                          "threshold by cross-validation on the tuning prompts, benign budget from the config), the "
                          "set that catches the most harmful prompts kept (residual-stream summaries: mean and last "
                          "token); the refusal "
                          "direction at the refusal layer, where the gate decides.")
    def refusal_gate(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        loaded = model.load(profile, dtype=profile.evaluation.model_dtype)
        sets = load_prompt_sets()
        harmful = [r.prompt for r in sets.harmful if r.split == "tuning"]
        benign_rows = [r for r in sets.benign if r.split == "tuning"]
        benign = [r.prompt for r in benign_rows]
        mask_N = torch.tensor([r.domain == "borderline" for r in benign_rows])
        borderline = BorderlineBudget(mask_N, cfg.borderline_max_fire, cfg.borderline_weight) if mask_N.any() else None
        read = sorted({layer for layers in cfg.gate_layer_sets for layer in layers})
        with deterministic(profile.evaluation.seed):
            fit, candidates = choose_gate(prompt_summaries(loaded.model, loaded.tokenizer, read, harmful),
                                          prompt_summaries(loaded.model, loaded.tokenizer, read, benign),
                                          cfg.gate_layer_sets, cfg.max_benign_fire, cfg.gate_folds, borderline)
            layer = cfg.refusal_layer
            refusal_D = refusal_direction(loaded.model, loaded.tokenizer, layer, harmful[:cfg.refusal_prompts])
        key = config_hash({"steering": cfg.model_dump(mode="json"), "model": loaded.model_hash,
                           "data": sets.dataset_hash})
        directory = artifacts_root() / "steering" / "gates" / key[:16]
        info = save_refusal_gate(directory, layer, fit, refusal_D, {
            "model_hash": loaded.model_hash, "dataset_hash": sets.dataset_hash,
            "gate_skip": template_prefix_length(loaded.tokenizer), "candidates": candidates,
            "config": cfg.model_dump(mode="json")})
        context.log.info(f"gate layers {fit.gate.layers}: out-of-fold harmful fire {fit.cv_harmful_fire:.3f} at "
                         f"benign {fit.cv_benign_fire:.3f} (borderline {fit.cv_borderline_fire})")
        return dg.MaterializeResult(metadata={
            **numbers({k: info[k] for k in ("l2", "cv_harmful_fire", "cv_benign_fire", "cv_borderline_fire",
                                             "refusal_norm")}),
            "gate_layers": ",".join(map(str, fit.gate.layers)), "refusal_layer": layer,
            "path": dg.MetadataValue.path(str(directory)), "gate_skip": info["gate_skip"],
            "layer_sets": table(candidates)})

    layers = dg.StaticPartitionsDefinition([str(layer) for layer in profile.harvest.layers])
    features_cfg = profile.features

    @dg.asset(**gpu, group_name=GROUP, deps=["feature_ranking", "refusal_judge"], partitions_def=layers,
              kinds={"pytorch"},
              description=f"Each top-ranked latent nudged by +-{features_cfg.screen_sigmas:g} sigma at its hook: "
                          "refusal log-prob, then decoded refusal on harmful mini-batches (several seeds) and false "
                          f"refusal on benign prompts; the {features_cfg.screen_keep} strongest without a benign "
                          "spike are kept.")
    def causal_screen(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        ranked = required_metadata(context.instance, dg.AssetKey("feature_ranking"), context.partition_key)
        ranking_path, sae_path = Path(ranked["path"]), Path(ranked["sae_path"])
        records = json.loads(ranking_path.read_text())
        sae, sae_cfg = TopKSAE.load(sae_path)
        if {r["sae_hash"] for r in records} != {sae_cfg["sae_hash"]}:
            raise dg.Failure(f"layer {layer}: the ranking was made with another SAE than {sae_path}; materialise "
                             "feature_scores and feature_ranking again")
        loaded = model.load(profile, dtype=profile.evaluation.model_dtype)
        sets = load_prompt_sets()
        judges, _ = build_judges(sets)
        primary = select_primary(judges, profile.evaluation.refusal_judge)
        judge = primary.refusal
        harmful = [r.prompt for r in sets.harmful if r.split == features_cfg.split]
        benign = [r.prompt for r in sets.benign if r.split == features_cfg.split]
        candidates = [r["feature_id"] for r in records[:features_cfg.screen_candidates]]
        path = ranking_path.parent / f"causal_screen_l{layer}.json"
        journal = Journal(path.with_suffix(".journal.jsonl"),
                          journal_key({"sae": sae_cfg["sae_hash"], "model": loaded.model_hash,
                                       "dtype": profile.evaluation.model_dtype, "judge": primary.identity,
                                       "deciding_judge": judge.name}, candidates, harmful, benign, features_cfg))
        if journal.done:
            context.log.info(f"resuming the screen: {len(journal.done)} measurements already made")
        with deterministic(features_cfg.seed):
            result = screen_features(loaded.model, loaded.tokenizer, sae, layer, candidates, harmful, benign, judge,
                                     features_cfg, journal)
        path.write_text(json.dumps({"layer": layer, "sae_hash": sae_cfg["sae_hash"], "ranking": str(ranking_path),
                                    "config": features_cfg.model_dump(mode="json"), "baseline": result.baseline,
                                    "selected": result.selected, "signs": result.signs,
                                    "records": result.records}, indent=2, sort_keys=True))
        shown = ("feature_id", "sigma", "logprob_shift_minus", "logprob_shift_plus", "harmful_refusal_gain_minus",
                 "harmful_refusal_gain_plus", "seeds_decoded", "benign_false_refusal_change", "selected")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "sae_path": dg.MetadataValue.path(str(sae_path)),
            "sae_hash": sae_cfg["sae_hash"], "selected": ",".join(map(str, result.selected)),
            **numbers({"kept": len(result.selected),
                       "baseline_harmful_refusal": sum(result.baseline["harmful_refusal_by_seed"])
                       / len(result.baseline["harmful_refusal_by_seed"]),
                       "baseline_benign_false_refusal": result.baseline["benign_false_refusal"]}),
            "screen": table([{k: r.get(k, "") for k in shown} for r in result.records])})

    @dg.asset(group_name=GROUP, deps=[causal_screen], partitions_def=layers, kinds={"safetensors"},
              description="The screened features as steering sidecars: dense safetensors (what the operating point "
                          "uses) and the compressed SAE8 binary, with its size and round-trip error.")
    def sidecars(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        screened = required_metadata(context.instance, causal_screen.key, context.partition_key)
        screen = json.loads(Path(screened["path"]).read_text())
        sae, sae_cfg = TopKSAE.load(Path(screened["sae_path"]))
        if screen["sae_hash"] != sae_cfg["sae_hash"]:
            raise dg.Failure(f"layer {layer}: the screen was made with another SAE; materialise causal_screen again")
        directory = (artifacts_root() / "steering" / "sidecars" / sae_cfg["sae_hash"][:12]
                     / file_sha256(Path(screened["path"]))[:12])
        directory.mkdir(parents=True, exist_ok=True)
        info = {"layer": layer, "feature_ids": screen["selected"], "signs": screen["signs"],
                "sae_hash": sae_cfg["sae_hash"], "sae_path": screened["sae_path"], "screen": screened["path"]}
        metrics = {"features": len(screen["selected"])}
        if screen["selected"]:
            sidecar = sidecar_from_sae(sae, screen["selected"], screen["signs"])
            nnz = min(cfg.sidecar_nnz, sidecar.A_sel_ND.shape[1])
            info |= {"dense": f"sidecar_l{layer}.safetensors", "sae8": f"sidecar_l{layer}.sae8",
                     "dense_sha256": save_dense(sidecar, directory / f"sidecar_l{layer}.safetensors"),
                     "sae8_sha256": write_sae8(sidecar, directory / f"sidecar_l{layer}.sae8", nnz)}
            decoded = read_sae8(directory / info["sae8"], info["sae8_sha256"])
            # quantisation error on the entries SAE8 keeps, and how much of each row's energy those entries hold
            kept = [(dense * (packed != 0), packed) for dense, packed in zip(sidecar[:2], decoded[:2])]
            metrics |= {"sae8_nnz_per_feature": nnz, "sae8_bytes": (directory / info["sae8"]).stat().st_size,
                        "dense_bytes": (directory / info["dense"]).stat().st_size,
                        "sae8_quantisation_max_abs": max(float((a - b).abs().max()) for a, b in kept),
                        "sae8_min_row_energy_kept": min(float(((a ** 2).sum(1) / (d ** 2).sum(1)).min())
                                                        for (a, _), d in zip(kept, sidecar[:2])),
                        "sae8_tau_max_abs": float((sidecar.tau_N - decoded.tau_N).abs().max())}
        else:
            context.log.warning(f"layer {layer}: the causal screen kept no feature (none raised harmful refusal "
                                "without a benign spike); the layer contributes no feature steering")
        info |= metrics
        (directory / f"sidecar_l{layer}.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(directory / f"sidecar_l{layer}.json")),
            "feature_ids": ",".join(map(str, screen["selected"])) or "none", **numbers(metrics)})

    return [refusal_gate, causal_screen, sidecars]
