#!/usr/bin/env bash
# The README's main command: install, fetch the embedded model once, materialise every stage that exists.
# Re-running resumes: finished corpus/shards/SAEs are reused, interrupted harvests and trainings continue.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export DAGSTER_HOME="${DAGSTER_HOME:-$PWD/.dagster_home}" HF_HUB_OFFLINE=1 WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p "$DAGSTER_HOME"
profile="${SAE_PIPELINE_PROFILE:-smollm2}"
layers=$(python -c "from sae_pipeline.config import load_profile; print(' '.join(map(str, load_profile('$profile').harvest.layers)))")
first=${layers%% *}; last=${layers##* }
echo "profile $profile: layers $layers"
status=0
# frozen datasets -> judges -> baseline metrics (independent of the SAEs; a failed check blocks what follows)
dagster asset materialize -m sae_pipeline.defs --select "prompt_sets,refusal_judge,baseline_metrics" || status=1
dagster asset materialize -m sae_pipeline.defs --select corpus
dagster asset materialize -m sae_pipeline.defs --select activations --partition-range "$first...$last"
for layer in $layers; do
  dagster asset materialize -m sae_pipeline.defs --select sae --partition "$layer" || status=1
done
# the conditional refusal mode's probe gate and refusal direction (raw activations: no SAE needed)
dagster asset materialize -m sae_pipeline.defs --select refusal_gate || status=1
# feature discovery, causal screen and sidecars on every layer whose SAE passes sae_quality (the others are refused
# with the reason)
for layer in $layers; do
  dagster asset materialize -m sae_pipeline.defs --select "feature_scores,feature_ranking,causal_screen,sidecars" \
    --partition "$layer" || status=1
done
# the candidate at each strength of the grid, then reverse-safety (an audit run: STEER_DEBUG=1 for it alone), then
# the operating point and its blocking steering_gates check
grid=$(python -c "from sae_pipeline.config import load_profile; print(' '.join(f'{a:.2f}' for a in load_profile('$profile').steering.alpha_grid))")
for alpha in $grid; do
  dagster asset materialize -m sae_pipeline.defs --select alpha_sweep --partition "$alpha" || status=1
done
STEER_DEBUG=1 dagster asset materialize -m sae_pipeline.defs --select alpha_sweep --partition reverse || status=1
dagster asset materialize -m sae_pipeline.defs --select operating_point || status=1
# the multi-layer ensemble of the same candidate: a refusal direction per layer, the named schedules, the grid around
# the better one, the layer ablation, reverse-safety (in that order), then ensemble_metrics and its ensemble_gates
dagster asset materialize -m sae_pipeline.defs --select ensemble_directions || status=1
parts=$(python -c "from sae_pipeline.defs.definitions import build_defs; from sae_pipeline.config import load_profile; import dagster as dg; d = build_defs(load_profile('$profile')); print(' '.join(d.resolve_assets_def('ensemble_sweep').partitions_def.get_partition_keys()))")
for part in $parts; do
  if [ "$part" = reverse ]; then
    STEER_DEBUG=1 dagster asset materialize -m sae_pipeline.defs --select ensemble_sweep --partition reverse || status=1
  else
    dagster asset materialize -m sae_pipeline.defs --select ensemble_sweep --partition "$part" || status=1
  fi
done
dagster asset materialize -m sae_pipeline.defs --select ensemble_metrics || status=1
# behaviour dictionaries: layer choice, each behaviour's ranked features per layer, the cross-talk filter (blocking
# check `crosstalk`; `crosstalk_count` is recorded in the release), each behaviour's causal quick screen, the router,
# the release
dagster asset materialize -m sae_pipeline.defs --select behavior_layers || status=1
behaviors=$(python -c "from sae_pipeline.config import load_profile; print(' '.join(load_profile('$profile').behaviors.behaviors))")
for behavior in $behaviors; do
  for layer in $layers; do
    dagster asset materialize -m sae_pipeline.defs --select behavior_features --partition "$behavior|$layer" || status=1
  done
done
dagster asset materialize -m sae_pipeline.defs --select "behavior_crosstalk,behavior_router" || status=1
for behavior in $behaviors; do
  for layer in $layers; do
    dagster asset materialize -m sae_pipeline.defs --select behavior_screen --partition "$behavior|$layer" || status=1
  done
done
dagster asset materialize -m sae_pipeline.defs --select behavior_release || status=1
# the release on the held-out sets: every behaviour on, each alone, reverse (STEER_DEBUG=1 for it alone), then
# ensemble_behavior_metrics.json and its blocking behavior_gates check
for behavior in all $behaviors; do
  arm=$([ "$behavior" = all ] && echo all || echo "only_$behavior")
  dagster asset materialize -m sae_pipeline.defs --select behavior_arms --partition "$arm" || status=1
done
STEER_DEBUG=1 dagster asset materialize -m sae_pipeline.defs --select behavior_arms --partition reverse || status=1
dagster asset materialize -m sae_pipeline.defs --select behavior_evaluation || status=1
# fused side-nets: per layer the distilled net and its ONNX/INT8 exports (blocking error checks; a layer the release
# does not steer records that), the fused release, one harness run per backend, the INT8 path reversed and the
# control (the sidecars' rule in float32), then
# fused_metrics.json and its blocking fused_gates check
for layer in $layers; do
  dagster asset materialize -m sae_pipeline.defs --select "fused_net,fused_export" --partition "$layer" || status=1
done
dagster asset materialize -m sae_pipeline.defs --select fused_release || status=1
backends=$(python -c "from sae_pipeline.config import load_profile; print(' '.join(load_profile('$profile').fused.backends))")
for backend in $backends; do
  dagster asset materialize -m sae_pipeline.defs --select fused_arms --partition "$backend" || status=1
done
STEER_DEBUG=1 dagster asset materialize -m sae_pipeline.defs --select fused_arms --partition reverse || status=1
dagster asset materialize -m sae_pipeline.defs --select fused_arms --partition exact_rule || status=1
dagster asset materialize -m sae_pipeline.defs --select fused_evaluation || status=1
# the release bundle (manifest; signed when SAE_PIPELINE_SIGNING_KEY is set) and its blocking release_integrity check
dagster asset materialize -m sae_pipeline.defs --select release || status=1
# the nightly smoke's reference for the current release (once per release), then one smoke run against it (the
# `nightly_smoke` schedule runs the `smoke` job when `dagster dev` is up; `python -m sae_pipeline.release.healthcheck`
# runs it from a shell)
dagster asset materialize -m sae_pipeline.defs --select smoke_reference || status=1
dagster asset materialize -m sae_pipeline.defs --select smoke_metrics || status=1
# the adversarial audit: the locked suite (data/audit/), each family unsteered and under the current release,
# audit_metrics.json and its blocking audit_gates check; then the diagnostics of what failed and the per-locale
# multipliers (locale_alphas.json)
dagster asset materialize -m sae_pipeline.defs --select audit_suite || status=1
families=$(python -c "from sae_pipeline.audit.suite import FAMILIES; print(' '.join(FAMILIES))")
for arm in baseline steered; do
  for family in $families; do
    dagster asset materialize -m sae_pipeline.defs --select audit_arms --partition "$arm|$family" || status=1
  done
done
dagster asset materialize -m sae_pipeline.defs --select audit_evaluation || status=1
dagster asset materialize -m sae_pipeline.defs --select "audit_diagnostics,locale_alphas" || status=1
python -m sae_pipeline.sae.summary --profile "$profile"
exit $status
