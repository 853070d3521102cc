import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

from sae_pipeline.config import load_profile  # noqa: E402
from sae_pipeline.model.loading import load_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture
def artifacts(tmp_path, monkeypatch):
    """A fresh artifact root per test, so no test sees another's files."""
    root = tmp_path / "artifacts"
    monkeypatch.setenv("SAE_PIPELINE_ARTIFACTS", str(root))
    return root


@pytest.fixture(scope="session")
def tiny_profile():
    return load_profile("tiny")


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-random-llama")


def write_gates(path, r2_min: float):
    """A gates file for exercising pass/fail paths of the blocking check (never the project's gates)."""
    path.write_text(
        "sae_quality:\n"
        f"  r2_min: {{value: {r2_min}, source: test}}\n"
        "  dead_fraction_max: {value: 1.0, source: test}\n"
        "  coherence_p95_max: {value: 1.0, source: test}\n"
        "  near_duplicates_max: {value: 1000000, source: test}\n"
    )
    return path
