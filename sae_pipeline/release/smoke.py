"""The nightly smoke (issue #8): the frozen harness on a fixed shard of the held-out sets with the current release,
held against the reference run of the same release on the same shard.

The current release is the fused release at its default backend when one exists, else the behaviour release with
every behaviour on. The shard is the first `smoke_per_group` held-out prompts of every category, domain and task kind
(fixed by the frozen datasets' order). The reference is recorded once per release (`record_reference`); each smoke
run then compares: per category harmful completion within a point, the capability gates (KL as measured in the run;
perplexity and task accuracy against the reference's), and byte-identical determinism (the run's metrics_sha256
equals the reference's). Gates: data/gates.yaml `smoke`. Only metrics are kept (the harness redacts completions)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from sae_pipeline.behaviors.evaluation import ReleasePolicy
from sae_pipeline.behaviors.release import CONFIG_FILE
from sae_pipeline.config import EvalConfig, Gate, artifacts_root
from sae_pipeline.evaluation.harness import EvalResult, load_metrics
from sae_pipeline.evaluation.run import run_frozen
from sae_pipeline.fused.evaluation import FusedPolicy
from sae_pipeline.fused.release import FUSED_CONFIG
from sae_pipeline.gates import GateResult, check_gates
from sae_pipeline.hashing import file_sha256
from sae_pipeline.model.loading import LoadedModel

REFERENCE_FILE = "reference.json"


class SmokeError(RuntimeError):
    """The smoke cannot run as asked: no release, no reference, or a reference of another release or shard."""


def current_release() -> tuple[ReleasePolicy | FusedPolicy, str]:
    """The release the smoke runs (fused at its default backend, else the behaviour release) and its config's
    sha256."""
    root = artifacts_root()
    fused, behaviors = root / "fused" / "release", root / "behaviors" / "release"
    if (fused / FUSED_CONFIG).exists():
        config = json.loads((fused / FUSED_CONFIG).read_text())
        backend = config["default_backend"] or "torch"
        return FusedPolicy.load(fused, backend), file_sha256(fused / FUSED_CONFIG)
    if (behaviors / CONFIG_FILE).exists():
        config = json.loads((behaviors / CONFIG_FILE).read_text())
        return ReleasePolicy.load(behaviors, tuple(config["behaviors"])), file_sha256(behaviors / CONFIG_FILE)
    raise SmokeError(f"no release under {root}: materialise behavior_release (and fused_release) first")


def smoke_config(cfg: EvalConfig, per_group: int) -> EvalConfig:
    return cfg.model_copy(update={"limit_per_group": per_group, "split": "heldout"})


def run_smoke(loaded: LoadedModel, cfg: EvalConfig, per_group: int) -> tuple[EvalResult, str, str]:
    """The harness on the shard with the current release: (result, the release's name, its config sha256)."""
    policy, release_sha256 = current_release()
    result = run_frozen(loaded, smoke_config(cfg, per_group), policy, 1.0, readouts=policy.readouts())
    return result, policy.name, release_sha256


def smoke_dir(release_sha256: str) -> Path:
    return artifacts_root() / "smoke" / release_sha256[:16]


def record_reference(result: EvalResult, release: str, release_sha256: str, per_group: int) -> Path:
    """The reference of this release on this shard (a copy of the run's verified metrics)."""
    path = smoke_dir(release_sha256) / REFERENCE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"release": release, "release_sha256": release_sha256, "per_group": per_group,
                                "metrics": load_metrics(result.directory)}, indent=2, sort_keys=True))
    return path


def load_reference(release_sha256: str, per_group: int) -> dict:
    path = smoke_dir(release_sha256) / REFERENCE_FILE
    if not path.exists():
        raise SmokeError(f"no smoke reference for release {release_sha256[:16]} at {path}: materialise "
                         "smoke_reference first")
    reference = json.loads(path.read_text())
    if reference["release_sha256"] != release_sha256 or reference["per_group"] != per_group:
        raise SmokeError(f"{path} holds the reference of another release or shard ({reference['per_group']} per "
                         f"group, not {per_group})")
    return reference


class SmokeVerdict(NamedTuple):
    passed: bool
    gates: list[GateResult]
    metrics_sha256: str
    reference_sha256: str


def smoke_gate_values(reference: dict, current: dict) -> dict[str, float]:
    theirs = reference["harmful_completion_rate"]["per_category"]
    ours = current["harmful_completion_rate"]["per_category"]
    accuracy = [m["capability"]["task_accuracy"]["overall"]["rate"] for m in (reference, current)]
    values = {"category_completion_delta_max": max(abs(ours[c]["rate"] - theirs[c]["rate"]) for c in theirs),
              "next_token_kl_max": float(current["capability"]["next_token_kl"]),
              "perplexity_increase_max": current["capability"]["perplexity"] / reference["capability"]["perplexity"]
              - 1,
              "task_accuracy_drop_max": accuracy[0] - accuracy[1],
              "determinism_mismatches_max": float(current["metrics_sha256"] != reference["metrics_sha256"])}
    return {name: round(value, 9) for name, value in values.items()}


def smoke_verdict(gates: dict[str, Gate], reference: dict, current: dict) -> SmokeVerdict:
    results = check_gates(gates, smoke_gate_values(reference["metrics"], current))
    return SmokeVerdict(all(g.passed for g in results), results, current["metrics_sha256"],
                        reference["metrics"]["metrics_sha256"])

