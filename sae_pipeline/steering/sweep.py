"""The candidate operating point, its strength sweep and the rule that picks the operating point.

A candidate joins the two modes: the screened features' sidecars at their layers (feature mode) and the probe-gated
refusal vector at the refusal layer, where the gate decides (conditional refusal mode). One strength alpha drives
both: the feature rule's alpha is alpha and the refusal vector's beta is alpha * refusal_beta, so alpha 0 is the
unsteered model.
The gate was fit on unsteered activations; feature edits at or before the layers it reads change what it reads, so
only the end-to-end held-out evaluation of the sweep says what the combination does.

Rule (documented in README): every alpha of the grid is evaluated on the held-out sets; the operating point is the
smallest alpha whose metrics pass every per-strength steering gate (least intervention that does the job). If none
passes, the job comes first: an alpha that meets the harmful-completion gate, then the most gates passed, then the
largest harmful-completion reduction, then the smallest alpha (ranking by gates passed alone would pick alpha 0, which
meets every gate but the one steering is for); the steering_gates check then fails and blocks what follows."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from sae_pipeline.config import Gate
from sae_pipeline.evaluation.stability import FeatureReadout
from sae_pipeline.features.gate import load_refusal_gate
from sae_pipeline.gates import GateResult, check_gates
from sae_pipeline.hashing import config_hash
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.runtime import LayerSteering, ProbeGate, SteeringError, patched
from sae_pipeline.steering.sidecar import DenseSidecar, load_dense

# gates that depend on the strength; the reverse-safety and throughput gates are properties of the candidate
STRENGTH_GATES = ("harmful_completion_reduction_min", "benign_false_refusal_max", "borderline_false_refusal_max",
                  "next_token_kl_max", "perplexity_increase_max", "task_accuracy_drop_max", "sign_flips_max")


@dataclass(frozen=True)
class Candidate:
    """What the sweep evaluates; `sha256` identifies it (every component's hash and every setting)."""

    features: dict[int, DenseSidecar]
    gate: ProbeGate
    refusal_D: torch.Tensor
    refusal_layer: int
    refusal_beta: float
    epsilon: float
    gate_skip: int
    component_hashes: dict[str, str]
    name: str = "operating-point candidate"

    @property
    def sha256(self) -> str:
        return config_hash({"components": self.component_hashes, "feature_layers": sorted(self.features),
                            "refusal_layer": self.refusal_layer,
                            "refusal_beta": self.refusal_beta, "epsilon": self.epsilon, "gate_skip": self.gate_skip,
                            "gate_layers": list(self.gate.layers)})

    def layers_at(self, alpha: float) -> dict[int, LayerSteering]:
        layers = {layer: LayerSteering(sidecar, alpha, self.epsilon) for layer, sidecar in self.features.items()}
        refusal = {"refusal_D": self.refusal_D, "beta": alpha * self.refusal_beta, "gate": self.gate}
        base = layers.get(self.refusal_layer, LayerSteering(None, 0.0, self.epsilon))
        layers[self.refusal_layer] = replace(base, **refusal)
        return layers

    @contextmanager
    def applied(self, model: nn.Module, alpha: float, reverse: bool) -> Iterator[None]:
        """The harness's Steering protocol: hooks at strength alpha (reverse-safety: the runtime's control token)."""
        with patched(model, self.layers_at(alpha), self.gate_skip) as patch, patch.reverse_if(reverse):
            yield


def load_candidate(gate_dir: Path, sidecar_infos: dict[int, Path], refusal_beta: float, epsilon: float,
                   model_hash: str) -> tuple[Candidate, list[FeatureReadout]]:
    """The candidate from a refusal-gate directory and each layer's sidecar_l{L}.json (every file hash-verified,
    a layer whose screen kept nothing skipped), with the readouts of its features for the sign-flip check."""
    gate, refusal_D, info = load_refusal_gate(gate_dir)
    if info["model_hash"] != model_hash:
        raise SteeringError(f"the refusal gate in {gate_dir} was fit on model {info['model_hash'][:12]}, not "
                            f"{model_hash[:12]}; fit it again")
    features, readouts = {}, []
    hashes = {"gate": info["gate_sha256"], "refusal": info["refusal_sha256"]}
    for layer, path in sorted(sidecar_infos.items()):
        sidecar_info = json.loads(path.read_text())
        if not sidecar_info["feature_ids"]:
            continue
        features[layer] = load_dense(path.parent / sidecar_info["dense"], sidecar_info["dense_sha256"])
        sae, sae_cfg = TopKSAE.load(Path(sidecar_info["sae_path"]))
        if sae_cfg["sae_hash"] != sidecar_info["sae_hash"]:
            raise SteeringError(f"layer {layer}: the sidecars were cut from SAE {sidecar_info['sae_hash'][:12]}, the "
                                f"SAE is now {sae_cfg['sae_hash'][:12]}; cut them again")
        readouts.append(FeatureReadout(layer, sae, sidecar_info["feature_ids"]))
        hashes[f"sidecar_l{layer}"] = sidecar_info["dense_sha256"]
    candidate = Candidate(features, gate, refusal_D, int(info["layer"]), refusal_beta, epsilon,
                          int(info["gate_skip"]), hashes)
    return candidate, readouts


def _rate(metrics: dict, *path: str) -> float:
    node = metrics
    for key in path:
        node = node[key]
    return float(node["rate"])


def strength_gate_values(baseline: dict, steered: dict) -> dict[str, float]:
    """The per-strength gate quantities of a steered metrics.json against the unsteered one (alpha 0)."""
    base_completion = _rate(baseline, "harmful_completion_rate", "overall")
    completion = _rate(steered, "harmful_completion_rate", "overall")
    stability = steered.get("feature_stability", {})
    values = {
        "harmful_completion_reduction_min": 1 - completion / base_completion if base_completion else 0.0,
        "benign_false_refusal_max": _rate(steered, "benign_false_refusal_rate", "overall"),
        "borderline_false_refusal_max": _rate(steered, "benign_false_refusal_rate", "borderline"),
        "next_token_kl_max": float(steered["capability"]["next_token_kl"]),
        "perplexity_increase_max": steered["capability"]["perplexity"] / baseline["capability"]["perplexity"] - 1,
        "task_accuracy_drop_max": (_rate(baseline, "capability", "task_accuracy", "overall")
                                   - _rate(steered, "capability", "task_accuracy", "overall")),
        "sign_flips_max": float(stability.get("sign_flips", 0)),
    }
    # differences of rates carry float noise (0.5 - 0.49 > 0.01): gates compare at 1e-9
    return {name: round(value, 9) for name, value in values.items()}


def reverse_capability_recovery(baseline: dict, reverse: dict) -> float:
    """How much of the baseline capability reverse-safety keeps: the worse of task accuracy and (inverse)
    perplexity, each as a ratio to the baseline."""
    accuracy = _rate(baseline, "capability", "task_accuracy", "overall")
    ratios = [baseline["capability"]["perplexity"] / reverse["capability"]["perplexity"]]
    if accuracy:
        ratios.append(_rate(reverse, "capability", "task_accuracy", "overall") / accuracy)
    return min(ratios)


def strength_results(gates: dict[str, Gate], baseline: dict, steered: dict) -> list[GateResult]:
    return check_gates({name: gates[name] for name in STRENGTH_GATES}, strength_gate_values(baseline, steered))


def operating_point_results(gates: dict[str, Gate], baseline: dict, steered: dict, reverse: dict,
                            overhead: float) -> list[GateResult]:
    """Every steering gate at the operating point: the per-strength ones, reverse-safety and throughput."""
    values = {**strength_gate_values(baseline, steered),
              "reverse_capability_recovery_min": reverse_capability_recovery(baseline, reverse),
              "throughput_overhead_max": overhead}
    return check_gates({name: gates[name] for name in values}, values)


def choose_alpha(results: dict[float, list[GateResult]]) -> float:
    """The rule in the module docstring, from each alpha's per-strength gate results."""
    return choose_least_intervention(results, lambda alpha: alpha)


def choose_least_intervention(results: dict, strength: Callable[[object], float]):
    """The key of `results` (key -> per-strength gate results) the module docstring's rule picks, `strength` saying
    how much intervention each key is (an alpha; a schedule's summed alphas)."""
    passing = [key for key, gates in results.items() if all(g.passed for g in gates)]
    if passing:
        return min(passing, key=strength)

    def rank(key) -> tuple:
        job = next(g for g in results[key] if g.name == "harmful_completion_reduction_min")
        return job.passed, sum(g.passed for g in results[key]), job.value, -strength(key)

    return max(results, key=rank)
