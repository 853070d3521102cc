"""Compare SAE metrics with the sae_quality gates."""

from __future__ import annotations

from sae_pipeline.config import Gates
from sae_pipeline.gates import GateResult, check_gates

# gate name -> metric key
_SAE_GATES = {"r2_min": "r2", "dead_fraction_max": "dead_fraction", "coherence_p95_max": "coherence_p95",
              "near_duplicates_max": "near_duplicates"}


def evaluate_sae_gates(metrics: dict, gates: Gates) -> list[GateResult]:
    return check_gates(gates.sae_quality, {name: metrics[key] for name, key in _SAE_GATES.items()})
