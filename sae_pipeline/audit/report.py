"""Putting the audit's partitions together: audit_metrics.json (deterministic: scalars and ids only) and
audit_timing.json (the hooks' decoding overhead, which no two runs share)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import torch

from sae_pipeline.audit.metrics import ARMS, audit_metrics
from sae_pipeline.audit.run import arm_fingerprints, item_ids, load_arm, run_arm, select_items
from sae_pipeline.audit.suite import FAMILIES, load_suite
from sae_pipeline.config import AuditConfig, EvalConfig, Gate, SteeringConfig
from sae_pipeline.evaluation.redaction import Fingerprints, write_clean
from sae_pipeline.gates import GateResult
from sae_pipeline.model.loading import LoadedModel
from sae_pipeline.release.smoke import current_release
from sae_pipeline.steering.overhead import measure_overhead

METRICS_FILE, TIMING_FILE = "audit_metrics.json", "audit_timing.json"
REPLAYED = ("steered", "plain")  # the partition the determinism check runs again


class AuditReport(NamedTuple):
    metrics: dict
    gates: list[GateResult]
    timing: dict
    path: Path


def collect(root: Path) -> tuple[dict[str, list[dict]], dict[str, dict], dict[str, str]]:
    """Every partition's verified records per arm, the plain family's capability per arm, and the identity the
    partitions share (a partition of another suite, release or model is refused)."""
    records: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    capability: dict[str, dict] = {}
    identities = set()
    for arm in ARMS:
        for family in FAMILIES:
            summary, rows, capability_of = load_arm(root / arm / family)
            records[arm] += rows
            identities.add((summary["suite_sha256"], summary["release_sha256"], summary["model_hash"]))
            if capability_of is not None:
                capability[arm] = capability_of
    if len(identities) != 1:
        raise ValueError(f"the audit partitions under {root} come from different suites, releases or models")
    if set(capability) != set(ARMS):
        raise ValueError(f"the plain family's capability is missing for {sorted(set(ARMS) - set(capability))}")
    suite, release, model = identities.pop()
    return records, capability, {"suite_sha256": suite, "release_sha256": release, "model_hash": model}


def write_report(loaded: LoadedModel, root: Path, eval_cfg: EvalConfig, cfg: AuditConfig, steering_cfg: SteeringConfig,
                 gates: dict[str, Gate]) -> AuditReport:
    """audit_metrics.json from every partition under `root`, with the determinism replay; the release's decoding
    overhead on the plain prompts (steering's overhead settings) in audit_timing.json."""
    records, capability, identity = collect(root)
    arm, family = REPLAYED
    with tempfile.TemporaryDirectory() as replay_dir:
        replay = run_arm(loaded, arm, family, eval_cfg, cfg, Path(replay_dir))
    original, _, _ = load_arm(root / arm / family)
    determinism = {"replayed": f"{arm}/{family}", "records_sha256": original["records_sha256"],
                   "mismatches": int(replay.records_sha256 != original["records_sha256"])}
    metrics, results = audit_metrics(records, capability, eval_cfg, gates, identity, determinism)
    fingerprints = Fingerprints.merged([replay.fingerprints, *(arm_fingerprints(root / a / f)
                                                               for a in ARMS for f in FAMILIES)])
    write_clean(fingerprints, root / METRICS_FILE, metrics)
    items, _ = load_suite()
    policy, _ = current_release()
    device = next(loaded.model.parameters()).device
    plain = [torch.tensor([item_ids(loaded.tokenizer, i, (), 0)], device=device)
             for i in select_items(items, "plain", 0)][: cfg.latency_prompts]
    overhead = measure_overhead(loaded.model, plain, *policy.steering_layers(loaded.model, 1.0),
                                steering_cfg.overhead_new_tokens, steering_cfg.overhead_rounds)
    timing = {"decode_overhead": round(overhead.overhead, 6), "unsteered_tokens_per_s": overhead.unsteered_tokens_per_s,
              "steered_tokens_per_s": overhead.steered_tokens_per_s, "prompts": len(plain), "device": str(device)}
    write_clean(fingerprints, root / TIMING_FILE, timing)
    return AuditReport(metrics, results, timing, root / METRICS_FILE)
