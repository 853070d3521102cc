"""The evaluation assets in Dagster, on the real embedded model: checks pass, and the redaction test scans every
file the run wrote (artifacts, Dagster storage and event log, W&B offline directory) for harmful completions."""

import json

import dagster as dg
import pytest

from sae_pipeline.config import load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.harness import FINGERPRINTS_FILE, evaluate
from sae_pipeline.evaluation.redaction import Fingerprints, scan_paths
from sae_pipeline.evaluation.run import build_judges, select_primary


def _files_under(*roots):
    # models/ holds the loader's weight caches, written before the run and by no evaluation code
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file() and "models" not in p.parts]


def _exact_leaks(files, completions):
    """Files holding any completion's middle 40 characters, raw or JSON-escaped (a stricter, simpler check than
    the shingle scanner, so the test does not only trust the code it tests)."""
    needles = set()
    for text in completions:
        middle = text[len(text) // 2 - 20: len(text) // 2 + 20]
        needles |= {middle.encode(), json.dumps(middle)[1:-1].encode()}
    return [str(path) for path in files if any(n in path.read_bytes() for n in needles)]


@pytest.mark.integration
def test_baseline_on_the_embedded_model_leaves_no_harmful_text_anywhere(artifacts_with_encoder, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    profile = load_profile("smollm2-smoke")
    defs = build_defs(profile)
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        result = dg.materialize([*defs.assets, *defs.asset_checks], instance=instance, resources=defs.resources,
                                selection=["prompt_sets", "refusal_judge", "baseline_metrics"])
        assert result.success
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert set(checks) == {"datasets_lock", "splits_disjoint", "dataset_sizes", "judge_accuracy",
                               "baseline_complete", "redaction"}
        assert all(check.passed for check in checks.values()), {n: c.passed for n, c in checks.items()}
        assert checks["redaction"].metadata["files_scanned"].value > 0
        [event] = [e for e in result.get_asset_materialization_events()
                   if e.asset_key.to_user_string() == "baseline_metrics"]
        run_dir = event.event_specific_data.materialization.metadata["path"].value

    # Replay the run in memory: deterministic decoding gives the same completions, which the harness hands over.
    completions = []
    sets = load_prompt_sets()
    judges, _ = build_judges(sets)
    loaded = ModelResource().load(profile, dtype=profile.evaluation.model_dtype)
    replay = evaluate(loaded, sets, select_primary(judges, profile.evaluation.refusal_judge), profile.evaluation,
                      tmp_path / "replay", on_harmful_completion=completions.append)
    assert (replay.directory / "metrics.json").read_bytes() == (tmp_path.joinpath(run_dir) / "metrics.json"
                                                                 ).read_bytes()
    assert len(completions) == 12 and max(len(text.split()) for text in completions) >= 20

    files = _files_under(artifacts_with_encoder, dagster_home)
    assert any("wandb" in p.parts for p in files) and any(p.suffix == ".db" for p in files)
    assert _exact_leaks(files, completions) == []
    fingerprints = Fingerprints.from_bytes((tmp_path.joinpath(run_dir) / FINGERPRINTS_FILE).read_bytes())
    report = scan_paths(files, fingerprints)
    assert report.leaks == []
    print(f"redaction scan: {report.files_scanned} files, {report.bytes_scanned:,} bytes, {len(completions)} "
          f"completions, {fingerprints.size} shingles; no leak")

    # negative control: the same scans catch a completion that did leak into the Dagster storage
    leak = dagster_home / "storage" / "leak.log"
    leak.write_text(json.dumps({"message": completions[0]}))
    assert _exact_leaks([leak], completions) == [str(leak)]
    assert scan_paths([leak], fingerprints).leaks
