"""The Dagster layer on the tiny profile: definitions load, assets materialise, the blocking check blocks."""

import json
import os
from datetime import datetime, timezone
from pathlib import Path

import dagster as dg
import pytest
import torch
import yaml

from sae_pipeline.config import load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline_tests.conftest import gates_forcing, step_failure, write_gates


def test_default_definitions_load():
    from sae_pipeline.defs import defs

    dg.Definitions.validate_loadable(defs)
    assert {key.to_user_string() for key in defs.resolve_all_asset_keys()} == {
        "corpus", "activations", "sae", "prompt_sets", "refusal_judge", "baseline_metrics", "feature_scores",
        "feature_ranking", "refusal_gate", "causal_screen", "sidecars", "alpha_sweep", "operating_point",
        "ensemble_directions", "ensemble_sweep", "ensemble_metrics",
        "behavior_layers", "behavior_features", "behavior_crosstalk", "behavior_router", "behavior_screen",
        "behavior_release",
        "behavior_arms", "behavior_evaluation", "fused_net", "fused_export", "fused_release", "fused_arms",
        "fused_evaluation", "release", "smoke_reference", "smoke_metrics", "audit_suite", "audit_arms",
        "audit_evaluation", "audit_diagnostics", "locale_alphas"}
    checks = {key.name for key in defs.resolve_asset_graph().asset_check_keys}
    assert checks == {"sae_quality", "datasets_lock", "splits_disjoint", "dataset_sizes", "judge_accuracy",
                      "baseline_complete", "redaction", "sweep_redaction", "steering_gates", "crosstalk",
                      "crosstalk_count", "arm_redaction", "behavior_gates", "ensemble_redaction", "ensemble_gates",
                      "fused_net_gates", "fused_export_gates", "fused_arm_redaction", "fused_gates",
                      "release_integrity", "smoke_reference_redaction", "smoke_redaction", "smoke_gates",
                      "audit_suite_lock", "audit_arm_redaction", "audit_gates", "audit_diagnostics_redaction",
                      "locale_alphas_redaction"}
    assert all(defs.resolve_job_def(name) is not None
               for name in ("main", "sweep", "ensemble", "behaviors", "screens", "arms", "fused", "fused_backends",
                            "smoke", "audit"))
    schedule = defs.resolve_schedule_def("nightly_smoke")
    assert schedule.job_name == "smoke" and schedule.execution_timezone == "UTC"
    context = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 11, 30, 3, tzinfo=timezone.utc))
    [request] = list(schedule.evaluate_tick(context).run_requests)
    assert request.job_name in (None, "smoke")


def _tiny_defs(extra_assets=(), **overrides):
    base = build_defs(load_profile("tiny").updated(**overrides))
    return dg.Definitions(assets=[*base.assets, *extra_assets], asset_checks=base.asset_checks,
                          resources=base.resources)


@dg.asset(deps=["sae"], partitions_def=dg.StaticPartitionsDefinition(["1", "3"]))
def downstream_of_sae() -> None:
    """Stands in for feature_scores: it must not run when sae_quality fails."""


def _materialize(defs, selection, instance, partition=None):
    return dg.materialize(list(defs.assets), selection=selection, instance=instance, resources=defs.resources,
                          partition_key=partition, raise_on_error=False)


@pytest.mark.parametrize("r2_min, expect_pass, l1_sweep", [(0.0, True, [0.0, 0.003]), (1.01, False, [])])
def test_tiny_pipeline_materialises_and_the_blocking_check_gates_downstream(
        artifacts, tmp_path, monkeypatch, r2_min, expect_pass, l1_sweep):
    monkeypatch.setenv("SAE_PIPELINE_GATES", str(write_gates(tmp_path / "gates.yaml", r2_min)))
    defs = _tiny_defs([downstream_of_sae], sae={"l1_sweep": l1_sweep})
    with dg.instance_for_test() as instance:
        assert _materialize(defs, "corpus", instance).success
        for layer in ("1", "3"):
            assert _materialize(defs, "activations", instance, layer).success
        result = _materialize(defs, ["sae", "downstream_of_sae"], instance, "3")
        checks = result.get_asset_check_evaluations()
        assert [c.check_name for c in checks] == ["sae_quality"]
        assert checks[0].passed is expect_pass
        assert result.success is expect_pass
        materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
        assert "sae" in materialized
        assert ("downstream_of_sae" in materialized) is expect_pass
        metadata = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
        for key in ("r2", "dead_fraction", "coherence_p95", "k_active_p50", "loss_recovered", "sae_hash",
                    "liveness_histogram", "training_curve", "l1_sweep"):
            assert key in metadata, key
        # a later, separate run: feature discovery re-checks the SAE's gates before reading it
        features = _materialize(defs, ["feature_scores", "feature_ranking"], instance, "3")
        assert features.success is expect_pass
        ranked = {e.asset_key.to_user_string(): e for e in features.get_asset_materialization_events()}
        if expect_pass:
            path = ranked["feature_ranking"].event_specific_data.materialization.metadata["path"].value
            assert path.endswith("top512_ranking_l3.json") and json.loads(open(path).read())
        else:
            assert not ranked
            failure = next(e for e in features.all_events if e.event_type_value == "STEP_FAILURE")
            assert "fails sae_quality (r2_min)" in str(failure.event_specific_data.error)
        assert metadata["liveness_histogram"].value.startswith("![liveness histogram](data:image/png;base64,")
    [metrics_file] = artifacts.glob("sae/*/*/layer_03/metrics.json")
    record = json.loads(metrics_file.read_text())
    assert [row["l1_coeff"] for row in record["l1_sweep"]] == (l1_sweep or [0.003])
    assert record["metrics"]["l1_coeff"] in (l1_sweep or [0.003])
    assert not list(metrics_file.parent.glob("l1_*")), "candidate checkpoints are removed once saved"


@pytest.mark.integration
def test_embedded_default_end_to_end_on_a_small_budget(artifacts_with_embedded_model):
    """Real SmolLM2, real corpus, layer 15, a budget small enough for CI; the project's own gates judge it."""
    profile = load_profile("smollm2-pilot").updated(
        harvest={"train_tokens": 16_384, "heldout_tokens": 4_096, "shard_tokens": 4_096},
        sae={"n_latents": 1152, "k": 16, "k_start": 32, "batch_tokens": 512, "epochs": 2.0, "aux_k": 64,
             "dead_window_tokens": 8192, "checkpoint_every_steps": 16, "splice_sequences": 4,
             "l1_sweep": []})  # one candidate: the sweep itself is covered on the tiny model
    defs = build_defs(profile)
    with dg.instance_for_test() as instance:
        assert _materialize(defs, "corpus", instance).success
        assert _materialize(defs, "activations", instance, "15").success
        result = _materialize(defs, "sae", instance, "15")
        [check] = result.get_asset_check_evaluations()
        metadata = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    gates = {record.data["name"]: record.data for record in check.metadata["gates"].value.records}
    assert set(gates) == {"r2_min", "dead_fraction_max", "coherence_p95_max", "near_duplicates_max"}
    assert check.passed == all(row["passed"] for row in gates.values())
    assert 0.2 < metadata["r2"].value < 1.0
    assert metadata["loss_recovered"].value > 0.0
    assert metadata["ce_spliced"].value < metadata["ce_zero_ablated"].value


def test_datasets_that_differ_from_the_lock_fail_the_blocking_checks(data_copy, artifacts, monkeypatch):
    path = data_copy / "prompts" / "benign.jsonl"
    path.write_text(path.read_text().replace('"prompt": "', '"prompt": "Please, ', 1))
    monkeypatch.setenv("SAE_PIPELINE_DATA", str(data_copy))
    defs = build_defs(load_profile("tiny"))
    with dg.instance_for_test() as instance:
        result = dg.materialize([*defs.assets, *defs.asset_checks], instance=instance, resources=defs.resources,
                                selection=["prompt_sets", "refusal_judge"], raise_on_error=False)
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not checks["datasets_lock"].passed
    assert "benign: prompts/benign.jsonl changed" in checks["datasets_lock"].metadata["details"].value
    assert not checks["splits_disjoint"].passed and not checks["dataset_sizes"].passed
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "refusal_judge" not in materialized, "a failed dataset check must block the judge"


def test_refusal_gate_asset_writes_a_verified_gate(artifacts):
    from sae_pipeline.features.gate import load_refusal_gate

    defs = build_defs(load_profile("tiny"))
    with dg.instance_for_test() as instance:
        result = _materialize(defs, "refusal_gate", instance)
    assert result.success
    metadata = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    gate, refusal_D, info = load_refusal_gate(Path(metadata["path"].value))
    assert refusal_D.shape == (64,) and gate.weight_D.shape == (2 * 64 * len(gate.layers),)  # mean + last token
    assert info["layer"] == 3 == metadata["refusal_layer"].value > gate.layers[-1]
    assert metadata["gate_layers"].value == ",".join(map(str, gate.layers))
    rows = [r.data for r in metadata["layer_sets"].value.records]
    assert [r["layers"] for r in rows] == ["1", "1,2"] and sum(r["chosen"] for r in rows) == 1
    benign = sum(1 for line in (Path(__file__).parents[1] / "data/prompts/benign.jsonl").open() if '"tuning"' in line)
    assert info["cv_benign_fire"] <= 0.02 + 1 / benign and 0 <= info["cv_harmful_fire"] <= 1
    assert metadata["gate_skip"].value == info["gate_skip"] > 0


def _checked(defs, selection, instance, partition=None):
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
                          resources=defs.resources, partition_key=partition, raise_on_error=False)


def test_tiny_steering_chain_from_the_screen_to_an_applicable_operating_point(
        artifacts_with_encoder, tmp_path, monkeypatch, tiny):
    from sae_pipeline import apply_patch, remove_patch
    from sae_pipeline.steering.runtime import SteeringError
    from sae_pipeline.config import load_gates
    from sae_pipeline.gates import check_gates
    from sae_pipeline.steering.sweep import STRENGTH_GATES, choose_alpha

    monkeypatch.setenv("SAE_PIPELINE_GATES", str(write_gates(tmp_path / "gates.yaml", 0.0)))
    monkeypatch.delenv("STEER_DEBUG", raising=False)
    defs = _tiny_defs(features={"screen_max_benign_spike": 1.0})
    with dg.instance_for_test() as instance:
        assert _materialize(defs, "corpus", instance).success
        assert _materialize(defs, "activations", instance, "3").success
        assert _materialize(defs, ["sae", "feature_scores", "feature_ranking"], instance, "3").success
        assert _materialize(defs, ["prompt_sets", "refusal_judge", "refusal_gate"], instance).success
        screened = _materialize(defs, ["causal_screen", "sidecars"], instance, "3")
        assert screened.success
        sidecar_meta = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                        for e in screened.get_asset_materialization_events()}["sidecars"]
        screen_meta = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                       for e in screened.get_asset_materialization_events()}["causal_screen"]
        kept = screen_meta["kept"].value
        assert sidecar_meta["features"].value == kept <= 2
        assert ("sae8_bytes" in sidecar_meta) == (kept > 0)
        assert _checked(defs, "operating_point", instance).success is False, "no sweep yet: nothing to choose from"
        for key in ("0.00", "1.00"):
            sweep = _checked(defs, "alpha_sweep", instance, key)
            assert sweep.success and [c.passed for c in sweep.get_asset_check_evaluations()] == [True]
        refused = _checked(defs, "alpha_sweep", instance, "reverse")
        assert not refused.success, "reverse-safety must not run without STEER_DEBUG=1"
        monkeypatch.setenv("STEER_DEBUG", "1")
        assert _checked(defs, "alpha_sweep", instance, "reverse").success
        chosen = _checked(defs, "operating_point", instance)
        [check] = chosen.get_asset_check_evaluations()
        metadata = chosen.get_asset_materialization_events()[0].event_specific_data.materialization.metadata

        # the multi-layer ensemble of the same candidate: named schedules, grid, ablation, reverse, then the metrics
        assert _checked(defs, ["baseline_metrics", "ensemble_directions"], instance).success
        sweep_keys = ["mid_heavy", "late_focused", "grid_L1_plus", "grid_L1_minus", "grid_L3_plus", "grid_L3_minus",
                      "without_L1", "without_L3", "reverse"]
        ran = {}
        for key in sweep_keys:
            result = _checked(defs, "ensemble_sweep", instance, key)
            assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
            ran[key] = result.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
        assert ran["grid_L1_plus"]["skipped"].value and "inert" in ran["grid_L1_plus"]["reason"].value
        assert json.loads(ran["grid_L3_plus"]["schedule"].value)["alphas"] == {"1": 0.0, "3": 1.1}  # late: fewer
        ensemble = _checked(defs, "ensemble_metrics", instance)
        [ensemble_check] = ensemble.get_asset_check_evaluations()
        report = json.loads(Path(ensemble.get_asset_materialization_events()[0].event_specific_data.materialization
                                 .metadata["path"].value).read_text())
        assert {row["partition"] for row in report["schedules"]} == {"mid_heavy", "late_focused", "grid_L3_plus",
                                                                     "grid_L3_minus"}
        assert [row["layer"] for row in report["ablation"]] == [3] and report["chosen"]["active_layers"] == [3]
        assert report["runs"]["without_L1"] == {"skipped": ran["without_L1"]["reason"].value}
        assert report["components"]["sources"]["refusal_gate"]["sha256"]
        assert ensemble.get_asset_materialization_events()[0].event_specific_data.materialization.metadata[
            "rates"].value.startswith("![schedules](data:image/png;base64,")
        assert ensemble_check.check_name == "ensemble_gates"
        assert ensemble_check.passed == report["gates"]["passed"]
    assert check.check_name == "steering_gates"
    rows = {r.data["name"]: r.data for r in check.metadata["gates"].value.records}
    assert set(rows) == {*STRENGTH_GATES, "reverse_capability_recovery_min", "throughput_overhead_max"}
    assert check.passed == all(r["passed"] for r in rows.values()) == metadata["gates_passed"].value
    sweep = [r.data for r in metadata["sweep"].value.records]
    steering_gates = load_gates().steering  # the chosen alpha follows from the sweep table and the gates alone
    rebuilt = {r["alpha"]: check_gates({name: steering_gates[name] for name in STRENGTH_GATES}, r) for r in sweep}
    assert [sum(g.passed for g in rebuilt[r["alpha"]]) for r in sweep] == [r["gates_passed"] for r in sweep]
    assert metadata["alpha"].value == choose_alpha(rebuilt)
    assert metadata["alpha_curves"].value.startswith("![alpha curves](data:image/png;base64,")
    assert {r.data["metric"] for r in metadata["ab_table"].value.records} >= {"harmful refused", "perplexity"}
    directory = Path(metadata["path"].value)
    assert directory == artifacts_with_encoder / "steering" / "operating_point"
    ids = torch.tensor([tiny.tokenizer("a prompt").input_ids])
    if not check.passed:
        with pytest.raises(SteeringError, match="failed its steering gates"):
            apply_patch(tiny.model, directory)
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
        apply_patch(tiny.model, directory, accept_failed_gates=not check.passed)
        remove_patch(tiny.model)
        assert torch.equal(tiny.model(input_ids=ids).logits, before)


def _each_behavior_and_layer(defs, asset, instance) -> dict:
    """Materialise every (behaviour, layer) partition of the tiny behaviour test; their metadata by pair."""
    made = {}
    for behavior in ("chem", "bio"):
        for layer in ("1", "3"):
            result = _materialize(defs, asset, instance, dg.MultiPartitionKey({"behavior": behavior, "layer": layer}))
            assert result.success
            made[behavior, layer] = result.get_asset_materialization_events()[0] \
                .event_specific_data.materialization.metadata
    return made


def test_tiny_behavior_release_from_layer_choice_to_its_evaluation(artifacts_with_encoder, tmp_path, monkeypatch,
                                                                   tiny):
    from sae_pipeline import apply_behaviors, remove_behaviors
    from sae_pipeline.steering.sidecar import SidecarError
    from sae_pipeline.tensorfiles import TensorFileError

    gates_path = write_gates(tmp_path / "gates.yaml", 0.0)
    monkeypatch.setenv("SAE_PIPELINE_GATES", str(gates_path))
    defs = _tiny_defs(behaviors={"behaviors": ["chem", "bio"], "max_layers": 1, "top_n": 16})
    with dg.instance_for_test() as instance:
        assert _materialize(defs, "corpus", instance).success
        assert _materialize(defs, "activations", instance, "3").success
        assert _materialize(defs, "sae", instance, "3").success  # layer 1 never trained: not eligible
        chosen = _materialize(defs, "behavior_layers", instance)
        metadata = chosen.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
        layers = json.loads(Path(metadata["path"].value).read_text())
        assert layers["eligible"] == [3] and layers["layers"] == {"chem": [3], "bio": [3]}
        assert layers["sae_gate_failures"]["1"] == ["not trained"] and 0 <= layers["auroc"]["chem"]["1"] <= 1
        made = _each_behavior_and_layer(defs, "behavior_features", instance)
        assert made["chem", "1"]["chosen"].value is False and "chose layers [3]" in made["chem", "1"]["reason"].value
        rows = json.loads(Path(made["bio", "3"]["path"].value).read_text())
        assert Path(made["bio", "3"]["path"].value).name == "top16_ranking_l3_bio.json"
        assert len(json.loads(Path(made["bio", "3"]["candidates"].value).read_text())["feature_ids"]) > 16
        assert len(rows) == 16 and {r["behavior"] for r in rows} == {"bio"} and rows[0]["layer"] == 3
        assert made["bio", "3"]["ranking"].value.startswith("![behaviour ranking](data:image/png;base64,")
        assert _materialize(defs, ["prompt_sets", "refusal_judge", "refusal_gate", "behavior_router"],
                            instance).success
        checked = _checked(defs, "behavior_crosstalk", instance)
        # checked again under cos limits it cannot meet: the release, in a run of its own, is refused
        monkeypatch.setenv("SAE_PIPELINE_GATES", str(gates_forcing(gates_path, tmp_path / "strict.yaml",
                                                                   ["behaviors"], passed=False)))
        strict = _checked(defs, dg.AssetSelection.checks(dg.AssetCheckKey(dg.AssetKey("behavior_crosstalk"),
                                                                          "crosstalk")), instance)
        assert [c.passed for c in strict.get_asset_check_evaluations()] == [False]
        monkeypatch.setenv("SAE_PIPELINE_GATES", str(gates_path))
        refused = _checked(defs, "behavior_release", instance)  # whatever the gates say now: the verdict stands
        assert "behavior_crosstalk: its blocking check crosstalk failed" in step_failure(refused)
        assert [c.passed for c in _checked(defs, dg.AssetSelection.checks_for_assets("behavior_crosstalk"), instance)
                .get_asset_check_evaluations() if c.check_name == "crosstalk"] == [True]
        assert checked.success  # the count check fails without blocking
        checks = {c.check_name: c for c in checked.get_asset_check_evaluations()}
        screens = _each_behavior_and_layer(defs, "behavior_screen", instance)
        assert screens["chem", "1"]["screened"].value is False and "not hooked" in screens["chem", "1"]["reason"].value
        screen = json.loads(Path(screens["bio", "3"]["path"].value).read_text())
        assert len(screen["records"]) == 3 and sum(r["decoded"] for r in screen["records"]) == 2
        assert all(r["benign_false_refusal"] <= 0.03 for r in screen["records"] if r["selected"])
        assert all(r["benign_sign_flips"] == 0 for r in screen["records"] if r["selected"])
        assert screen["selected"] == [r["feature_id"] for r in screen["records"] if r["selected"]]
        released = _checked(defs, "behavior_release", instance)
        assert released.success
        check = checks["crosstalk_count"]
        report_path = Path(checked.get_asset_materialization_events()[0].event_specific_data.materialization
                           .metadata["path"].value)
        report = json.loads(report_path.read_text())["layers"]["3"]
        figure = checked.get_asset_materialization_events()[0].event_specific_data.materialization \
            .metadata["crosstalk_l3"].value
        assert figure.startswith("![cross-talk l3](data:image/png;base64,")
        gates = {r.data["name"]: r.data for r in check.metadata["gates"].value.records}
        chem, bio = report["behaviors"]["chem"], report["behaviors"]["bio"]
        assert chem["feature_ids"] and bio["feature_ids"]  # turns: the first behaviour cannot take all the room
        # 2 x 16 directions in d_model 64 leave too little room: one falls short, and the count check says so
        shortfall = 16 - min(len(chem["feature_ids"]), len(bio["feature_ids"]))
        assert gates == {"crosstalk_shortfall_max": gates["crosstalk_shortfall_max"]}
        assert gates["crosstalk_shortfall_max"]["value"] == shortfall > 0 and not check.passed
        cos = {r.data["name"]: r.data for r in checks["crosstalk"].metadata["gates"].value.records}
        assert checks["crosstalk"].passed and set(cos) == {"crosstalk_cos_max", "crosstalk_flagged_cos_max"}
        assert report["pair_max_cos"]["chem|bio"] <= 0.07
        config_path = Path(released.get_asset_materialization_events()[0].event_specific_data.materialization
                           .metadata["path"].value)
        config = json.loads(config_path.read_text())
        kept = {b: json.loads(Path(screens[b, "3"]["path"].value).read_text())["selected"] for b in ("chem", "bio")}
        assert [name for name, _ in config["layers"].get("3", {}).get("groups", [])] == [b for b in kept if kept[b]]
        for behavior, ids in kept.items():
            assert config["behaviors"][behavior]["sidecars"].get("3", {}).get("feature_ids") == (ids or None)
        assert config["rankings"]["bio|3"]["screen"]["sha256"] == screens["bio", "3"]["sha256"].value
        assert config["behaviors"]["chem"]["alpha"] == 0.8 and set(config["rankings"]) == {"chem|3", "bio|3"}
        assert config["refusal"]["behaviors"] == ["chem", "bio"] and config["refusal"]["layer"] == 3
        assert config["dictionaries"] == {"3": {b: report["behaviors"][b]["feature_ids"] for b in ("chem", "bio")}}
        # the release records the count it failed: applied only when accepted explicitly
        assert not config["gates"]["passed"]
        with pytest.raises(SidecarError, match="crosstalk_shortfall_max"):
            apply_behaviors(tiny.model, config_path.parent)
        ids = torch.tensor([tiny.tokenizer("mix these chemicals").input_ids])
        with torch.no_grad():
            before = tiny.model(input_ids=ids).logits
            apply_behaviors(tiny.model, config_path.parent, {"chem": 5.0, "bio": 5.0}, accept_failed_gates=True)
            assert not torch.equal(tiny.model(input_ids=ids).logits, before)
            remove_behaviors(tiny.model)
            assert torch.equal(tiny.model(input_ids=ids).logits, before)

        # the release on the held-out sets: each arm, then ensemble_behavior_metrics.json and its blocking check
        assert _checked(defs, "baseline_metrics", instance).success
        for arm in ("all", "only_chem", "only_bio"):
            ran = _checked(defs, "behavior_arms", instance, arm)
            assert ran.success and [c.passed for c in ran.get_asset_check_evaluations()] == [True]
        assert not _checked(defs, "behavior_arms", instance, "reverse").success, "reverse needs STEER_DEBUG=1"
        assert not _checked(defs, "behavior_evaluation", instance).success, "every arm must exist first"
        monkeypatch.setenv("STEER_DEBUG", "1")
        assert _checked(defs, "behavior_arms", instance, "reverse").success
        evaluated = _checked(defs, "behavior_evaluation", instance)
        [gates_check] = evaluated.get_asset_check_evaluations()
        metadata = evaluated.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
        ensemble = json.loads(Path(metadata["path"].value).read_text())
        assert Path(metadata["path"].value).name == "ensemble_behavior_metrics.json"
        assert set(ensemble["behaviors"]) == {"chem", "bio"} and ensemble["behaviors"]["bio"]["alpha"] == 0.8
        assert [row["arm"] for row in ensemble["ablation"]] == ["baseline", "all", "only_chem", "only_bio"]
        assert set(ensemble["arms"]) == {"all", "only_chem", "only_bio", "reverse"}
        assert ensemble["representation_crosstalk"]["3"]["chem|bio"] == report["pair_max_cos"]["chem|bio"]
        assert ensemble["global"]["throughput"]["steered_tokens_per_s"]
        # sign flips read every behaviour's whole dictionary, counted per behaviour and layer
        assert set(ensemble["global"]["sign_flips_by_behavior_layer"]) == {"chem|3", "bio|3"}
        assert sum(ensemble["global"]["sign_flips_by_behavior_layer"].values()) == ensemble["global"]["sign_flips"]
        rows = {r.data["name"]: r.data for r in gates_check.metadata["gates"].value.records}
        assert set(rows) == set(yaml.safe_load(gates_path.read_text())["behavior_evaluation"])
        assert gates_check.passed == all(r["passed"] for r in rows.values()) == ensemble["gates"]["passed"]
        assert metadata["completion"].value.startswith("![harmful completion](data:image/png;base64,")
        monkeypatch.delenv("STEER_DEBUG")

        full = json.loads(report_path.read_text())
        report = full["layers"]["3"]
        # a report claiming more features than the pinned selection holds fails the check, whatever its numbers
        full["layers"]["3"]["behaviors"]["bio"]["feature_ids"].append(0)
        report_path.write_text(json.dumps(full))
        checked = _checked(defs, dg.AssetSelection.checks_for_assets("behavior_crosstalk"), instance)
        evaluations = checked.get_asset_check_evaluations()
        assert len(evaluations) == 2 and all(not c.passed and "differ from the pinned selection"
                                             in c.metadata["error"].value for c in evaluations)
        selections = Path(report["directions"]["path"])
        selections.write_bytes(selections.read_bytes()[:-8] + b"tampered")
        with pytest.raises(TensorFileError, match="sha256"):
            dg.materialize([*defs.assets, *defs.asset_checks], selection=dg.AssetSelection.checks_for_assets(
                "behavior_crosstalk"), instance=instance, resources=defs.resources)


@dg.asset(name="behavior_release", deps=["activations"])
def synthetic_behavior_release() -> dg.MaterializeResult:
    """Stands in for the behaviour release (on the tiny random model the screens keep no feature: it never
    refuses): chem and bio sidecars at layer 3, firing on about half the tokens."""
    from sae_pipeline.behaviors.release import CONFIG_FILE, write_release
    from sae_pipeline.config import artifacts_root
    from sae_pipeline.steering.sidecar import DenseSidecar

    generator, sidecars = torch.Generator().manual_seed(5), {}
    for name, n in (("chem", 3), ("bio", 2)):
        directions = torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1)
        # tiny's MLP outputs are ~0.002 per unit: encoder rows scaled so z sits well above epsilon where it fires
        sidecars[name] = DenseSidecar(directions, 100 * torch.randn(n, 64, generator=generator), torch.zeros(n))
    directory = artifacts_root() / "behaviors" / "release"
    provenance = {"epsilon": 0.02, "sae": {}, "rankings": {}, "router_info": {"cv_accuracy": 1.0},
                  "crosstalk": {"pair_max_cos": {}}}
    write_release(directory, {3: sidecars}, {"chem": 0.8, "bio": 0.8}, 64, provenance)
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(str(directory / CONFIG_FILE))})


def _signed_release_bundle(defs, instance, monkeypatch, tmp_path) -> None:
    """The release asset signs its bundle when a key is configured; release_integrity verifies it from disk."""
    from sae_pipeline_tests.test_release import _keys

    for arm in ("only_chem", "only_bio", "reverse"):  # the behaviour release's own evaluation goes in the bundle
        assert _checked(defs, "behavior_arms", instance, arm).success
    gates = os.environ["SAE_PIPELINE_GATES"]
    # an evaluation whose blocking gates failed is not released, even in a later run
    monkeypatch.setenv("SAE_PIPELINE_GATES", str(gates_forcing(gates, tmp_path / "unmet.yaml",
                                                               ["behavior_evaluation"], passed=False)))
    assert not _checked(defs, "behavior_evaluation", instance).success
    blocked = _checked(defs, "release", instance)
    assert not blocked.success
    assert "behavior_evaluation: its blocking check behavior_gates failed" in step_failure(blocked)
    evaluations = ["behavior_evaluation", "fused_evaluation"]
    monkeypatch.setenv("SAE_PIPELINE_GATES", str(gates_forcing(gates, tmp_path / "met.yaml", evaluations, passed=True)))
    rechecked = _checked(defs, dg.AssetSelection.checks_for_assets(*evaluations), instance)
    assert [c.passed for c in rechecked.get_asset_check_evaluations()] == [True, True]
    private, public = _keys()
    monkeypatch.setenv("SAE_PIPELINE_SIGNING_KEY", private)
    monkeypatch.setenv("SAE_PIPELINE_VERIFY_KEY", public)
    made = _checked(defs, "release", instance)
    [check] = made.get_asset_check_evaluations()
    metadata = made.get_asset_materialization_events()[0].event_specific_data.materialization.metadata
    assert made.success and check.passed and check.metadata["signature_checked"].value
    assert metadata["signed"].value and metadata["files"].value > 10
    bundle = Path(metadata["path"].value)
    assert (bundle / "metrics" / "fused_metrics.json").exists() and (bundle / "manifest.sig").exists()
    _, stranger = _keys()
    monkeypatch.setenv("SAE_PIPELINE_VERIFY_KEY", stranger)
    rechecked = _checked(defs, dg.AssetSelection.checks_for_assets("release"), instance)
    [check] = rechecked.get_asset_check_evaluations()
    assert not check.passed and "signature does not verify" in check.metadata["error"].value
    monkeypatch.delenv("SAE_PIPELINE_SIGNING_KEY")
    monkeypatch.delenv("SAE_PIPELINE_VERIFY_KEY")


def _nightly_smoke_on_the_fused_release(defs, instance, monkeypatch, capsys) -> None:
    """smoke_reference, then the smoke job's asset against it, then the healthcheck; a reference that disagrees
    turns both red."""
    from sae_pipeline.release import healthcheck

    reference = _checked(defs, "smoke_reference", instance)
    assert reference.success
    path = Path(reference.get_asset_materialization_events()[0].event_specific_data.materialization
                .metadata["path"].value)
    smoke = _checked(defs, "smoke_metrics", instance)
    checks = {c.check_name: c for c in smoke.get_asset_check_evaluations()}
    assert smoke.success and checks["smoke_gates"].passed and checks["smoke_redaction"].passed
    rows = {r.data["name"]: r.data for r in checks["smoke_gates"].metadata["gates"].value.records}
    assert rows["determinism_mismatches_max"]["value"] == 0 and rows["category_completion_delta_max"]["value"] == 0
    monkeypatch.setenv("SAE_PIPELINE_PROFILE", "tiny")
    assert healthcheck.main([]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["green"] and report["release"] == "fused release" and len(report["gates"]) == 5
    # a reference whose numbers differ: the smoke is red, and so is the healthcheck
    stored = json.loads(path.read_text())
    category = next(iter(stored["metrics"]["harmful_completion_rate"]["per_category"]))
    stored["metrics"]["harmful_completion_rate"]["per_category"][category]["rate"] += 0.5
    stored["metrics"]["metrics_sha256"] = "0" * 64
    path.write_text(json.dumps(stored))
    red = _checked(defs, "smoke_metrics", instance)
    assert not red.success
    rows = {r.data["name"]: r.data for c in red.get_asset_check_evaluations() if c.check_name == "smoke_gates"
            for r in c.metadata["gates"].value.records}
    assert not rows["category_completion_delta_max"]["passed"] and not rows["determinism_mismatches_max"]["passed"]
    assert healthcheck.main([]) == 1 and not json.loads(capsys.readouterr().out)["green"]
    path.unlink()
    assert healthcheck.main([]) == 1 and "materialise smoke_reference" in json.loads(capsys.readouterr().out)["reason"]


def test_tiny_fused_stage_from_the_release_to_its_evaluation(artifacts_with_encoder, tmp_path, monkeypatch, tiny,
                                                             capsys):
    from sae_pipeline import apply_fused_behaviors, remove_behaviors
    from sae_pipeline.steering.sidecar import SidecarError

    monkeypatch.setenv("SAE_PIPELINE_GATES", str(write_gates(tmp_path / "gates.yaml", 0.0)))
    base = build_defs(load_profile("tiny").updated(behaviors={"behaviors": ["chem", "bio"]}))
    defs = dg.Definitions(assets=[*(a for a in base.assets if dg.AssetKey("behavior_release") not in a.keys),
                                  synthetic_behavior_release], asset_checks=base.asset_checks,
                          resources=base.resources)
    with dg.instance_for_test() as instance:
        assert _materialize(defs, "corpus", instance).success
        assert _materialize(defs, "activations", instance, "3").success  # the layer's whitening statistics
        assert _checked(defs, ["prompt_sets", "refusal_judge", "baseline_metrics", "behavior_release"],
                            instance).success
        assert _checked(defs, "behavior_arms", instance, "all").success
        for layer in ("1", "3"):
            made = _checked(defs, ["fused_net", "fused_export"], instance, layer)
            assert {c.check_name for c in made.get_asset_check_evaluations()} == {"fused_net_gates",
                                                                                 "fused_export_gates"}
            metadata = {e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
                        for e in made.get_asset_materialization_events()}
            assert metadata["fused_net"]["hooked"].value is (layer == "3")
        errors = {r.data["net"]: r.data for r in metadata["fused_net"]["errors"].value.records}
        assert errors["distilled"]["p95_relative"] <= errors["fold"]["p95_relative"] + 1e-9
        assert errors["distilled"]["steered_tokens"] > 0 and errors["distilled"]["gates_off_p95_norm"] == 0.0
        assert metadata["fused_export"]["onnx_parity_max_abs"].value <= 1e-4
        assert metadata["fused_net"]["distillation"].value.startswith("![distillation loss](data:image/png;base64,")
        released = _checked(defs, "fused_release", instance)
        assert released.success
        config_path = Path(released.get_asset_materialization_events()[0].event_specific_data.materialization
                           .metadata["path"].value)
        config = json.loads(config_path.read_text())
        assert set(config["layers"]["3"]["files"]) == {"torch", "onnx", "int8"}
        assert config["layers"]["3"]["behaviors"] == ["chem", "bio"]
        assert {g["name"] for g in config["gates"]["onnx"]["results"]} >= {"onnx_parity_max",
                                                                          "p95_relative_error_max"}
        passed = [b for b in ("int8", "onnx", "torch") if config["gates"][b]["passed"]]
        assert config["default_backend"] == (passed[0] if passed else None)
        # the fused release steers as its behaviour release does (PyTorch backend: the fold, then distilled)
        ids = torch.tensor([tiny.tokenizer("mix these chemicals, then heat them").input_ids])
        with torch.no_grad():
            before = tiny.model(input_ids=ids).logits
            apply_fused_behaviors(tiny.model, config_path.parent, backend="torch", accept_failed_gates=True)
            steered = tiny.model(input_ids=ids).logits
            remove_behaviors(tiny.model)
            assert not torch.equal(steered, before) and torch.equal(tiny.model(input_ids=ids).logits, before)
        for arm in ("torch", "onnx", "int8"):
            ran = _checked(defs, "fused_arms", instance, arm)
            assert ran.success and [c.passed for c in ran.get_asset_check_evaluations()] == [True], arm
        assert not _checked(defs, "fused_arms", instance, "reverse").success, "reverse needs STEER_DEBUG=1"
        monkeypatch.setenv("STEER_DEBUG", "1")
        assert _checked(defs, "fused_arms", instance, "reverse").success
        assert not _checked(defs, "fused_evaluation", instance).success, "every arm must exist first"
        assert _checked(defs, "fused_arms", instance, "exact_rule").success
        evaluated = _checked(defs, "fused_evaluation", instance)
        [gates_check] = evaluated.get_asset_check_evaluations()
        report = json.loads(Path(evaluated.get_asset_materialization_events()[0].event_specific_data
                                 .materialization.metadata["path"].value).read_text())
        assert set(report["backends"]) == {"torch", "onnx", "int8", "reverse", "exact_rule"}
        assert report["backends"]["exact_rule"]["gates"] == []  # the control is reported, not gated
        agreed = [a for run in report["backends"].values() for a in run["agreement"].values()]
        assert len(agreed) == 10 and all(a["prompts"] > 0 and 0 <= a["decision_flips"] <= a["prompts"] for a in agreed)
        control = report["backends"]["exact_rule"]["agreement"]["exact_rule"]
        assert control["decision_flips"] == control["differing_completions"] == 0  # itself
        assert report["throughput"]["backend"] == "int8" and min(report["throughput"]["steered_tokens_per_s"]) > 0
        rows = [r.data for r in gates_check.metadata["gates"].value.records]
        assert {r["backend"] for r in rows} == {"torch", "onnx", "int8", "reverse"}
        assert gates_check.passed == report["gates"]["passed"] == all(r["passed"] for r in rows)
        _nightly_smoke_on_the_fused_release(defs, instance, monkeypatch, capsys)
        _signed_release_bundle(defs, instance, monkeypatch, tmp_path)
        # a tampered net fails closed
        net = config_path.parent / config["layers"]["3"]["files"]["int8"]["path"]
        net.write_bytes(net.read_bytes() + b"\0")
        with pytest.raises(SidecarError, match="sha256"):
            apply_fused_behaviors(tiny.model, config_path.parent, backend="int8", accept_failed_gates=True)
