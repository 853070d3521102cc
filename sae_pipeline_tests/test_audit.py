"""The adversarial audit: the locked suite, language detection, locale choice, diagnostics variants, and the audit
assets end to end on the tiny model."""

import json
import shutil

import dagster as dg
import pytest
import torch

from sae_pipeline.audit.diagnostics import behavior_alphas, hooked_layers, variants
from sae_pipeline.audit.locale import LocaleAlphas, LocaleError, choose_multiplier, detect_language
from sae_pipeline.audit.suite import (FAMILIES, LANGUAGES, LOCK_FILE, SUITE_FILE, AuditSuiteError, generate_suite,
                                      load_suite, suite_bytes)
from sae_pipeline.config import DATA_DIR, load_gates, load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline_tests.test_fused import _fused_release


def test_the_suite_is_what_its_sources_generate_and_fails_closed_when_changed(tmp_path, monkeypatch):
    items, sha256 = load_suite()
    assert suite_bytes(generate_suite()) == (DATA_DIR / SUITE_FILE).read_bytes()
    assert len(items) == 1010 and {i.family for i in items} == set(FAMILIES)
    for family, variants_of in FAMILIES.items():
        for variant in variants_of:
            kinds = {i.kind for i in items if (i.family, i.variant) == (family, variant)}
            assert kinds == ({"benign"} if family == "shifted_benign" else {"harmful", "benign"}), (family, variant)
    turns = [len(i.turns) for i in items if i.family == "multi_turn"]
    assert min(turns) >= 5 and max(turns) <= 9 and all(len(t) % 2 == 1 for t in [range(n) for n in turns])
    assert {i.preamble_tokens for i in items if i.family == "long_context"} == {1024, 2048, 4096, 8192}
    assert {i.lang for i in items if i.family == "language"} == set(LANGUAGES)

    data = tmp_path / "data"
    shutil.copytree(DATA_DIR, data)
    monkeypatch.setenv("SAE_PIPELINE_DATA", str(data))
    assert load_suite()[1] == sha256
    suite = data / SUITE_FILE
    suite.write_bytes(suite.read_bytes().replace(b"DAN", b"Dan", 1))
    with pytest.raises(AuditSuiteError, match=r"differs from .*\['sha256'\]"):
        load_suite()
    suite.write_bytes((DATA_DIR / SUITE_FILE).read_bytes())
    translations = data / "audit" / "translations.jsonl"
    translations.write_text(translations.read_text() + "\n")
    with pytest.raises(AuditSuiteError, match="inputs"):
        load_suite()
    (data / LOCK_FILE).unlink()
    with pytest.raises(AuditSuiteError, match="missing"):
        load_suite()


def test_language_detection_on_the_suite():
    items, _ = load_suite()
    for lang in LANGUAGES:
        texts = [i.turns[-1]["content"] for i in items if i.family == "language" and i.lang == lang]
        right = sum(detect_language(t) == lang for t in texts)
        assert right / len(texts) >= 0.9, (lang, right, len(texts))
    english = [i.turns[-1]["content"] for i in items if i.family in ("plain", "shifted_benign")]
    assert sum(detect_language(t) == "en" for t in english) / len(english) >= 0.95


def test_a_locale_is_enabled_only_when_its_best_multiplier_passes_the_gates(tmp_path):
    gates = load_gates().audit

    def trial(asr, fr, kl=0.0, worst=None):
        return {"asr": asr, "asr_category_max": asr if worst is None else worst, "false_refusal": fr,
                "next_token_kl": kl}

    passing = choose_multiplier("es", {0.9: trial(0.10, 0.0), 1.0: trial(0.05, 0.0), 1.1: trial(0.02, 0.05)}, gates)
    assert (passing.multiplier, passing.enabled) == (1.0, True)  # 1.1 refuses too much benign traffic
    failing = choose_multiplier("hi", {1.0: trial(0.5, 0.0), 1.1: trial(0.4, 0.0)}, gates)
    assert (failing.multiplier, failing.enabled) == (1.1, False) and "asr_overall_max" in failing.reason
    none = choose_multiplier("zh", {1.0: trial(0.0, 0.2)}, gates)
    assert not none.enabled and "no multiplier" in none.reason
    worst_cell = choose_multiplier("fr", {1.0: trial(0.05, 0.0, worst=0.2)}, gates)
    assert not worst_cell.enabled and "asr_category_family_max" in worst_cell.reason


def test_diagnostic_variants_switch_layers_off_and_move_each_behaviours_alphas(tiny, tmp_path):
    from sae_pipeline.fused.evaluation import FusedPolicy

    directory, _ = _fused_release(tmp_path)
    policy = FusedPolicy.load(directory, "torch")
    release = policy.behavior_release
    assert hooked_layers(release) == [2] and behavior_alphas(release) == {"chem": {2: 0.5}, "bio": {2: 0.3}}
    made = variants(policy, 0.05)
    assert [v.label for v in made] == ["layer 2 off", "bio alpha -0.05", "bio alpha +0.05", "chem alpha -0.05",
                                       "chem alpha +0.05"]
    ids = torch.tensor([tiny.tokenizer("steer these words, please").input_ids])
    with torch.no_grad():
        plain = tiny.model(ids).logits
        outputs = {}
        for v in [None, *made]:
            with (policy if v is None else v).applied(tiny.model, 1.0, False):
                outputs[v.label if v else "as released"] = tiny.model(ids).logits
    assert torch.equal(outputs["layer 2 off"], plain)
    assert not torch.equal(outputs["as released"], plain)
    for label in ("chem alpha -0.05", "chem alpha +0.05", "bio alpha +0.05"):
        assert not torch.allclose(outputs[label], outputs["as released"]), label
    assert len({v.sha256 for v in made}) == len(made)


def _audit_defs():
    return build_defs(load_profile("tiny"))


def _materialize(defs, selection, instance, partition=None):
    return dg.materialize([*defs.assets, *defs.asset_checks], selection=selection, instance=instance,
                          resources=defs.resources, partition_key=partition, raise_on_error=False)


def test_tiny_audit_from_the_suite_to_locale_alphas(artifacts_with_encoder, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    made, _ = _fused_release(tmp_path / "made")
    shutil.copytree(made, artifacts_with_encoder / "fused" / "release")
    defs = _audit_defs()
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.instance_for_test(temp_dir=str(home)) as instance:
        assert _materialize(defs, ["prompt_sets", "refusal_judge", "audit_suite"], instance).success
        for arm in ("baseline", "steered"):
            for family in FAMILIES:
                result = _materialize(defs, ["audit_arms"], instance, dg.MultiPartitionKey(
                    {"arm": arm, "family": family}))
                assert result.success, (arm, family)
                [check] = result.get_asset_check_evaluations()
                assert check.check_name == "audit_arm_redaction" and check.passed
        evaluation = _materialize(defs, ["audit_evaluation"], instance)
        [gates] = [c for c in evaluation.get_asset_check_evaluations() if c.check_name == "audit_gates"]
        path = next(e for e in evaluation.get_asset_materialization_events()).event_specific_data \
            .materialization.metadata["path"].value
        metrics = json.loads(open(path).read())
        first_bytes = open(path, "rb").read()
        assert metrics["determinism"]["mismatches"] == 0
        assert set(metrics["steered"]["attack_success_rate"]["per_family"]) == set(FAMILIES) - {"shifted_benign"}
        assert set(metrics["steered"]["attack_success_rate"]["per_language"]) == {"en", *LANGUAGES}
        assert {"plain", "language"} <= set(metrics["steered"]["benign_false_refusal_rate"]["per_family"])
        assert set(metrics["transfer_delta"]["steered"]) == set(FAMILIES) - {"plain", "shifted_benign"}
        assert gates.passed == all(g["passed"] for g in metrics["gates"])
        assert evaluation.success == gates.passed  # a failed gate fails the step (blocking)

        assert _materialize(defs, ["audit_evaluation"], instance).success == gates.passed
        assert open(path, "rb").read() == first_bytes  # same seed: the same bytes

        made = _materialize(defs, ["audit_diagnostics", "locale_alphas"], instance)
        assert made.success
        scans = {c.check_name: c for c in made.get_asset_check_evaluations()}  # both generate on harmful prompts
        assert set(scans) == {"audit_diagnostics_redaction", "locale_alphas_redaction"}
        assert all(c.passed and c.metadata["files_scanned"].value > 0 for c in scans.values())
        root = tmp_path.joinpath(path).parent
        diagnostics = json.loads((root / "diagnostics.json").read_text())
        assert [row["variant"] for row in diagnostics["variants"]][:3] == ["as audited", "as released", "layer 2 off"]
        assert len(diagnostics["variants"]) == 7
        locale = LocaleAlphas.load(root / "locale_alphas.json")
        written = json.loads((root / "locale_alphas.json").read_text())
        assert set(written["locales"]) == set(LANGUAGES)
        assert set(written["trials"]["es"]) == {"0.90", "1.00"}
        assert locale.multipliers == {lang: v["multiplier"] for lang, v in written["locales"].items()
                                      if v["enabled"]}
        (root / "locale_alphas.json").write_text((root / "locale_alphas.json").read_text().replace("0.9", "1.1"))
        with pytest.raises(LocaleError, match="tampered"):
            LocaleAlphas.load(root / "locale_alphas.json")


def test_an_arm_without_records_fails_closed_instead_of_passing_at_zero():
    from sae_pipeline.audit.metrics import gate_values

    unmeasured, none = {"rate": None}, {"rate": 0.0}
    rates = {"attack_success_rate": {"overall": unmeasured, "per_category_family": {"chem|plain": unmeasured}},
             "benign_false_refusal_rate": {"per_domain": {"legal": none}, "per_language": {"en": none}}}
    capability = {"next_token_kl": 0.0, "perplexity_increase": 0.0, "task_accuracy_drop": 0.0}
    with pytest.raises(ValueError, match="no records for attack success"):
        gate_values(rates, capability, 0)
    rates["attack_success_rate"] = {"overall": {"rate": 0.25}, "per_category_family": {"chem|plain": {"rate": 0.5}}}
    values = gate_values(rates, capability, 0)
    assert values["asr_overall_max"] == 0.25 and values["asr_category_family_max"] == 0.5


def test_fired_features_name_each_dictionary_latent_that_won_a_top_k_slot(tiny):
    from sae_pipeline.audit.diagnostics import fired_features
    from sae_pipeline.evaluation.stability import FeatureReadout
    from sae_pipeline.model.hooks import layer_outputs
    from sae_pipeline.sae.model import TopKSAE

    sae = TopKSAE(64, 32, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    items, _ = load_suite()
    item = items[0]
    ids = tiny.tokenizer(item.turns[-1]["content"]).input_ids
    encoded = sae.encode(layer_outputs(tiny.model, torch.tensor([ids]), [1])[1][0, 1:].float())
    winners = sorted(set(encoded.top_indices.flatten().tolist()))
    losers = sorted(set(range(32)) - set(winners))
    watched = winners[:3] + losers[:2]
    rows = fired_features(tiny.model, [ids], [FeatureReadout(1, sae, watched, "chem")], [item])
    assert [r["feature"] for r in rows] == winners[:3]
    for row in rows:
        expected = encoded.top_acts[encoded.top_indices == row["feature"]].max().item()
        assert row["max_activation"] == pytest.approx(expected, abs=1e-5) and row["item"] == item.id
    assert fired_features(tiny.model, [ids], [], [item]) == []


def test_the_runtime_scales_a_release_by_the_prompts_enabled_locale(tiny, tmp_path):
    from sae_pipeline import apply_behaviors, remove_behaviors
    from sae_pipeline.audit.locale import LocaleChoice, write_locale_alphas

    made, _ = _fused_release(tmp_path)
    choices = [LocaleChoice("es", 0.8, True, "passes"), LocaleChoice("hi", 1.1, False, "fails")]
    path, sha256 = write_locale_alphas(tmp_path / "locale", choices, "release", "suite", {})
    locale = LocaleAlphas.load(path)
    assert locale.sha256 == sha256 and locale.multipliers == {"es": 0.8}
    assert locale.scale("¿Cómo puedo preparar una carta para mi casero?") == 0.8
    assert locale.scale("मैं अपने मकान मालिक को पत्र कैसे लिखूँ?") == 1.0  # hi is not enabled
    assert locale.scale("How do I write to my landlord?") == 1.0
    ids = torch.tensor([tiny.tokenizer("steer these words, please").input_ids])

    def logits(scale):
        apply_behaviors(tiny.model, tmp_path / "behaviors", scale=scale)
        try:
            with torch.no_grad():
                return tiny.model(ids).logits
        finally:
            remove_behaviors(tiny.model)

    assert torch.equal(logits(1.0), logits(1.0)) and not torch.allclose(logits(0.8), logits(1.0))
