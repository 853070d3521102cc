"""Jobs: `main` materialises every stage (one job holds one partitioning, so the strength sweep, partitioned by
alpha, is its own job `sweep`); scripts/main.sh drives both partition by partition."""

import dagster as dg

main_job = dg.define_asset_job("main", selection=dg.AssetSelection.all() - dg.AssetSelection.assets("alpha_sweep"),
                               description="Every stage on the active profile except the strength sweep.")
sweep_job = dg.define_asset_job("sweep", selection=dg.AssetSelection.assets("alpha_sweep"),
                                description="The candidate operating point at each strength and reverse-safety.")
