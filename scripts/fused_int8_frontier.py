"""How far fused nets and their INT8 schemes hold the `fused` error gates on real activations (issue #6).

Two measurements, each against the runtime's own feature rule on the held-out prompts' tokens (the gates' terms):
- `released`: each layer of the fused release, its float net quantised under every scheme of
  `fused.export.INT8_SCHEMES` (calibrated as the fused_export asset calibrates);
- `stress`: a harder net than the release holds (it steers one feature): at each released layer, the first
  `--features` latents of every behaviour's dictionary (removal, the release's alphas), six groups folded into one
  net, then distilled with the profile's settings; fold and distilled in PyTorch, float ONNX and every INT8 scheme.
What the layer's inputs look like is recorded too (per-token max |x|). Since 2026-11-30 the tokens leave out each
chat's attention sink, as the runtime does (`sinks: "excluded"`; earlier rows held them: its massive activation set the
per-tensor input ranges and its delta, never applied at run time, counted among the steered tokens). One JSON line
per (measurement, layer, net, backend) is appended to data/evidence/fused_int8.jsonl.

    python scripts/fused_int8_frontier.py [--release artifacts/fused/release] [--features 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import torch

from sae_pipeline.activations.store import load_stats
from sae_pipeline.behaviors.release import LayerGroups, concat_sidecars
from sae_pipeline.config import DATA_DIR, load_gates, load_profile
from sae_pipeline.features.causal import sidecar_from_sae
from sae_pipeline.fused.data import LayerTokens, calibration_feeds, split_tokens
from sae_pipeline.fused.distill import Teacher, fit, fused_errors
from sae_pipeline.fused.export import INT8_SCHEMES, OnnxSideNet, save_int8, save_onnx
from sae_pipeline.fused.gates import error_gate_results, errors_record
from sae_pipeline.fused.net import FusedNet
from sae_pipeline.fused.release import read_fused_release
from sae_pipeline.model.loading import load_model
from sae_pipeline.sae.model import TopKSAE
from sae_pipeline.steering.runtime import FusedSideNet

EVIDENCE = DATA_DIR / "evidence" / "fused_int8.jsonl"


def backends(onnx_path: Path, tuning: LayerTokens, alphas: dict[str, float], directory: Path
             ) -> dict[str, tuple[FusedSideNet, int]]:
    """The float ONNX net and its INT8 quantisations: name -> (net, file bytes)."""
    out = {"onnx": (OnnxSideNet(onnx_path), onnx_path.stat().st_size)}
    for scheme in INT8_SCHEMES:
        path = directory / f"{scheme}.onnx"
        save_int8(onnx_path, path, calibration_feeds(tuning, tuple(alphas), alphas),
                  directory / f"{scheme}.calibration.json", scheme)
        out[f"int8_{scheme}"] = (OnnxSideNet(path), path.stat().st_size)
    return out


def row(measurement: str, layer: int, net: str, backend: str, size: int, record: dict, extra: dict) -> dict:
    results = error_gate_results(load_gates().fused, record)
    out = {"date": datetime.date.today().isoformat(), "script": "scripts/fused_int8_frontier.py",
           "measurement": measurement, "layer": layer, "net": net, "backend": backend, "bytes": size,
           "errors": record, "gates_passed": all(g.passed for g in results),
           "failed": [g.name for g in results if not g.passed], **extra}
    print(json.dumps({k: out[k] for k in ("measurement", "layer", "net", "backend", "bytes", "failed")}
                     | {"median": record["median_relative"], "p95": record["p95_relative"],
                        "composition_p95": record["composition_p95_relative"]}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="artifacts/fused/release")
    parser.add_argument("--features", type=int, default=8, help="per behaviour, for the stress net")
    args = parser.parse_args()
    profile = load_profile()
    release = read_fused_release(Path(args.release), "onnx", accept_failed_gates=True)
    behaviors = release.behaviors
    loaded = load_model(profile.model, dtype=getattr(torch, profile.evaluation.model_dtype))
    rows = []
    for layer, onnx_path in release.files.items():
        groups, epsilon = behaviors.groups[layer], float(behaviors.config["epsilon"])
        tuning = split_tokens(loaded.model, loaded.tokenizer, layer, profile.behaviors.behaviors, "tuning")
        heldout = split_tokens(loaded.model, loaded.tokenizer, layer, profile.behaviors.behaviors, "heldout").all_ND()
        token_max = heldout.abs().amax(-1)
        inputs = {"token_max_abs": {f"p{q * 100:g}": round(float(token_max.quantile(q)), 3)
                                    for q in (0.5, 0.95, 0.999, 1.0)}, "sinks": "excluded"}
        with tempfile.TemporaryDirectory() as tmp:
            teacher = Teacher.of(groups, epsilon)
            alphas_G = teacher.groups.alpha_G
            for backend, (net, size) in backends(onnx_path, tuning, groups.alphas, Path(tmp)).items():
                rows.append(row("released", layer, "released", backend, size,
                                errors_record(fused_errors(net, teacher, heldout, alphas_G)),
                                {"features": dict(groups.sizes), **inputs}))
            # stress: six behaviours' dictionaries at once
            sae, _ = TopKSAE.load(Path(behaviors.config["sae"][str(layer)]["path"]))
            dictionaries = behaviors.config["dictionaries"][str(layer)]
            parts = {b: sidecar_from_sae(sae, ids[:args.features], [-1] * len(ids[:args.features]))
                     for b, ids in dictionaries.items()}
            sidecar, sizes = concat_sidecars(parts)
            alphas = {b: float(behaviors.config["behaviors"][b]["alpha"]) for b in sizes}
            teacher = Teacher.of(LayerGroups(sidecar, sizes, alphas), epsilon)
            alphas_G = teacher.groups.alpha_G
            stats = load_stats(Path(release.config["layers"][str(layer)]["whitening"]["path"]).parent)
            net = FusedNet.from_sidecar(sidecar, sizes, stats, profile.fused.hidden)
            fold = errors_record(fused_errors(net, teacher, heldout, alphas_G))
            rows.append(row("stress", layer, "fold", "torch", 0, fold, {"features": sizes, **inputs}))
            result = fit(net, teacher, tuning.all_ND(), profile.fused)
            extra = {"features": sizes, "kept_step": result.kept_step, "steps": profile.fused.steps, **inputs}
            rows.append(row("stress", layer, "distilled", "torch", 0,
                            errors_record(fused_errors(net, teacher, heldout, alphas_G)), extra))
            stress_onnx = Path(tmp) / "stress.onnx"
            save_onnx(net, stress_onnx)
            for backend, (side_net, size) in backends(stress_onnx, tuning, alphas, Path(tmp)).items():
                rows.append(row("stress", layer, "distilled", backend, size,
                                errors_record(fused_errors(side_net, teacher, heldout, alphas_G)), extra))
    EVIDENCE.parent.mkdir(parents=True, exist_ok=True)
    with EVIDENCE.open("a") as out:
        for entry in rows:
            out.write(json.dumps(entry, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
