"""W&B logging of evaluation scalars: offline unless WANDB_MODE says otherwise, numbers only, never text."""

from __future__ import annotations

import math
from pathlib import Path

from sae_pipeline.evaluation.redaction import RedactionError

WANDB_PROJECT = "sae-pipeline"


def flatten_scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Every finite number in a nested metrics dict, keyed by its path ("harmful_refusal_rate/overall/rate")."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten_scalars(value, path + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[path] = float(value)
    return out


LINEAGE_KEYS = ("model_hash", "dataset_hash", "cfg_hash", "metrics_sha256", "run_id")


def lineage_of(metrics: dict) -> dict[str, str]:
    """The hashes that tie a metrics file to its model, datasets, configuration and run."""
    return {key: str(metrics[key]) for key in LINEAGE_KEYS if key in metrics}


def log_run(run_name: str, scalars: dict[str, float], directory: Path, mode: str,
            references: dict[str, Path], lineage: dict[str, str]) -> Path | None:
    """One W&B run with these scalars and one artifact of `references` (files referenced by path and checksum, never
    uploaded) carrying `lineage` as metadata; returns the run's directory (None when mode is disabled).
    Offline W&B cannot record an artifact as a run's input, so lineage travels as the artifact's hashes."""
    if mode == "disabled":
        return None
    bad = [k for k, v in scalars.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]
    if bad:
        raise RedactionError(f"W&B receives scalars only; refusing non-numeric values for {bad[:5]}")
    import wandb  # imported here: starting W&B costs seconds and most callers never log

    directory.mkdir(parents=True, exist_ok=True)
    # console="off": W&B must not copy the process's stdout/stderr into its files
    run = wandb.init(project=WANDB_PROJECT, name=run_name, dir=str(directory), mode=mode,
                     settings=wandb.Settings(console="off", silent=True, save_code=False))
    run.log(scalars)
    if references:
        artifact = wandb.Artifact(f"{run_name}-outputs", type="evaluation", metadata=dict(lineage))
        for name, path in references.items():
            artifact.add_reference(Path(path).resolve().as_uri(), name=name)
        run.log_artifact(artifact)
    run_dir = Path(run.dir).parent
    run.finish()
    return run_dir
