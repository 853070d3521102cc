"""Fused side-nets against the sidecars they distil, in one run: per-token hook latency (p50/p95, every hooked layer
together) and greedy decode tokens/s, for unsteered, the sidecar ensemble, and the fused nets in PyTorch, ONNX
Runtime (float) and INT8.

Two workloads. `--release DIR` (default artifacts/fused/release when it exists): the evaluated fused release and
the behaviour release it carries, as apply_fused_behaviors and apply_behaviors apply them. `--synthetic`: a stress
case, six behaviours x 8 features at each of five layers as grouped sidecars plus the per-behaviour refusal mode,
each layer's net folded from its sidecar (whitened with, and INT8-calibrated on, the model's own MLP outputs).
Decode arms rotate per prompt and round (`steering.overhead.decode_rates`); hook latency calls each layer's hook on
real MLP outputs, one token at a time, after a prefill (`steering.overhead.hook_latencies`).

    python benchmarks/bench_fused.py                                    # the release, embedded SmolLM2, CPU
    python benchmarks/bench_fused.py --synthetic
    python benchmarks/bench_fused.py --synthetic --mistral-shaped --device cuda --context 2048   # needs a GPU
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench_steering import mistral_shaped, random_layers  # the script directory is on sys.path
from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.fused.data import CALIBRATION_BATCH
from sae_pipeline.fused.export import save_int8, save_onnx
from sae_pipeline.fused.net import FusedNet, save_fused
from sae_pipeline.fused.release import backend_file, fused_layers, read_fused_release
from sae_pipeline.fused.runtime import release_layers, release_nets
from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.model.loading import load_model
from sae_pipeline.steering.behaviors import behavior_layers
from sae_pipeline.steering.overhead import decode_rates, hook_latencies
from sae_pipeline.steering.runtime import LayerSteering

BACKENDS = ("torch", "onnx", "int8")


def synthetic_nets(steering: dict[int, LayerSteering], acts_by_layer: dict[int, torch.Tensor], directory: Path,
                   scheme: str) -> dict[str, dict[int, Path]]:
    """Each layer's grouped sidecar folded into a net, saved as PyTorch, ONNX and INT8 (calibrated on the
    layer's activations with every behaviour on): backend -> layer -> file."""
    files: dict[str, dict[int, Path]] = {backend: {} for backend in BACKENDS}
    for layer, cfg in steering.items():
        acts = acts_by_layer[layer]
        stats = WhiteningStats(acts.mean(0), acts.std(0).clamp(min=1e-6), len(acts))
        sizes = {name: int(n) for name, n in zip(cfg.groups.names, cfg.groups.member_NG.sum(0).tolist())}
        net = FusedNet.from_sidecar(cfg.sidecar, sizes, stats)
        files["torch"][layer] = directory / backend_file(layer, "torch")
        files["onnx"][layer] = directory / backend_file(layer, "onnx")
        files["int8"][layer] = directory / backend_file(layer, "int8")
        save_fused(net, files["torch"][layer])
        save_onnx(net, files["onnx"][layer])
        feeds = [(acts[i:i + CALIBRATION_BATCH], cfg.groups.alpha_G) for i in range(0, len(acts), CALIBRATION_BATCH)]
        save_int8(files["onnx"][layer], files["int8"][layer], feeds, directory / f"calibration_l{layer}.json", scheme)
    return files


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--release", default="artifacts/fused/release")
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--mistral-shaped", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--latency-tokens", type=int, default=256)
    parser.add_argument("--int8-scheme", default="a16w8_decoder")
    parser.add_argument("--out", default="artifacts/benchmarks/fused.json")
    args = parser.parse_args()
    if args.mistral_shaped:
        model, d_model, layers, name = mistral_shaped(args.device), 4096, [10, 12, 16, 18, 20], "mistral-shaped"
    else:
        loaded = load_model(None, dtype=torch.bfloat16, device=args.device)
        model, d_model, layers, name = loaded.model, 576, [9, 11, 15, 17, 19], loaded.name
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(10, 1000, (1, args.context), generator=generator).to(device)
    text_ids = torch.randint(10, 1000, (4, max(args.latency_tokens // 4, 16)), generator=generator).to(device)
    acts = {layer: out.flatten(0, 1).float().cpu() for layer, out in layer_outputs(model, text_ids, layers).items()}
    with tempfile.TemporaryDirectory() as tmp:
        if args.synthetic:
            sidecars, gate_skip = random_layers(d_model, layers, 8, behaviors=6), 1
            files = synthetic_nets(sidecars, acts, Path(tmp), args.int8_scheme)
            fused = {backend: fused_layers(sidecars, release_nets(files[backend], device)) for backend in BACKENDS}
            workload = f"synthetic: 6 behaviours x 8 features at layers {layers}, per-behaviour refusal mode"
        else:
            directory = Path(args.release)
            releases = {backend: read_fused_release(directory, backend, accept_failed_gates=True)
                        for backend in BACKENDS}
            sidecars, gate_skip = behavior_layers(releases["torch"].behaviors)
            fused = {backend: release_layers(release, device)[0] for backend, release in releases.items()}
            workload = f"the fused release in {directory} (feature layers {sorted(releases['torch'].files)}, " \
                       f"hooks at {sorted(sidecars)})"
        arms = {"unsteered": None, "sidecars": (sidecars, gate_skip),
                **{f"fused_{backend}": (layers_, gate_skip) for backend, layers_ in fused.items()}}
        rates = decode_rates(model, [input_ids], arms, args.new_tokens, args.rounds)
        acts_device = {layer: a.to(device, torch.bfloat16) for layer, a in acts.items()}
        latency = {arm: hook_latencies(model, input_ids, *steering, acts_device)
                   for arm, steering in arms.items() if steering is not None}
    medians = {arm: statistics.median(values) for arm, values in rates.items()}

    def quantile(values: list[float], q: float) -> float:
        return float(torch.tensor(values).quantile(q))

    report = {
        "model": name, "device": args.device, "threads": torch.get_num_threads(), "context": args.context,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "workload": workload,
        "int8_scheme": args.int8_scheme if args.synthetic else "as released",
        "onnx_providers": sorted({provider for cfg in fused["onnx"].values() if cfg.fused is not None
                                  for provider in cfg.fused.providers}),
        "tokens_per_s_median": {arm: round(v, 2) for arm, v in medians.items()},
        "throughput_overhead": {arm: round(1 - v / medians["unsteered"], 4) for arm, v in medians.items()},
        "hook_ms_per_token": {arm: {"p50": round(1e3 * quantile(v, 0.5), 4), "p95": round(1e3 * quantile(v, 0.95), 4)}
                              for arm, v in latency.items()},
        "tokens_per_s_rounds": {arm: [round(x, 2) for x in v] for arm, v in rates.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "tokens_per_s_rounds"}, indent=2))


if __name__ == "__main__":
    main()
