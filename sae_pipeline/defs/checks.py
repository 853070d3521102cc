"""Asset checks. sae_quality is evaluated inside the sae step (the numbers exist only there) and is blocking:
a failed gate fails the step, so nothing downstream of that layer's SAE runs."""

import dagster as dg

from sae_pipeline.defs.metadata import table
from sae_pipeline.sae.gates import GateResult

SAE_QUALITY = dg.AssetCheckSpec(
    "sae_quality", asset="sae", blocking=True,
    description="Held-out R2, dead latents, decoder coherence p95 and near-duplicates against data/gates.yaml")


def sae_quality_result(gates: list[GateResult]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=SAE_QUALITY.name, passed=all(gate.passed for gate in gates), severity=dg.AssetCheckSeverity.ERROR,
        metadata={**{gate.name: gate.value for gate in gates}, "gates": table([gate._asdict() for gate in gates])})
