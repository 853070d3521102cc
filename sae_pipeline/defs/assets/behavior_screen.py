"""behavior_screen[behavior x layer]: each behaviour's causal quick screen (issue #5), between the cross-talk filter
and the release. The behaviour's kept features, best ranked first, are nudged along the filter's directions on its
own harmful tuning prompts and a benign slice (features/causal.py, with the quick sizes of `behaviors`); a feature
is kept only if it raised harmful refusal, the benign slice's false refusal stayed within the gate
(`behaviors.screen_benign_false_refusal_max`), and steering it alone by the release's rule flipped no sign of its
behaviour's dictionary on any benign tuning prompt (`behaviors.screen_sign_flips_max`, behaviors/screen.py).
Interrupted screens resume from their journal."""

import json
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.behaviors.crosstalk import load_directions
from sae_pipeline.behaviors.screen import steered_sign_flips
from sae_pipeline.config import Profile, load_gates
from sae_pipeline.defs.execution import on_gpu
from sae_pipeline.defs.checks import CROSSTALK
from sae_pipeline.defs.lineage import passing_metadata
from sae_pipeline.defs.metadata import numbers, table
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.evaluation.generation import chat_ids
from sae_pipeline.evaluation.run import build_judges, select_primary
from sae_pipeline.features.causal import Journal, journal_key, screen_features
from sae_pipeline.hashing import file_sha256
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.runtime import RULE_VERSION

GROUP = "behaviors"


def screen_path(crosstalk_report: Path, behavior: str, layer: int) -> Path:
    return crosstalk_report.parent / f"screen_l{layer}_{behavior}.json"


def build_behavior_screen_assets(profile: Profile, partitions: dg.MultiPartitionsDefinition) -> list:
    gpu = on_gpu(profile.execution)
    cfg = profile.behaviors
    screen_cfg = cfg.screen_config(profile.features)

    @dg.asset(**gpu, group_name=GROUP, deps=["behavior_crosstalk", "refusal_judge"], partitions_def=partitions,
              kinds={"pytorch"},
              description=f"A behaviour's causal quick screen at a layer: its first {cfg.screen_candidates} "
                          "cross-talk-kept features nudged along their (possibly deflated) directions, refusal "
                          f"log-prob, then decoded refusal for the best {cfg.screen_decode_candidates} on its "
                          f"harmful tuning prompts and false refusal on {cfg.screen_benign_prompts} benign ones; at "
                          f"most {cfg.sidecar_features} kept, each with its wanted sign, none that flips a sign in its "
                          "behaviour's dictionary on a benign tuning prompt when steered alone.")
    def behavior_screen(context: dg.AssetExecutionContext, model: ModelResource) -> dg.MaterializeResult:
        keys = context.partition_key.keys_by_dimension
        behavior, layer = keys["behavior"], int(keys["layer"])
        report_path = Path(passing_metadata(context.instance, dg.AssetKey("behavior_crosstalk"), [CROSSTALK])["path"])
        entry = json.loads(report_path.read_text())["layers"].get(str(layer))
        if entry is None or behavior not in entry["order"]:
            return dg.MaterializeResult(metadata={"screened": False, "reason": (
                f"{behavior} is not hooked at layer {layer} (behavior_layers did not choose it there)")})
        selection = load_directions(Path(entry["directions"]["path"]), entry["directions"]["sha256"])[behavior]
        sae, sae_cfg = TopKSAE.load(Path(entry["sae_path"]))
        if sae_cfg["sae_hash"] != entry["sae_hash"]:
            raise dg.Failure(f"layer {layer}: the SAE changed since the cross-talk selection; select again")
        candidates = selection.feature_ids[:cfg.screen_candidates]
        directions = {f: selection.directions_ND[i] for i, f in enumerate(candidates)}
        loaded = model.load(profile, dtype=profile.evaluation.model_dtype)
        sets = load_prompt_sets()
        judges, _ = build_judges(sets)
        primary = select_primary(judges, profile.evaluation.refusal_judge)
        harmful = [r.prompt for r in sets.harmful if r.split == screen_cfg.split and r.category == behavior]
        # the benign slice both sets the latents' sigmas and measures false refusal: the whole benign tuning set
        # (1,062 prompts) would triple the screen's time for a sigma no steadier at this size
        benign = [r.prompt for r in sets.benign if r.split == screen_cfg.split][:screen_cfg.screen_benign_prompts]
        path = screen_path(report_path, behavior, layer)
        journal = Journal(path.with_suffix(".journal.jsonl"), journal_key(
            {"sae": sae_cfg["sae_hash"], "model": loaded.model_hash, "dtype": profile.evaluation.model_dtype,
             "judge": primary.identity, "deciding_judge": primary.refusal.name,
             "directions": entry["directions"]["sha256"]}, candidates, harmful, benign, screen_cfg))
        if journal.done:
            context.log.info(f"resuming the screen: {len(journal.done)} measurements already made")
        with deterministic(screen_cfg.seed):
            result = screen_features(loaded.model, loaded.tokenizer, sae, layer, candidates, harmful, benign,
                                     primary.refusal, screen_cfg, journal, directions)
        gates = load_gates().behaviors
        limit, flips_limit = gates["screen_benign_false_refusal_max"].value, gates["screen_sign_flips_max"].value
        baseline_benign = result.baseline["benign_false_refusal"]
        for record in result.records:
            change = record.get("benign_false_refusal_change")  # None: not decoded, or no harmful gain to weigh
            record["benign_false_refusal"] = None if change is None else baseline_benign + change
            if record["selected"] and record["benign_false_refusal"] > limit:
                record["selected"] = False  # the absolute bound on the benign slice
        kept = [r for r in result.records if r["selected"]]
        if kept:
            ids = [r["feature_id"] for r in kept]
            # zero flips is a claim about every benign question, so the whole benign tuning split tests it: on the
            # 100-prompt slice latent 2300 flipped nothing, yet it flipped one sign on the held-out QA
            clean = [r.prompt for r in sets.benign if r.split == screen_cfg.split]
            step = f"sign_flips:{ids}:{cfg.alpha}:{profile.steering.epsilon}:{len(clean)}:rule{RULE_VERSION}"
            flips = journal.measure(step, lambda: {
                str(f): n for f, n in steered_sign_flips(
                    loaded.model, [chat_ids(loaded.tokenizer, p) for p in clean], sae, layer,
                    selection.feature_ids, ids, torch.stack([directions[f] for f in ids]),
                    [r["wanted_sign"] for r in kept], cfg.alpha, profile.steering.epsilon).items()})
            for record in kept:
                record["benign_sign_flips"] = flips[str(record["feature_id"])]
                record["selected"] = record["benign_sign_flips"] <= flips_limit
            kept = [r for r in kept if r["selected"]]
        path.write_text(json.dumps({
            "behavior": behavior, "layer": layer, "sae_hash": sae_cfg["sae_hash"],
            "directions": entry["directions"], "config": screen_cfg.model_dump(mode="json"),
            "benign_false_refusal_max": limit, "sign_flips_max": flips_limit, "baseline": result.baseline,
            "selected": [r["feature_id"] for r in kept], "signs": [r["wanted_sign"] for r in kept],
            "records": result.records}, indent=2, sort_keys=True))
        shown = ("feature_id", "sigma", "logprob_shift_minus", "logprob_shift_plus", "harmful_refusal_gain",
                 "seeds_decoded", "benign_false_refusal", "benign_sign_flips", "selected")
        return dg.MaterializeResult(metadata={
            "screened": True, "path": dg.MetadataValue.path(str(path)), "sha256": file_sha256(path),
            "selected": ",".join(str(r["feature_id"]) for r in kept) or "none",
            **numbers({"kept": len(kept), "candidates": len(candidates),
                       "baseline_harmful_refusal": sum(result.baseline["harmful_refusal_by_seed"])
                       / len(result.baseline["harmful_refusal_by_seed"]),
                       "baseline_benign_false_refusal": baseline_benign}),
            "screen": table([{k: r.get(k, "") for k in shown} for r in result.records])})

    return [behavior_screen]
