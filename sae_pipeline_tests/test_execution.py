"""Executors chosen by configuration, and the GPU placement of every step that runs the model or trains a net."""

import json
import os
import time
from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.config import ConfigError, ExecutionConfig, load_profile
from sae_pipeline.defs.definitions import build_defs
from sae_pipeline.defs.execution import DEVICE_TAG, GPU, K8S_CONFIG_TAG, build_executor, on_gpu

# These two take the model resource for its tokenizer and hashes only: they stay on CPU nodes.
CPU_MODEL_USERS = {"corpus", "release"}


def _assets(defs: dg.Definitions) -> dict[str, dg.AssetsDefinition]:
    return {a.key.to_user_string(): a for a in defs.assets if isinstance(a, dg.AssetsDefinition)}


def _gpu_assets(defs: dg.Definitions) -> set[str]:
    return {name for name, a in _assets(defs).items() if "model" in a.required_resource_keys} - CPU_MODEL_USERS


def test_every_model_step_carries_the_gpu_tag_and_pool_and_the_multiprocess_executor_limits_it():
    defs = build_defs(load_profile("smollm2"))
    assets, gpu = _assets(defs), _gpu_assets(defs)
    assert {"activations", "sae", "fused_net", "smoke_metrics", "baseline_metrics", "audit_arms"} <= gpu
    assert len(gpu) == 27
    for name, a in assets.items():
        on_gpu = a.op.tags.get(DEVICE_TAG) == GPU
        assert on_gpu == (name in gpu), name
        assert (a.op.pool == GPU) == (name in gpu), name
        assert K8S_CONFIG_TAG not in a.op.tags, name
    assert defs.resolve_job_def("main").executor_def.name == "multiprocess"


def _wait_for(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.1)
    return condition()


def _gpu_steps_job(limit: int) -> dg.JobDefinition:
    """Two independent GPU steps, each waiting up to STEP_WAIT seconds to see the other running (reconstructable:
    the multiprocess executor re-imports it in each step's process)."""
    execution = ExecutionConfig(gpu_concurrency=limit)
    log = Path(os.environ["STEP_LOG"])

    def step(name, other):
        @dg.asset(name=name, **on_gpu(execution))
        def _step() -> None:
            running, other_running = log / f"{name}.running", log / f"{other}.running"
            running.touch()
            saw = _wait_for(other_running.exists, float(os.environ["STEP_WAIT"]))
            (log / f"{name}.saw_other").write_text(json.dumps(saw))
            if saw:  # stay running until the other has seen this step too
                _wait_for((log / f"{other}.saw_other").exists)
            running.unlink()
        return _step

    defs = dg.Definitions(assets=[step("first", "second"), step("second", "first")],
                          executor=build_executor(execution), jobs=[dg.define_asset_job("both")])
    return defs.resolve_job_def("both")


# one module-level function per limit: Dagster caches a reconstructable job by its function
def _one_gpu_step_at_a_time() -> dg.JobDefinition:
    return _gpu_steps_job(1)


def _two_gpu_steps_at_a_time() -> dg.JobDefinition:
    return _gpu_steps_job(2)


# serialised, each step waits out the whole window: 4 s still sees a wrongly concurrent step, launched with it
@pytest.mark.parametrize("job, overlap, wait", [(_one_gpu_step_at_a_time, False, 4),
                                                (_two_gpu_steps_at_a_time, True, 10)])
def test_the_gpu_tag_limit_serialises_gpu_steps_in_a_multiprocess_run(tmp_path, monkeypatch, job, overlap, wait):
    monkeypatch.setenv("STEP_LOG", str(tmp_path))
    monkeypatch.setenv("STEP_WAIT", str(wait))
    with dg.instance_for_test() as instance:
        result = dg.execute_job(dg.reconstructable(job), instance=instance)
    assert result.success
    saw = [json.loads((tmp_path / f"{name}.saw_other").read_text()) for name in ("first", "second")]
    assert saw == [overlap, overlap]


def test_kubernetes_definitions_load_and_request_a_gpu_for_every_gpu_step(monkeypatch):
    pytest.importorskip("dagster_k8s", reason="dagster-k8s is the optional [k8s] extra")
    monkeypatch.setenv("SAE_PIPELINE_EXECUTOR", "k8s")
    profile = load_profile("mistral-7b")
    assert profile.execution.executor == "k8s" and profile.execution.device == "cuda"
    defs = build_defs(profile)
    dg.Definitions.validate_loadable(defs)
    assert defs.resolve_job_def("main").executor_def.name == "k8s"
    gpu = _gpu_assets(defs)
    for name, a in _assets(defs).items():
        config = a.op.tags.get(K8S_CONFIG_TAG)
        if name not in gpu:
            assert config is None, name
            continue
        config = json.loads(config)
        resources = config["container_config"]["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == "1" and resources["requests"]["nvidia.com/gpu"] == "1", name
        assert config["pod_spec_config"]["node_selector"] == {"nvidia.com/gpu.present": "true"}, name
        assert config["pod_spec_config"]["tolerations"][0]["key"] == "nvidia.com/gpu", name

    placed = build_defs(profile.updated(execution={"kubernetes": {
        "node_selector": {"pool": "h100"}, "gpus_per_step": 2,
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}}))
    config = json.loads(_assets(placed)["sae"].op.tags[K8S_CONFIG_TAG])
    assert config["pod_spec_config"]["node_selector"] == {"pool": "h100"}
    assert config["container_config"]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert config["pod_spec_config"]["tolerations"][0]["value"] == "gpu"


def test_in_process_executor_and_a_bad_executor_name(monkeypatch):
    monkeypatch.setenv("SAE_PIPELINE_EXECUTOR", "in_process")
    assert build_defs(load_profile("tiny")).resolve_job_def("smoke").executor_def.name == "in_process"
    monkeypatch.setenv("SAE_PIPELINE_EXECUTOR", "slurm")
    with pytest.raises(ConfigError, match="executor"):
        load_profile("tiny")
