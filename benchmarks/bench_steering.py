"""Steering overhead, in one run: greedy decode tokens/s with the steering hooks attached vs without.

The arms alternate round by round (sae_pipeline.steering.overhead), so drift in machine speed hits both alike; the
reported overhead is the ratio of the medians. Hooks: n features at each of the given layers, feature mode
(alpha 0.6) plus the conditional refusal mode (beta 1.0) - the most work the runtime does per token. With
--behaviors B, each layer instead holds B behaviours' features as one grouped sidecar (apply_behaviors' runtime:
each group fires and steers on its own, alpha 0.6 each), and the last layer the per-behaviour refusal mode (a probe
gate on the first layer's residual summary, a router over the B behaviours, the refusal vector at the routed
behaviour's strength). With --peer, a third arm applies one vector per hooked layer's MLP output, unconditionally,
with the `steering-vectors` library (0.12.2; `pip install --no-deps steering-vectors==0.12.2 scikit-learn`, since
it caps transformers below 5): the cheapest thing a steering library does, against our gated runtime.
Beside the throughput ratio (resolved only to about a percent on shared CPU cores), the hooks alone are timed per
decode token on the prompt's real MLP outputs (`hook_latencies`), and their p50 is given as a share of the unsteered
decode step: the overhead the hooks add, at a resolution the throughput cannot reach.

    python benchmarks/bench_steering.py                          # embedded SmolLM2 on the CPU
    python benchmarks/bench_steering.py --mistral-shaped --device cuda --context 2048   # needs a GPU
    python benchmarks/bench_steering.py --behaviors 6 --out artifacts/benchmarks/behaviors.json
    python benchmarks/bench_steering.py --peer --rounds 8        # ours vs steering-vectors, CPU
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import replace
from pathlib import Path

import torch

from sae_pipeline.model.loading import load_model
from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.steering.overhead import decode_rates, hook_latencies
from sae_pipeline.steering.runtime import CategoryRouter, FeatureGroups, LayerSteering, ProbeGate, patched
from sae_pipeline.steering.sidecar import DenseSidecar


def mistral_shaped(device: str) -> torch.nn.Module:
    """Mistral-7B's shapes with random bf16 weights: true timings without the weights."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=32000, max_position_embeddings=32768)
    with torch.device(device):
        return MistralForCausalLM(config).to(torch.bfloat16).eval()


def random_layers(d_model: int, layers: list[int], n_features: int, behaviors: int = 0, seed: int = 0
                  ) -> dict[int, LayerSteering]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for layer in layers:
        rows = n_features * max(behaviors, 1)
        directions = torch.nn.functional.normalize(torch.randn(rows, d_model, generator=generator), dim=-1)
        sidecar = DenseSidecar(directions, directions.clone(), torch.zeros(rows))
        if behaviors:
            names = {f"behavior_{i}": n_features for i in range(behaviors)}
            out[layer] = LayerSteering(sidecar, alpha=1.0, groups=FeatureGroups.of(names, dict.fromkeys(names, 0.6)))
            if layer == layers[-1] and len(layers) > 1:
                read = (layers[0],)
                gate = ProbeGate(torch.randn(2 * d_model, generator=generator), 0.0, read)
                router = CategoryRouter(tuple(names), torch.randn(2 * d_model, behaviors, generator=generator),
                                        torch.zeros(behaviors), read)
                out[layer] = replace(out[layer], refusal_D=torch.randn(d_model, generator=generator) * 0.01, beta=1.0,
                                     gate=gate, router=router, route_scale_C=torch.full((behaviors,), 0.8))
        else:
            out[layer] = LayerSteering(sidecar, alpha=0.6, beta=1.0,
                                       refusal_D=torch.randn(d_model, generator=generator) * 0.01)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mistral-shaped", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--behaviors", type=int, default=0, help="grouped behaviours per layer (0: single basis)")
    parser.add_argument("--layers", default=None, help="comma list; default 9,11,15,17,19 (SmolLM2) or "
                                                       "10,12,16,18,20 (Mistral-shaped)")
    parser.add_argument("--peer", action="store_true", help="add a steering-vectors arm (same layers, one vector each)")
    parser.add_argument("--out", default="artifacts/benchmarks/steering.json")
    args = parser.parse_args()
    if args.mistral_shaped:
        model, d_model, default_layers, name = mistral_shaped(args.device), 4096, "10,12,16,18,20", "mistral-shaped"
    else:
        loaded = load_model(None, dtype=torch.bfloat16, device=args.device)
        model, d_model, default_layers, name = loaded.model, 576, "9,11,15,17,19", loaded.name
    layers = [int(x) for x in (args.layers or default_layers).split(",")]
    input_ids = torch.randint(10, 1000, (1, args.context), generator=torch.Generator().manual_seed(0)).to(args.device)
    steering = random_layers(d_model, layers, args.features, args.behaviors)
    arms = {"unsteered": None, "steered": (steering, 1)}
    if input_ids.is_cuda:  # the decode steps' CUDA graphs (the default there) against eager hooks
        arms["steered_eager"] = lambda: patched(model, steering, 1, cuda_graphs=False)
    if args.peer:
        from steering_vectors import SteeringVector

        vectors = {layer: steering[layer].refusal_D if steering[layer].refusal_D is not None
                   else steering[layer].sidecar.A_sel_ND[0] for layer in layers}
        peer = SteeringVector({layer: v.to(args.device, torch.bfloat16) for layer, v in vectors.items()}, "mlp")
        arms["steering_vectors"] = lambda: peer.apply(model)
        with torch.inference_mode():  # the peer arm must really steer, or its timing means nothing
            clean = model(input_ids).logits
            with peer.apply(model):
                if torch.equal(clean, model(input_ids).logits):
                    raise SystemExit("steering-vectors left the logits unchanged: its layer matching missed the model")
    rates = decode_rates(model, [input_ids], arms, args.new_tokens, args.rounds)
    medians = {arm: statistics.median(values) for arm, values in rates.items()}
    acts = {layer: out[0] for layer, out in layer_outputs(model, input_ids, layers).items()}
    hook_s = {"steered": hook_latencies(model, input_ids, steering, 1, acts)}
    if input_ids.is_cuda:
        hook_s["steered_eager"] = hook_latencies(model, input_ids, steering, 1, acts, cuda_graphs=False)
    hook_p50 = {arm: statistics.median(s) for arm, s in hook_s.items()}
    report = {"model": name, "device": args.device, "threads": torch.get_num_threads(), "context": args.context,
              "new_tokens": args.new_tokens, "layers": layers, "features_per_layer": args.features,
              "behaviors_per_layer": args.behaviors,
              "tokens_per_s_median": {k: round(v, 2) for k, v in medians.items()},
              "tokens_per_s_rounds": {k: [round(x, 2) for x in v] for k, v in rates.items()},
              "overhead": {arm: round(1 - medians[arm] / medians["unsteered"], 4) for arm in medians
                           if arm != "unsteered"},
              "hook_us_per_token": {arm: {"p50": round(1e6 * hook_p50[arm], 1),
                                          "p95": round(1e6 * statistics.quantiles(s, n=20)[-1], 1)}
                                    for arm, s in hook_s.items()},
              "hook_share_of_decode_step": {arm: round(p50 * medians["unsteered"], 4)
                                            for arm, p50 in hook_p50.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
