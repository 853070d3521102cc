"""Evidence beside the cross-talk gates: how many features each behaviour keeps at one layer for several |cos|
limits and feature counts, from the latest behavior_features candidates (every live latent, ranked) and the layer's
SAE. Writes data/evidence/crosstalk_frontier.jsonl. Run after behavior_features:
python scripts/crosstalk_frontier.py FOLDER (the behaviors/ folder holding candidates_l{L}_{behavior}.json)"""

import json
import sys
from datetime import date
from pathlib import Path

from sae_pipeline.behaviors.crosstalk import select_without_crosstalk
from sae_pipeline.config import artifacts_root, data_dir, load_profile
from sae_pipeline.sae.model import TopKSAE

# (clean, flagged) |cos| limits, the gates' pair first
LIMITS = [(0.05, 0.07), (0.07, 0.09), (0.10, 0.12), (0.15, 0.17), (0.20, 0.22)]
KEEP = [16, 32, 64, 128]


def main(folder: Path) -> None:
    profile = load_profile()
    root = artifacts_root()
    # features_dir mirrors the SAE's folder: artifacts/features/<sae folder>/<data_cfg>/behaviors
    sae_dir = root / "sae" / folder.resolve().parent.parent.relative_to(root.resolve() / "features")
    sae, _ = TopKSAE.load(sae_dir)
    layer = int(sae_dir.name.removeprefix("layer_"))
    ranked = {b: json.loads(path.read_text())["feature_ids"] for b in profile.behaviors.behaviors
              if (path := folder / f"candidates_l{layer}_{b}.json").exists()}
    with (data_dir() / "evidence" / "crosstalk_frontier.jsonl").open("w") as records:
        for keep in KEEP:
            for limit, flagged_limit in LIMITS:
                result = select_without_crosstalk(ranked, sae.W_dec_FD.detach(), keep, limit, flagged_limit,
                                                  profile.behaviors.min_deflated_norm)
                record = {"layer": layer, "d_model": sae.d_model, "keep": keep, "cos_limit": limit,
                          "flagged_cos_limit": flagged_limit,
                          "kept": {b: len(s.feature_ids) for b, s in result.selections.items()},
                          "flagged": {b: sum(s.flagged) for b, s in result.selections.items()},
                          "date": date.today().isoformat()}
                records.write(json.dumps(record) + "\n")
                print(record)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
