"""Jobs: `main` materialises every stage that exists."""

import dagster as dg

main_job = dg.define_asset_job("main", selection=dg.AssetSelection.all(),
                               description="Every stage on the active profile (README's main command).")
