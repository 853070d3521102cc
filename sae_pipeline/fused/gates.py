"""What the `fused` error gates bound, from a net's error statistics (fused/distill.py's FusedErrors)."""

from __future__ import annotations

import math

from sae_pipeline.config import Gate
from sae_pipeline.fused.distill import FusedErrors
from sae_pipeline.gates import GateResult, check_gates


def errors_record(errors: FusedErrors) -> dict:
    """For JSON and metadata tables."""
    return {name: round(float(value), 9) if isinstance(value, float) else value
            for name, value in errors._asdict().items()}


def error_gate_values(record: dict, onnx_parity: float | None = None) -> dict[str, float]:
    """The gate quantities of one backend's error record; ONNX Runtime parity with PyTorch where measured. With no
    held-out token that the sidecar steers, the relative errors are unmeasured: they fail instead of reading 0."""
    measured = record["steered_tokens"] > 0
    values = {"median_relative_error_max": record["median_relative"] if measured else math.inf,
              "p95_relative_error_max": record["p95_relative"] if measured else math.inf,
              "gates_off_p95_norm_max": record["gates_off_p95_norm"],
              "composition_p95_relative_max": record["composition_p95_relative"] if measured else math.inf}
    if onnx_parity is not None:
        values["onnx_parity_max"] = onnx_parity
    return values


def error_gate_results(gates: dict[str, Gate], record: dict, onnx_parity: float | None = None) -> list[GateResult]:
    """One backend's error record against the `fused` gates it has measurements for."""
    values = error_gate_values(record, onnx_parity)
    return check_gates({name: gates[name] for name in values}, values)
