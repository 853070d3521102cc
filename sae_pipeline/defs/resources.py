"""Dagster resources: thin wrappers that hand core objects to assets."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import dagster as dg
import torch

from sae_pipeline.config import Profile, artifacts_root
from sae_pipeline.evaluation.tracking import flatten_scalars, lineage_of, log_run
from sae_pipeline.model.loading import LoadedModel, load_model

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


_DEVICES = ("cpu", "cuda")


@lru_cache(maxsize=2)
def _cached_load(name_or_path: str | None, dtype: str, device: str) -> LoadedModel:
    return load_model(name_or_path, dtype=_DTYPES[dtype], device=device)


class ModelResource(dg.ConfigurableResource):
    """The model under study. Unset fields take the profile's model (the embedded SmolLM2 by default), its
    harvest dtype and its execution device."""

    name_or_path: str | None = None
    dtype: str | None = None
    device: str | None = None

    def load(self, profile: Profile, dtype: str | None = None, tokenizer_and_hashes_only: bool = False
             ) -> LoadedModel:
        """dtype: the stage's own choice (evaluation decodes in its configured dtype); the resource's wins.
        tokenizer_and_hashes_only: a step without the gpu tag (it may run on a CPU node) keeps the model on cpu."""
        dtype = self.dtype or dtype or profile.harvest.model_dtype
        if dtype not in _DTYPES:
            raise dg.Failure(f"ModelResource.dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        device = "cpu" if tokenizer_and_hashes_only else self.device or profile.execution.device
        if device not in _DEVICES:
            raise dg.Failure(f"ModelResource.device must be one of {list(_DEVICES)}, got {device!r}")
        if device == "cuda" and not torch.cuda.is_available():
            raise dg.Failure("the profile puts the model on cuda (execution.device) but this process sees no GPU")
        loaded = _cached_load(self.name_or_path or profile.model, dtype, device)
        # one process may run many steps (the main job's driver): a hook an earlier step left behind would steer
        # this one silently, so refuse instead
        if any(m._forward_hooks or m._forward_pre_hooks for m in loaded.model.modules()):
            raise dg.Failure("the cached model still carries forward hooks from an earlier step (a patch that was "
                             "never removed); run this step in a fresh process")
        return loaded


_WANDB_MODES = ("offline", "online", "disabled")


class TrackingResource(dg.ConfigurableResource):
    """W&B logging of a run's scalars and a reference artifact of its outputs, with their hashes as lineage. Unset
    fields take WANDB_MODE (default offline: nothing leaves the machine) and artifacts/wandb."""

    mode: str | None = None
    directory: str | None = None

    def resolved_mode(self) -> str:
        mode = self.mode or os.environ.get("WANDB_MODE", "offline")
        if mode not in _WANDB_MODES:
            raise dg.Failure(f"TrackingResource.mode (or WANDB_MODE) must be one of {list(_WANDB_MODES)}, got {mode!r}")
        return mode

    def root(self) -> Path:
        return Path(self.directory) if self.directory else artifacts_root() / "wandb"

    def log_metrics(self, run_name: str, metrics: dict, outputs: dict[str, Path]) -> Path | None:
        """Every finite number of `metrics`, and `outputs` referenced with the metrics' hashes as lineage."""
        return log_run(run_name, flatten_scalars(metrics), self.root(), self.resolved_mode(), outputs,
                       lineage_of(metrics))
