"""Compare measurements with a section of the gates file: one row per gate, naming its threshold and source.

A gate's name says its direction: `*_min` passes at or above the threshold, `*_max` at or below."""

from __future__ import annotations

from typing import NamedTuple

from sae_pipeline.config import ConfigError, Gate


class GateResult(NamedTuple):
    name: str
    value: float
    threshold: float
    passed: bool
    source: str


def check_gates(section: dict[str, Gate], measured: dict[str, float]) -> list[GateResult]:
    results = []
    for name, gate in section.items():
        if name not in measured:
            raise ConfigError(f"gate {name!r} has no measurement (measured: {sorted(measured)})")
        if not name.endswith(("_min", "_max")):
            raise ConfigError(f"gate {name!r} must end in _min or _max to say its direction")
        value = float(measured[name])
        passed = value >= gate.value if name.endswith("_min") else value <= gate.value
        results.append(GateResult(name, value, gate.value, passed, gate.source))
    return results
