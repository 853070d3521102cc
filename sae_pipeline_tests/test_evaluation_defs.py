"""The evaluation assets in Dagster, on the real embedded model: checks pass, and the redaction test scans every
file the run wrote (artifacts, Dagster storage and event log, W&B offline directory) for harmful completions."""

import json

import dagster as dg
import pytest

from sae_pipeline.config import load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.harness import evaluate, load_fingerprints
from sae_pipeline.evaluation.redaction import scan_paths
from sae_pipeline.evaluation.run import build_judges, select_primary
from sae_pipeline.evaluation.tracking import log_run


def _files_under(*roots):
    # models/ holds the loader's weight caches, written before the run and by no evaluation code
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file() and "models" not in p.parts]


def _needles(completions):
    """Each completion's middle 40 characters, raw and JSON-escaped: a simpler check than the shingle scanner, so
    the test does not only trust the code it tests. Shorter completions carry nothing worth matching exactly."""
    needles = set()
    for text in (t for t in completions if len(t) >= 40):
        middle = text[len(text) // 2 - 20: len(text) // 2 + 20]
        needles |= {middle.encode(), json.dumps(middle)[1:-1].encode()}
    return needles


def _exact_leak_count(blobs, needles):
    # a count, never the text: a failing assertion must not print a completion into the CI log
    return sum(any(n in blob for n in needles) for blob in blobs)


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
    same_bytes = (replay.directory / "metrics.json").read_bytes() == (tmp_path.joinpath(run_dir) / "metrics.json"
                                                                       ).read_bytes()
    assert same_bytes
    count, longest = len(completions), max(len(text.split()) for text in completions)
    assert count == 12 and longest >= 20
    needles = _needles(completions)
    assert len(needles) >= 12

    files = _files_under(artifacts_with_encoder, dagster_home)
    assert any("wandb" in p.parts for p in files) and any(p.suffix == ".db" for p in files)
    leaking = _exact_leak_count((p.read_bytes() for p in files), needles)
    assert leaking == 0
    fingerprints = load_fingerprints(tmp_path.joinpath(run_dir))
    report = scan_paths(files, fingerprints)
    assert report.leaks == []
    print(f"redaction scan: {report.files_scanned} files, {report.bytes_scanned:,} bytes, {len(completions)} "
          f"completions, {fingerprints.size} shingles; no leak")

    # W&B: the run's scalars reached it with their lineage (the metrics' sha256 rides on the reference artifact),
    # and no harmful prompt's text did
    wandb_blobs = [p.read_bytes() for p in files if "wandb" in p.parts]
    metrics_sha256 = json.loads((tmp_path.joinpath(run_dir) / "metrics.json").read_text())["metrics_sha256"]
    assert any(metrics_sha256.encode() in blob for blob in wandb_blobs)
    prompt_needles = _needles([p.prompt for p in sets.harmful])
    matchable, needle_count = sum(len(p.prompt) >= 40 for p in sets.harmful), len(prompt_needles)
    assert matchable >= 400 and needle_count >= matchable
    assert _exact_leak_count(wandb_blobs, prompt_needles) == 0
    # control: a W&B run named after a harmful prompt (a request, allowed on disk) is caught by the same scan
    named_after = next(p.prompt for p in sets.harmful if len(p.prompt) >= 40)
    control = log_run(named_after, {"x": 1.0}, tmp_path / "wandb_control", "offline", {}, {})
    caught = _exact_leak_count([p.read_bytes() for p in control.rglob("*") if p.is_file()], prompt_needles)
    assert caught >= 1

    # negative control, in memory only (a completion is never written, not even to a temp file): an event-log
    # style record holding a completion is caught by both checks
    longest_text = max(completions, key=len)
    event = json.dumps({"message": json.dumps({"text": longest_text})}).encode()
    caught_exact, caught_shingles = _exact_leak_count([event], needles), fingerprints.hits(event.decode())
    assert caught_exact == 1 and caught_shingles > 0
