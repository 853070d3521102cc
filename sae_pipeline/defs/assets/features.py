"""Feature discovery assets: feature_scores[layer] -> feature_ranking[layer].

They read the layer's SAE only if its sae_quality gates pass (re-checked from the SAE's metrics.json, so the gate
holds across separate runs too, not only within the run that trained the SAE)."""

import json
from pathlib import Path

import dagster as dg

from sae_pipeline.config import Profile, load_gates
from sae_pipeline.corpus.build import load_manifest
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.lineage import required_metadata
from sae_pipeline.defs.metadata import png_markdown, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.features.plots import delta_mu_histogram
from sae_pipeline.features.ranking import rank_latents, ranking_provenance, write_ranking
from sae_pipeline.features.scoring import score_latents
from sae_pipeline.features.store import load_matching_scores, load_scores, save_scores
from sae_pipeline.hashing import config_hash
from sae_pipeline.layout import corpus_dir, features_dir, sae_layer_dir
from sae_pipeline.sae.gates import sae_gate_failures
from sae_pipeline.sae.model import TopKSAE

GROUP = "features"


def build_feature_assets(profile: Profile) -> list:
    gpu = on_gpu(profile.execution)
    layers = dg.StaticPartitionsDefinition([str(layer) for layer in profile.harvest.layers])
    cfg = profile.features

    @dg.asset(**gpu, group_name=GROUP, deps=["sae", "prompt_sets"], partitions_def=layers, kinds={"pytorch"},
              description="Every SAE latent scored as a harm detector on the tuning prompts (delta_mu, AUROC, "
                          "refusal correlation, liveness, position profile, probe AUROC, rank stability).")
    def feature_scores(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        loaded = model.load(profile)
        sae_path = sae_layer_dir(profile, loaded, load_manifest(corpus_dir(profile)).sha256, layer)
        sets = load_prompt_sets()
        out = features_dir(sae_path, sets.dataset_hash, config_hash(cfg.model_dump(mode="json")))
        failed = sae_gate_failures(sae_path, load_gates())
        if failed:
            raise dg.Failure(f"layer {layer}: the SAE fails sae_quality ({', '.join(failed)}); features are not "
                             "scored on an SAE that misses its gates")
        sae, sae_cfg = TopKSAE.load(sae_path)
        harmful = [r.prompt for r in sets.harmful if r.split == cfg.split]
        benign = [r.prompt for r in sets.benign if r.split == cfg.split]
        provenance = ranking_provenance(sae_path, cfg.seed, layer, sets.dataset_hash,
                                        config_hash(cfg.model_dump(mode="json")))
        scores = load_matching_scores(out, provenance)
        reused = scores is not None
        if reused:
            context.log.info(f"layer {layer}: reusing the scores already made for this SAE, data and config in {out}")
        else:
            with deterministic(cfg.seed):
                scores = score_latents(loaded.model, loaded.tokenizer, sae, layer, harmful, benign, cfg.batch_size)
        sha256 = save_scores(scores, out, provenance)
        live = scores.liveness_F > 0
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(out)), "sae_path": dg.MetadataValue.path(str(sae_path)),
            "scores_sha256": sha256, "sae_hash": sae_cfg["sae_hash"], "scores_reused": reused,
            "probe_auroc": scores.probe_auroc, "rank_stability_spearman": scores.rank_stability,
            "live_latents": int(live.sum()), "harmful_prompts": scores.n_harmful, "benign_prompts": scores.n_benign,
            "delta_mu_histogram": png_markdown(delta_mu_histogram(
                scores.delta_mu_F, live, cfg.top_n, f"layer {layer}"), "delta_mu histogram")})

    @dg.asset(group_name=GROUP, deps=[feature_scores], partitions_def=layers, kinds={"pandas"},
              description=f"The top {cfg.top_n} latents by delta_mu, as JSON, parquet and CSV.")
    def feature_ranking(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        # the scores' own materialisation says where they and their SAE are: no model load just for paths
        scored = required_metadata(context.instance, feature_scores.key, context.partition_key)
        out, sae_path = Path(scored["path"]), Path(scored["sae_path"])
        scores, provenance = load_scores(out)
        current = json.loads((sae_path / "cfg.json").read_text())["sae_hash"]
        if provenance["sae_hash"] != current:
            raise dg.Failure(f"layer {layer}: the scores were made with SAE {provenance['sae_hash'][:12]}, the SAE "
                             f"is now {current[:12]}; materialise feature_scores again")
        records = rank_latents(scores, cfg.top_n, provenance)
        path = write_ranking(records, out, layer, cfg.top_n)
        shown = ("rank", "feature_id", "delta_mu", "auroc_harmful", "refusal_corr", "liveness", "mean_activation")
        return dg.MaterializeResult(metadata={
            "path": dg.MetadataValue.path(str(path)), "sae_path": dg.MetadataValue.path(str(sae_path)),
            "features": len(records),
            "top_delta_mu": records[0]["delta_mu"] if records else 0.0,
            "top_25": table([{k: r[k] for k in shown} for r in records[:25]])})

    return [feature_scores, feature_ranking]
