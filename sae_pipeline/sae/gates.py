"""Compare SAE metrics with the gates file: one row per gate, each naming its threshold and source."""

from __future__ import annotations

from typing import NamedTuple

from sae_pipeline.config import Gates


class GateResult(NamedTuple):
    name: str
    value: float
    threshold: float
    passed: bool
    source: str


# gate name -> (metric key, True when the metric must be at least the threshold)
_SAE_GATES = {
    "r2_min": ("r2", True),
    "dead_fraction_max": ("dead_fraction", False),
    "coherence_p95_max": ("coherence_p95", False),
    "near_duplicates_max": ("near_duplicates", False),
}


def evaluate_sae_gates(metrics: dict, gates: Gates) -> list[GateResult]:
    results = []
    for name, (key, at_least) in _SAE_GATES.items():
        gate = gates.sae_quality[name]
        value = float(metrics[key])
        passed = value >= gate.value if at_least else value <= gate.value
        results.append(GateResult(name, value, gate.value, passed, gate.source))
    return results
