"""Compare SAE metrics with the sae_quality gates."""

from __future__ import annotations

import json
from pathlib import Path

from sae_pipeline.config import Gates
from sae_pipeline.gates import GateResult, check_gates

# gate name -> metric key
_SAE_GATES = {"r2_min": "r2", "dead_fraction_max": "dead_fraction", "coherence_p95_max": "coherence_p95",
              "near_duplicates_max": "near_duplicates"}


def evaluate_sae_gates(metrics: dict, gates: Gates) -> list[GateResult]:
    return check_gates(gates.sae_quality, {name: metrics[key] for name, key in _SAE_GATES.items()})


def sae_gate_failures(sae_path: Path, gates: Gates) -> list[str]:
    """Names of the sae_quality gates an SAE directory's metrics.json misses (later stages refuse such an SAE)."""
    from sae_pipeline.sae.run import METRICS_FILE

    if not (sae_path / METRICS_FILE).exists():
        return ["not trained"]
    record = json.loads((sae_path / METRICS_FILE).read_text())
    return [g.name for g in evaluate_sae_gates(record["metrics"], gates) if not g.passed]
