"""Print the newest SAE metrics per layer as a table: `python -m sae_pipeline.sae.summary [--profile NAME]`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae_pipeline.hashing import config_hash
from sae_pipeline.config import SAEConfig, artifacts_root, load_profile
from sae_pipeline.sae.run import METRICS_FILE

COLUMNS = ("layer", "r2", "r2_ordinary", "massive_variance_share", "dead_fraction", "coherence_p95", "near_duplicates",
           "k_active_p50", "loss_recovered", "wall_seconds", "gates")


def newest_metrics(root: Path, sae_cfg: SAEConfig, layers: list[int]) -> list[dict]:
    """Per layer, the newest metrics of SAEs trained with exactly this SAE config (any activations)."""
    cfg_dir = config_hash(sae_cfg.model_dump(mode="json"))[:8]
    rows = []
    for layer in layers:
        files = sorted(root.glob(f"sae/*/{cfg_dir}/layer_{layer:02d}/{METRICS_FILE}"), key=lambda p: p.stat().st_mtime)
        if files:
            record = json.loads(files[-1].read_text())
            passed = all(g["passed"] for g in record["gates"])
            rows.append({"layer": layer, **record["metrics"], "gates": "pass" if passed else "FAIL"})
    return rows


def markdown_table(rows: list[dict]) -> str:
    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--profile", default=None)
    args = parser.parse_args()
    profile = load_profile(args.profile)
    rows = newest_metrics(artifacts_root(), profile.sae, profile.harvest.layers)
    print(markdown_table(rows) if rows else "no SAE metrics yet")


if __name__ == "__main__":
    main()
