"""healthcheck: run the smoke against the current release and print a green/red JSON; exit 0 when green, 1 when red.

    python -m sae_pipeline.release.healthcheck [--profile smollm2]     (artifacts: SAE_PIPELINE_ARTIFACTS)

The reference must exist (materialise `smoke_reference` once per release). Red also when the smoke cannot run (no
release, no reference, a reference of another release or shard), with the reason."""

from __future__ import annotations

import argparse
import json
import sys

import torch

from sae_pipeline.config import load_gates, load_profile
from sae_pipeline.model.loading import load_model
from sae_pipeline.release.smoke import SmokeError, load_reference, run_smoke, smoke_verdict


def healthcheck(profile_name: str | None = None) -> dict:
    profile = load_profile(profile_name)
    try:
        loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
        result, release, release_sha256 = run_smoke(loaded, profile.evaluation, profile.smoke.per_group)
        verdict = smoke_verdict(load_gates().smoke, load_reference(release_sha256, profile.smoke.per_group),
                                result.metrics)
    except SmokeError as err:
        return {"green": False, "reason": str(err)}
    return {"green": verdict.passed, "release": release, "release_sha256": release_sha256,
            "metrics_sha256": verdict.metrics_sha256, "reference_sha256": verdict.reference_sha256,
            "gates": [{**g._asdict(), "passed": bool(g.passed)} for g in verdict.gates]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=None)
    args = parser.parse_args(argv)
    report = healthcheck(args.profile)
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0 if report["green"] else 1


if __name__ == "__main__":
    sys.exit(main())
