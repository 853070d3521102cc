"""One layer's SAE stage end to end: read shards, train (resumable), fold, evaluate, save with metrics."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sae_pipeline.activations.store import layer_dir, load_split, load_stats
from sae_pipeline.config import Gates, HarvestConfig, SAEConfig
from sae_pipeline.hashing import config_hash
from sae_pipeline.gates import GateResult
from sae_pipeline.sae.gates import evaluate_sae_gates
from sae_pipeline.sae.metrics import coherence_metrics, reconstruction_metrics, splice_metrics
from sae_pipeline.sae.plots import liveness_histogram, training_curve
from sae_pipeline.sae.train import train_sae

METRICS_FILE = "metrics.json"


class LayerSAEReport(NamedTuple):
    directory: Path
    sae_hash: str
    metrics: dict
    gates: list[GateResult]
    sweep: list[dict]  # one row per lambda candidate: l1_coeff, r2, dead_fraction, gates_passed
    history: list[dict]
    liveness_png: bytes
    curve_png: bytes


def sae_dir(base: Path, activations_root: Path, cfg: SAEConfig, layer: int) -> Path:
    return base / activations_root.name / config_hash(cfg.model_dump(mode="json"))[:8] / f"layer_{layer:02d}"


def _evaluate(sae, heldout_ND: torch.Tensor, merge_cos: float, gates: Gates):
    recon = reconstruction_metrics(sae, heldout_ND)
    coherence = coherence_metrics(sae.W_dec_FD, merge_cos)
    metrics = {
        **{k: v for k, v in recon._asdict().items() if k != "firing_frequency_F"},
        **{f"coherence_{k}": v for k, v in coherence._asdict().items() if k != "near_duplicates"},
        "near_duplicates": coherence.near_duplicates,
    }
    return recon, metrics, evaluate_sae_gates(metrics, gates)


def train_layer_sae(activations_root: Path, layer: int, cfg: SAEConfig, harvest_cfg: HarvestConfig,
                    out_dir: Path, model: nn.Module, heldout_ids: torch.Tensor, gates: Gates,
                    lineage: dict, device: str = "cpu") -> LayerSAEReport:
    """Train one SAE per lambda of l1_sweep (or the single l1_coeff) and keep the one passing most gates, then
    the highest R2; each candidate checkpoints to its own folder, so an interrupted sweep resumes. Training and
    evaluation run on `device`; the activations stay in host memory and move a batch at a time."""
    began = time.perf_counter()
    acts_dir = layer_dir(activations_root, layer)
    train_ND = load_split(acts_dir, "train")
    heldout_ND = load_split(acts_dir, "heldout")
    stats = load_stats(acts_dir)
    candidates, sweep = [], []
    for l1_coeff in cfg.l1_sweep or [cfg.l1_coeff]:
        candidate_cfg = cfg.model_copy(update={"l1_coeff": l1_coeff})
        result = train_sae(train_ND, stats, candidate_cfg, checkpoint_dir=out_dir / f"l1_{l1_coeff:g}", device=device)
        recon, metrics, gate_results = _evaluate(result.sae, heldout_ND, cfg.merge_cos, gates)
        candidates.append((sum(g.passed for g in gate_results), metrics["r2"], l1_coeff, result, recon, metrics,
                           gate_results))
        sweep.append({"l1_coeff": l1_coeff, "r2": metrics["r2"], "dead_fraction": metrics["dead_fraction"],
                      "gates_passed": candidates[-1][0]})
    del train_ND
    _, _, l1_coeff, result, recon, metrics, gate_results = max(candidates, key=lambda c: (c[0], c[1]))
    splice = splice_metrics(model, result.sae, layer, heldout_ids, harvest_cfg.skip_positions)
    metrics.update({
        **splice._asdict(),
        "l1_coeff": l1_coeff,
        "merged_latents": result.merged,
        "resampled_latents": result.resampled,
        "train_tokens_per_second": result.tokens_per_second,
        "train_seconds": result.wall_seconds,
        "wall_seconds": time.perf_counter() - began,
        "heldout_tokens": int(heldout_ND.shape[0]),
    })
    sae_hash = result.sae.save(out_dir, {"layer": layer, "whitening_folded": cfg.whiten, "l1_coeff": l1_coeff,
                                         "train_config": cfg.model_dump(mode="json"), **lineage})
    metrics["sae_hash"] = sae_hash
    (out_dir / METRICS_FILE).write_text(json.dumps(
        {"metrics": metrics, "gates": [g._asdict() for g in gate_results], "l1_sweep": sweep,
         "history": result.history}, indent=2))
    for candidate_dir in out_dir.glob("l1_*"):  # checkpoints only serve resumption
        shutil.rmtree(candidate_dir)
    title = f"layer {layer}, F={cfg.n_latents}, k={cfg.k}"
    return LayerSAEReport(out_dir, sae_hash, metrics, gate_results, sweep, result.history,
                          liveness_histogram(recon.firing_frequency_F, title), training_curve(result.history, title))
