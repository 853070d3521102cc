"""Executors and GPU placement from the profile's `execution` section: every step that runs the model or trains a
net carries the `gpu` tag (limited to `gpu_concurrency` at once per run) and the `gpu` pool (limited across runs by
the instance: `dagster instance concurrency set gpu 1`); under Kubernetes it also asks for `nvidia.com/gpu`."""

from __future__ import annotations

import dagster as dg

from sae_pipeline.config import ConfigError, ExecutionConfig, KubernetesConfig

DEVICE_TAG = "sae_pipeline/device"
GPU = "gpu"
K8S_CONFIG_TAG = "dagster-k8s/config"


def k8s_step_config(k8s: KubernetesConfig) -> dict:
    """The `dagster-k8s/config` tag of a GPU step: GPU, CPU and memory requests, node selector, tolerations."""
    resources = {"nvidia.com/gpu": str(k8s.gpus_per_step), "cpu": k8s.cpu, "memory": k8s.memory}
    return {"container_config": {"resources": {"requests": resources, "limits": {
                "nvidia.com/gpu": str(k8s.gpus_per_step), "memory": k8s.memory}}},
            "pod_spec_config": {"node_selector": dict(k8s.node_selector),
                                "tolerations": [dict(t) for t in k8s.tolerations]}}


def on_gpu(execution: ExecutionConfig) -> dict:
    """Decorator arguments of an asset whose step needs the GPU."""
    tags: dict = {DEVICE_TAG: GPU}
    if execution.executor == "k8s":
        tags[K8S_CONFIG_TAG] = k8s_step_config(execution.kubernetes)
    return {"op_tags": tags, "pool": GPU}


def build_executor(execution: ExecutionConfig) -> dg.ExecutorDefinition:
    limits = [{"key": DEVICE_TAG, "value": GPU, "limit": execution.gpu_concurrency}]
    if execution.executor == "in_process":
        return dg.in_process_executor
    if execution.executor == "multiprocess":
        return dg.multiprocess_executor.configured(
            {"max_concurrent": execution.max_concurrent, "tag_concurrency_limits": limits})
    try:
        from dagster_k8s import k8s_job_executor
    except ImportError as err:
        raise ConfigError("execution.executor 'k8s' needs dagster-k8s: pip install 'sae-pipeline[k8s]'") from err
    k8s = execution.kubernetes
    config = {"max_concurrent": execution.max_concurrent, "tag_concurrency_limits": limits,
              **({"job_namespace": k8s.namespace} if k8s.namespace else {}),
              **({"job_image": k8s.image} if k8s.image else {})}
    return k8s_job_executor.configured(config)
