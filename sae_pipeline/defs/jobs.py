"""Jobs: `main` materialises every stage (one job holds one partitioning, so the strength sweep, partitioned by
alpha, is its own job `sweep`, and the behaviour features, partitioned by behaviour x layer, are `behaviors`);
scripts/main.sh drives them partition by partition."""

import dagster as dg

main_job = dg.define_asset_job(
    "main", selection=dg.AssetSelection.all() - dg.AssetSelection.assets("alpha_sweep", "behavior_features"),
    description="Every stage on the active profile except the strength sweep and the behaviour features.")
behaviors_job = dg.define_asset_job("behaviors", selection=dg.AssetSelection.assets("behavior_features"),
                                    description="Each behaviour's ranked features at each layer.")
sweep_job = dg.define_asset_job("sweep", selection=dg.AssetSelection.assets("alpha_sweep"),
                                description="The candidate operating point at each strength and reverse-safety.")
