"""Measure the SAE quality frontier on cached activations: held-out R2 (and dead %, coherence, duplicates) against
dictionary size, k and training tokens. Each argument after the layer is a JSON dict of SAEConfig overrides;
"tokens" in it trains on the first that many harvested tokens (unique data, against "epochs" for steps). R2 on the
training tokens beside the held-out one tells a data limit (a gap) from a capacity limit (none).

    python benchmarks/sae_frontier.py --layer 15 --tokens 1048560 '{"k": 64, "k_start": 128}' '{"n_latents": 9216}'

Rows append to data/evidence/sae_r2_frontier.jsonl, the evidence kept beside the R2 gate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sae_pipeline.activations.store import layer_dir, load_split, load_stats, newest_harvest
from sae_pipeline.config import DATA_DIR, artifacts_root, load_profile
from sae_pipeline.sae.metrics import coherence_metrics, reconstruction_metrics
from sae_pipeline.sae.train import train_sae

EVIDENCE = DATA_DIR / "evidence" / "sae_r2_frontier.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens (default: all harvested)")
    parser.add_argument("--activations", default=None, help="harvest root (default: the newest holding the layer)")
    parser.add_argument("overrides", nargs="+")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    root = Path(args.activations) if args.activations else newest_harvest(
        artifacts_root() / "activations", args.layer, args.tokens or 0)
    directory = layer_dir(root, args.layer)
    train_ND, heldout_ND = load_split(directory, "train", args.tokens), load_split(directory, "heldout")
    for override in args.overrides:
        update = json.loads(override)
        tokens_ND = train_ND[:update.pop("tokens", train_ND.shape[0])]
        cfg = profile.sae.model_copy(update=update)
        result = train_sae(tokens_ND, load_stats(directory), cfg)
        recon = reconstruction_metrics(result.sae, heldout_ND)
        recon_train = reconstruction_metrics(result.sae, tokens_ND[:heldout_ND.shape[0]])
        coherence = coherence_metrics(result.sae.W_dec_FD, cfg.merge_cos)
        row = {"layer": args.layer, "train_tokens": int(tokens_ND.shape[0]), "epochs": cfg.epochs,
               "n_latents": cfg.n_latents, "k": cfg.k, "k_start": cfg.k_start, "l1_coeff": cfg.l1_coeff,
               "lr": cfg.lr, "batch_tokens": cfg.batch_tokens, "dead_window_tokens": cfg.dead_window_tokens,
               "maintenance_at_fractions": cfg.maintenance_at_fractions,
               "resample_encoder_scale": cfg.resample_encoder_scale, "resampled": result.resampled,
               "dead_fraction_train": round(result.history[-1]["dead_fraction"], 4),
               "heldout_tokens": int(heldout_ND.shape[0]),
               "r2": round(recon.r2, 4), "r2_train": round(recon_train.r2, 4),
               "r2_ordinary": round(recon.r2_ordinary, 4),
               "massive_variance_share": round(recon.massive_variance_share, 4),
               "dead_fraction": round(recon.dead_fraction, 4), "coherence_p95": round(coherence.p95, 4),
               "near_duplicates": coherence.near_duplicates, "tokens_per_second": round(result.tokens_per_second)}
        EVIDENCE.parent.mkdir(parents=True, exist_ok=True)
        with open(EVIDENCE, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
