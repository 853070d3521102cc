"""The main job's driver (scripts/main.sh): every asset in its steps, runs as the CLI makes them, failures handled."""

import json
import os
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from sae_pipeline.config import load_profile
from sae_pipeline.defs import driver
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline.defs.resources import ModelResource
from sae_pipeline.model.hooks import mlp_module
from sae_pipeline_tests.conftest import write_gates

STAGES_TIMINGS = "main_job_tiny_stages-activations+corpus+sae.json"  # what --stages corpus,activations,sae writes


def test_main_steps_cover_every_asset_and_partition_once():
    defs = build_defs(load_profile("tiny"))
    steps = driver.main_steps(defs)
    graph = defs.resolve_asset_graph()
    every_asset = {key.to_user_string() for key in graph.get_all_asset_keys()}
    assert {name for step in steps for name in step.selection} == every_asset
    runs = [(step.selection, step.partition) for step in steps]
    assert len(runs) == len(set(runs))
    for name in every_asset - {"activations"}:  # the harvest: one single-run range over its layers
        partitions = defs.resolve_assets_def(name).partitions_def
        seen = [step.partition for step in steps if name in step.selection]
        assert seen == (partitions.get_partition_keys() if partitions else [None]), name
    assert [s.partition_range for s in steps if s.selection == ("activations",)] == [("1", "3")]
    # a stage runs only after every stage it reads from
    order = {name: min(i for i, s in enumerate(steps) if name in s.selection) for name in every_asset}
    for key in graph.get_all_asset_keys():
        for parent in graph.get(key).parent_keys:
            assert order[parent.to_user_string()] <= order[key.to_user_string()], (parent, key)


def test_steer_debug_is_set_for_the_block_alone(monkeypatch):
    monkeypatch.delenv("STEER_DEBUG", raising=False)
    with driver._steer_debug(True):
        assert os.environ["STEER_DEBUG"] == "1"
    assert "STEER_DEBUG" not in os.environ
    monkeypatch.setenv("STEER_DEBUG", "0")
    with driver._steer_debug(False):
        assert os.environ["STEER_DEBUG"] == "0"
    with driver._steer_debug(True):
        assert os.environ["STEER_DEBUG"] == "1"
    assert os.environ["STEER_DEBUG"] == "0"


def test_a_failed_required_step_stops_the_job(artifacts, monkeypatch):
    steps = [driver.Step(("corpus",), required=True), driver.Step(("sae",), "1")]
    attempted = []

    def fake_run(_defs, _repository, _instance, step):
        attempted.append(step)
        return False

    monkeypatch.setattr(driver, "run_step", fake_run)
    timings = driver.run_main(steps, build_defs(load_profile("tiny")), None, load_profile("tiny"))
    assert attempted == steps[:1] and [t.success for t in timings] == [False]
    assert json.loads((artifacts / "benchmarks" / "main_job_tiny.json").read_text())["planned_runs"] == 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_job_after_the_run_it_interrupted(artifacts, tmp_path, signum):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "SAE_PIPELINE_PROFILE": "tiny", "SAE_PIPELINE_EXECUTOR": "in_process",
           "DAGSTER_HOME": str(home), "SAE_PIPELINE_GATES": str(write_gates(tmp_path / "pass.yaml", 0.0))}
    cmd = [sys.executable, "-m", "sae_pipeline.defs.driver", "--stages", "corpus,activations,sae"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:
        if line.startswith("main job 3/4"):  # the first SAE is training
            time.sleep(0.3)
            process.send_signal(signum)
            break
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode != 0
    assert "main job 4/4" not in stdout, "the job went on after Ctrl-C"
    runs = json.loads((artifacts / "benchmarks" / STAGES_TIMINGS).read_text())["runs"]
    # the interrupted run fails, or succeeds when the signal falls after its step (Dagster then swallows it)
    assert [(r["label"], r["success"]) for r in runs][:2] == [("corpus", True), ("activations [1...3]", True)]
    assert [r["label"] for r in runs] == ["corpus", "activations [1...3]", "sae [1]"]
    assert "interrupted during sae [1]" in stderr


def test_stage_table_sums_runs_and_shares():
    timings = [driver.StepTiming(("sae",), "sae [1]", True, 30.0),
               driver.StepTiming(("sae",), "sae [3]", False, 10.0),
               driver.StepTiming(("corpus",), "corpus", True, 60.0)]
    rows = driver.stage_table(timings)
    assert rows == [{"stage": "sae", "runs": 2, "failed": 1, "seconds": 40.0, "share": 0.4},
                    {"stage": "corpus", "runs": 1, "failed": 0, "seconds": 60.0, "share": 0.6}]
    assert "| **total** | 3 | | **1.7** | |" in driver.markdown(rows)


def test_driver_runs_the_steps_goes_on_after_a_failed_gate_and_exits_non_zero(artifacts, tmp_path):
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "SAE_PIPELINE_PROFILE": "tiny", "SAE_PIPELINE_EXECUTOR": "in_process",
           "DAGSTER_HOME": str(home), "SAE_PIPELINE_GATES": str(write_gates(tmp_path / "fail.yaml", 1.01))}
    cmd = [sys.executable, "-m", "sae_pipeline.defs.driver", "--stages", "corpus,activations,sae"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stderr[-2000:]
    report = json.loads((artifacts / "benchmarks" / STAGES_TIMINGS).read_text())
    assert not (artifacts / "benchmarks" / "main_job_tiny.json").exists(), "a partial run left the whole job's file"
    assert [(r["label"], r["success"]) for r in report["runs"]] == [
        ("corpus", True), ("activations [1...3]", True), ("sae [1]", False), ("sae [3]", False)]
    assert report["executor"] == "in_process"
    assert sorted(p.name for p in artifacts.glob("activations/*/layer_*")) == ["layer_01", "layer_03"]
    assert "| sae | 2 | 2 |" in done.stdout
    unknown = subprocess.run([*cmd[:3], "--stages", "nonsense"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "nonsense" in unknown.stderr


@pytest.mark.parametrize("hooked", [False, True])
def test_model_resource_refuses_a_cached_model_that_still_carries_hooks(tiny_profile, hooked):
    resource = ModelResource(name_or_path="tiny-random-llama")
    model = resource.load(tiny_profile).model
    handle = mlp_module(model, 1).register_forward_hook(lambda *_: None) if hooked else None
    try:
        if hooked:
            with pytest.raises(dg.Failure, match="forward hooks"):
                resource.load(tiny_profile)
        else:
            assert resource.load(tiny_profile).model is model  # cached: one load per process
    finally:
        if handle is not None:
            handle.remove()
