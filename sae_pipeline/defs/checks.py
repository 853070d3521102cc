"""Asset check specs and how gate comparisons become check results.

Checks whose numbers exist only inside a step (sae_quality, judge_accuracy, the dataset checks) are emitted by that
step; all are blocking: a failed gate fails the step, so nothing downstream runs in that run, and a later run reads
the asset only through `lineage.passing_metadata`, which asks the same checks."""

import dagster as dg

from sae_pipeline.gates import GateResult
from sae_pipeline.defs.metadata import table

SAE_QUALITY = dg.AssetCheckSpec(
    "sae_quality", asset="sae", blocking=True,
    description="Held-out R2, dead latents, decoder coherence p95 and near-duplicates against data/gates.yaml")
DATASETS_LOCK = dg.AssetCheckSpec(
    "datasets_lock", asset="prompt_sets", blocking=True,
    description="Every dataset file and split matches data/datasets.lock (a changed file fails closed)")
SPLITS_DISJOINT = dg.AssetCheckSpec(
    "splits_disjoint", asset="prompt_sets", blocking=True,
    description="No duplicate prompts, no prompt in two splits, no prompt both harmful and benign")
DATASET_SIZES = dg.AssetCheckSpec(
    "dataset_sizes", asset="prompt_sets", blocking=True,
    description="Prompts per category/split, benign and clean-QA counts against data/gates.yaml")
JUDGE_ACCURACY = dg.AssetCheckSpec(
    "judge_accuracy", asset="refusal_judge", blocking=True,
    description="The deciding refusal judge's accuracy, precision and recall on the labelled test split")
CROSSTALK = "crosstalk"  # behavior_crosstalk's |cos| limits: the behaviour screens and the release read it through it


def gate_check_result(spec: dg.AssetCheckSpec, gates: list[GateResult]) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=spec.name, passed=all(gate.passed for gate in gates), severity=dg.AssetCheckSeverity.ERROR,
        metadata={**{gate.name: gate.value for gate in gates}, "gates": table([gate._asdict() for gate in gates])})


def problems_check_result(spec: dg.AssetCheckSpec, problems: list[str]) -> dg.AssetCheckResult:
    """Pass when the list of problems is empty; otherwise list them (first 50) in the check's metadata."""
    return dg.AssetCheckResult(
        check_name=spec.name, passed=not problems, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"problems": len(problems), "details": dg.MetadataValue.md(
            "\n".join(f"- {p}" for p in problems[:50]) or "none")})
