"""One layer's SAE stage end to end: read shards, train (resumable), fold, evaluate, save with metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sae_pipeline.activations.store import config_hash, layer_dir, load_split, load_stats
from sae_pipeline.config import Gates, HarvestConfig, SAEConfig
from sae_pipeline.sae.gates import GateResult, evaluate_sae_gates
from sae_pipeline.sae.metrics import coherence_metrics, reconstruction_metrics, splice_metrics
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.sae.plots import liveness_histogram, training_curve
from sae_pipeline.sae.train import CHECKPOINT_FILE, train_sae

METRICS_FILE = "metrics.json"


class LayerSAEReport(NamedTuple):
    directory: Path
    sae_hash: str
    metrics: dict
    gates: list[GateResult]
    history: list[dict]
    liveness_png: bytes
    curve_png: bytes


def sae_dir(base: Path, activations_root: Path, cfg: SAEConfig, layer: int) -> Path:
    return base / activations_root.name / config_hash(cfg.model_dump(mode="json"))[:8] / f"layer_{layer:02d}"


def train_layer_sae(activations_root: Path, layer: int, cfg: SAEConfig, harvest_cfg: HarvestConfig,
                    out_dir: Path, model: nn.Module, heldout_ids: torch.Tensor, gates: Gates,
                    lineage: dict) -> LayerSAEReport:
    began = time.perf_counter()
    acts_dir = layer_dir(activations_root, layer)
    train_ND = load_split(acts_dir, "train")
    heldout_ND = load_split(acts_dir, "heldout")
    result = train_sae(train_ND, load_stats(acts_dir), cfg, checkpoint_dir=out_dir)
    del train_ND
    recon = reconstruction_metrics(result.sae, heldout_ND)
    coherence = coherence_metrics(result.sae.W_dec_FD, cfg.merge_cos)
    model_dtype = next(model.parameters()).dtype
    splice = splice_metrics(model, result.sae.to(model_dtype), layer, heldout_ids, harvest_cfg.skip_positions)
    result.sae.float()
    metrics = {
        **{k: v for k, v in recon._asdict().items() if k != "firing_frequency_F"},
        **{f"coherence_{k}": v for k, v in coherence._asdict().items() if k != "near_duplicates"},
        "near_duplicates": coherence.near_duplicates,
        **splice._asdict(),
        "merged_latents": result.merged,
        "train_tokens_per_second": result.tokens_per_second,
        "train_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - began,
        "heldout_tokens": int(heldout_ND.shape[0]),
    }
    gate_results = evaluate_sae_gates(metrics, gates)
    sae_hash = result.sae.save(out_dir, {"layer": layer, "whitening_folded": cfg.whiten, "train_config":
                                         cfg.model_dump(mode="json"), **lineage})
    metrics["sae_hash"] = sae_hash
    (out_dir / METRICS_FILE).write_text(json.dumps(
        {"metrics": metrics, "gates": [g._asdict() for g in gate_results], "history": result.history}, indent=2))
    (out_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    title = f"layer {layer}, F={cfg.n_latents}, k={cfg.k}"
    return LayerSAEReport(out_dir, sae_hash, metrics, gate_results, result.history,
                          liveness_histogram(recon.firing_frequency_F, title), training_curve(result.history, title))
