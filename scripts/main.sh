#!/usr/bin/env bash
# The README's main command: install, fetch the embedded model once, materialise every stage that exists.
# Re-running resumes: finished corpus/shards/SAEs are reused, interrupted harvests and trainings continue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}" HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
# every run in this one process (~150 runs; SAE_PIPELINE_EXECUTOR=multiprocess or k8s still choose otherwise)
export SAE_PIPELINE_EXECUTOR="${SAE_PIPELINE_EXECUTOR:-in_process}"
mkdir -p "$DAGSTER_HOME"
profile="${SAE_PIPELINE_PROFILE:-smollm2}"
echo "profile $profile"
status=0
# every stage in dependency order, one Dagster run per partition (sae_pipeline/defs/driver.py: the order, which
# failures stop it, STEER_DEBUG=1 for the reverse-safety runs alone); the wall time of each lands in
# artifacts/benchmarks/main_job_$profile.json
python -m sae_pipeline.defs.driver || status=1
python -m sae_pipeline.sae.summary --profile "$profile"
exit $status
