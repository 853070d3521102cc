"""Steering ingredients per layer: refusal_gate[layer] = the probe gate (cross-validated on the tuning prompts) and
the refusal direction. They read raw activations, not the SAE, so they do not wait on sae_quality."""

import dagster as dg

from sae_pipeline.config import Profile, artifacts_root
from sae_pipeline.defs.metadata import numbers, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.features.gate import fit_probe_gate, prompt_means, save_refusal_gate, template_prefix_length
from sae_pipeline.features.refusal import refusal_direction
from sae_pipeline.hashing import config_hash

GROUP = "steering"


def build_steering_assets(profile: Profile) -> list:
    layers = dg.StaticPartitionsDefinition([str(layer) for layer in profile.harvest.layers])
    cfg = profile.steering

    @dg.asset(group_name=GROUP, deps=["prompt_sets"], partitions_def=layers, kinds={"pytorch"},
              description="Probe gate (L2 and threshold by cross-validation on the tuning prompts, benign budget "
                          "from the config) and refusal direction for the conditional refusal mode.")
    def refusal_gate(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        layer = int(context.partition_key)
        loaded = model.load(profile, dtype=profile.evaluation.model_dtype)
        sets = load_prompt_sets()
        harmful = [r.prompt for r in sets.harmful if r.split == "tuning"]
        benign = [r.prompt for r in sets.benign if r.split == "tuning"]
        with deterministic(profile.evaluation.seed):
            fit = fit_probe_gate(prompt_means(loaded.model, loaded.tokenizer, layer, harmful),
                                 prompt_means(loaded.model, loaded.tokenizer, layer, benign),
                                 cfg.max_benign_fire, cfg.gate_folds)
            refusal_D = refusal_direction(loaded.model, loaded.tokenizer, layer, harmful[:cfg.refusal_prompts])
        key = config_hash({"steering": cfg.model_dump(mode="json"), "model": loaded.model_hash,
                           "data": sets.dataset_hash})
        directory = artifacts_root() / "steering" / "gates" / key[:16] / f"layer_{layer}"
        info = save_refusal_gate(directory, layer, fit, refusal_D, {
            "model_hash": loaded.model_hash, "dataset_hash": sets.dataset_hash,
            "gate_skip": template_prefix_length(loaded.tokenizer), "config": cfg.model_dump(mode="json")})
        return dg.MaterializeResult(metadata={
            **numbers({k: info[k] for k in ("l2", "cv_harmful_fire", "cv_benign_fire", "refusal_norm")}),
            "path": dg.MetadataValue.path(str(directory)), "gate_skip": info["gate_skip"],
            "cross_validation": table([{"l2": float(l2), "harmful_fire": h, "benign_fire": b}
                                       for l2, (h, b) in info["cv_by_l2"].items()])})

    return [refusal_gate]
