"""Jobs: `main` materialises every stage. One job holds one partitioning, so each partitioned asset has its own:
`sweep` (the strength sweep, by alpha), `ensemble` (the multi-layer ensemble's schedules), `behaviors` and `screens`
(behaviour features and screens, by behaviour x layer), `arms` (the behaviour release's evaluation arms), `fused`
(fused nets and their exports, by layer), `fused_backends` (the fused release's arms, per backend) and `audit` (the
audit's arms, by arm x family);
`sae_pipeline/defs/driver.py` (scripts/main.sh) runs them partition by partition."""

import dagster as dg

PARTITIONED = ("alpha_sweep", "ensemble_sweep", "behavior_features", "behavior_screen", "behavior_arms", "fused_net",
               "fused_export", "fused_arms", "audit_arms")
main_job = dg.define_asset_job(
    "main", selection=dg.AssetSelection.all() - dg.AssetSelection.assets(*PARTITIONED),
    description="Every stage on the active profile except the partitioned ones (strength sweep, ensemble schedules, "
                "behaviour features and screens, behaviour arms, fused nets and exports, fused arms, audit arms).")
behaviors_job = dg.define_asset_job("behaviors", selection=dg.AssetSelection.assets("behavior_features"),
                                    description="Each behaviour's ranked features at each layer.")
screens_job = dg.define_asset_job("screens", selection=dg.AssetSelection.assets("behavior_screen"),
                                  description="Each behaviour's causal quick screen at each layer.")
sweep_job = dg.define_asset_job("sweep", selection=dg.AssetSelection.assets("alpha_sweep"),
                                description="The candidate operating point at each strength and reverse-safety.")
ensemble_job = dg.define_asset_job("ensemble", selection=dg.AssetSelection.assets("ensemble_sweep"),
                                   description="The multi-layer ensemble: named schedules, grid, layer ablation, "
                                               "reverse-safety (in that order).")
behavior_arms_job = dg.define_asset_job(
    "arms", selection=dg.AssetSelection.assets("behavior_arms"),
    description="The behaviour release on the held-out sets: every behaviour on, each alone, reverse-safety.")
fused_job = dg.define_asset_job("fused", selection=dg.AssetSelection.assets("fused_net", "fused_export"),
                                description="Each layer's fused net and its ONNX and INT8 exports.")
fused_arms_job = dg.define_asset_job(
    "fused_backends", selection=dg.AssetSelection.assets("fused_arms"),
    description="The fused release on the held-out sets per backend, and the INT8 path reversed.")
audit_job = dg.define_asset_job("audit", selection=dg.AssetSelection.assets("audit_arms"),
                               description="The audit suite's families, unsteered and under the current release.")
