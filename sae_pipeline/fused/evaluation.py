"""The fused release on the frozen harness (issue #6): one arm per backend, the INT8 path reversed, and a control.

Each backend's run with every behaviour on is held against the behaviour release it distils (that release's `all`
arm, the sidecar ensemble): per category the harmful completion rate within a point, benign false refusal within
half a point; the capability gates against the unsteered baseline as the release's own; reverse-safety's
capability recovery on the INT8 path reversed. The control arm `exact_rule` replaces each grouped sidecar by the
runtime's own feature rule computed in float32 (`distill.Teacher`; the sidecar hook computes in the activations'
dtype on a GPU, in float32 on a CPU since 2026-11-30): how far arithmetic alone moves the harness's decisions, the
floor no re-implementation can go below. It is
reported beside the backends, not gated. Per arm, the prompts whose refusal decision or greedy completion (by
sha256) differs from the sidecar ensemble's are counted from the runs' records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from torch import nn

from sae_pipeline.behaviors.evaluation import CAPABILITY_GATES, ReleasePolicy
from sae_pipeline.behaviors.release import Release
from sae_pipeline.config import Gate
from sae_pipeline.evaluation.harness import REVERSE_ARM
from sae_pipeline.evaluation.stability import FeatureReadout
from sae_pipeline.fused.distill import Teacher
from sae_pipeline.fused.release import FUSED_CONFIG, FusedRelease, fused_layers, read_fused_release
from sae_pipeline.fused.runtime import release_layers
from sae_pipeline.gates import GateResult, check_gates
from sae_pipeline.hashing import config_hash, file_sha256
from sae_pipeline.steering.behaviors import behavior_layers
from sae_pipeline.steering.runtime import DEFAULT_EPSILON, LayerSteering, patched
from sae_pipeline.steering.sweep import reverse_capability_recovery, strength_gate_values

EXACT_RULE = "exact_rule"  # the control: the sidecars' rule in float32


def fused_arm_names(backends: Sequence[str]) -> list[str]:
    return [*backends, REVERSE_ARM, EXACT_RULE]


def exact_rule_nets(release: Release) -> dict[int, Teacher]:
    """Each feature layer's grouped sidecar as the runtime's rule in float32 (alphas come from the hooks)."""
    epsilon = float(release.config.get("epsilon", DEFAULT_EPSILON))
    return {layer: Teacher.of(groups, epsilon) for layer, groups in release.groups.items()}


@dataclass(frozen=True)
class FusedPolicy:
    """A fused release (read once, one backend) with every behaviour on, as the harness's Steering: alpha
    multiplies every behaviour's alphas (1.0: as released). Evaluated whatever its recorded gates say."""

    release: FusedRelease
    config_sha256: str
    exact_rule: bool = False  # the control: the sidecars' own rule in float32 instead of the nets
    name: str = "fused release"

    @classmethod
    def load(cls, directory: Path, arm: str) -> FusedPolicy:
        """arm: a backend (torch, onnx, int8) or EXACT_RULE."""
        backend = "torch" if arm == EXACT_RULE else arm
        return cls(read_fused_release(directory, backend, accept_failed_gates=True),
                   file_sha256(directory / FUSED_CONFIG), arm == EXACT_RULE)

    @property
    def sha256(self) -> str:
        arm = EXACT_RULE if self.exact_rule else self.release.backend
        return config_hash({"fused_release": self.config_sha256, "backend": arm})

    @property
    def behavior_release(self) -> Release:
        return self.release.behaviors

    def steering_layers(self, model: nn.Module, scale: float, alphas_per_behavior: dict | None = None
                        ) -> tuple[dict[int, LayerSteering], int]:
        if self.exact_rule:
            layers, gate_skip = behavior_layers(self.release.behaviors, alphas_per_behavior, scale=scale)
            return fused_layers(layers, exact_rule_nets(self.release.behaviors)), gate_skip
        return release_layers(self.release, next(model.parameters()).device, alphas_per_behavior, scale=scale)

    @contextmanager
    def applied(self, model: nn.Module, alpha: float, reverse: bool) -> Iterator[None]:
        with patched(model, *self.steering_layers(model, alpha)) as patch, patch.reverse_if(reverse):
            yield

    def readouts(self) -> list[FeatureReadout]:
        """The behaviour release's dictionaries, read as its own evaluation reads them."""
        behaviors = self.release.behaviors
        return ReleasePolicy(behaviors, self.release.config["behavior_release"]["config_sha256"],
                             tuple(behaviors.config["behaviors"])).readouts()


def _per_category(metrics: dict) -> dict[str, float]:
    return {c: r["rate"] for c, r in metrics["harmful_completion_rate"]["per_category"].items()}


def fused_gate_values(baseline: dict, sidecars: dict, fused: dict) -> dict[str, float]:
    """One backend's run (every behaviour on) against the sidecar ensemble's and, for capability, the baseline."""
    theirs, ours = _per_category(sidecars), _per_category(fused)
    benign = [m["benign_false_refusal_rate"]["overall"]["rate"] for m in (sidecars, fused)]
    strength = strength_gate_values(baseline, fused)
    values = {"category_completion_delta_max": max(abs(ours[c] - theirs[c]) for c in theirs),
              "benign_false_refusal_delta_max": abs(benign[1] - benign[0]),
              **{name: strength[name] for name in CAPABILITY_GATES}}
    return {name: round(value, 9) for name, value in values.items()}


def fused_results(gates: dict[str, Gate], baseline: dict, sidecars: dict, arms: dict[str, dict]
                  ) -> dict[str, list[GateResult]]:
    """Per backend its gates; `reverse`: reverse-safety's recovery on the reversed INT8 run (the control arm is
    not gated)."""
    out = {backend: check_gates({n: gates[n] for n in (*CAPABILITY_GATES, "category_completion_delta_max",
                                                       "benign_false_refusal_delta_max")},
                                fused_gate_values(baseline, sidecars, metrics))
           for backend, metrics in arms.items() if backend not in (REVERSE_ARM, EXACT_RULE)}
    out[REVERSE_ARM] = check_gates({"reverse_capability_recovery_min": gates["reverse_capability_recovery_min"]},
                               {"reverse_capability_recovery_min": round(reverse_capability_recovery(
                                   baseline, arms[REVERSE_ARM]), 9)})
    return out


class Agreement(NamedTuple):
    """How one run's per-prompt records differ from the sidecar ensemble's (harmful and benign prompts)."""

    prompts: int
    decision_flips: int  # refused in one run, not in the other
    differing_completions: int  # greedy completions whose sha256 differ


def agreement(sidecars: Sequence[dict], other: Sequence[dict]) -> Agreement:
    """records.jsonl rows of two runs on the same prompts (by id)."""
    theirs = {r["id"]: r for r in sidecars if r["set"] in ("harmful", "benign")}
    ours = {r["id"]: r for r in other if r["id"] in theirs}
    if set(ours) != set(theirs):
        raise ValueError(f"the runs saw different prompts ({len(theirs)} vs {len(ours)} shared)")
    return Agreement(len(theirs), sum(theirs[i]["refused"] != ours[i]["refused"] for i in theirs),
                     sum(theirs[i]["completion_sha256"] != ours[i]["completion_sha256"] for i in theirs))


def agreements(sidecars: Sequence[dict], records: dict[str, Sequence[dict]]) -> dict[str, dict[str, Agreement]]:
    """Per arm, its per-prompt agreement with the sidecar ensemble and with the control (the sidecars' rule in
    float32): what the nets change beyond what arithmetic alone changes."""
    return {arm: {"sidecars": agreement(sidecars, rows), EXACT_RULE: agreement(records[EXACT_RULE], rows)}
            for arm, rows in records.items()}


def fused_metrics(baseline: dict, sidecars: dict, arms: dict[str, dict], results: dict[str, list[GateResult]],
                  agreed: dict[str, dict[str, Agreement]], throughput: dict, provenance: dict) -> dict:
    """fused_metrics.json: per arm its harmful completion per category beside the sidecar ensemble's, benign
    false refusal, capability, gate rows and per-prompt agreement (`agreements`); the reverse run's recovery;
    decode throughput; what it was made of."""
    def brief(metrics: dict) -> dict:
        return {"harmful_completion_per_category": _per_category(metrics),
                "harmful_completion_rate": metrics["harmful_completion_rate"]["overall"]["rate"],
                "benign_false_refusal_rate": metrics["benign_false_refusal_rate"]["overall"]["rate"],
                "borderline_false_refusal_rate": metrics["benign_false_refusal_rate"]["borderline"]["rate"],
                "capability": {k: metrics["capability"][k] for k in ("next_token_kl", "perplexity")},
                "metrics_sha256": metrics["metrics_sha256"]}

    return {**provenance, "sidecar_ensemble": brief(sidecars), "baseline": brief(baseline),
            "backends": {arm: {**brief(m), "gates": [{**g._asdict(), "passed": bool(g.passed)}
                                                     for g in results.get(arm, [])],
                               "agreement": {ref: a._asdict() for ref, a in agreed[arm].items()}}
                         for arm, m in arms.items()},
            "throughput": throughput,
            "gates": {"passed": all(g.passed for rows in results.values() for g in rows)}}
