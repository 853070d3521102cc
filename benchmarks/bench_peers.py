"""Top-k SAE training, ours vs eai-sparsify and SAE Lens, on the same cached activations in one run.

Every arm trains a top-k SAE with the same dictionary size, k, batch and token budget on the same harvested
activations (the first --tokens of a layer's train split), then the same code measures held-out FVU and dead %
(latents that never fire on the held-out split). Each arm runs in its own process, so its peak memory (the peak
resident set while training, above the resident set with the data loaded; Linux's clear_refs resets the peak)
is its own. Peers run as their own trainers run them on a CPU, at their defaults:
sparsify 1.3.3's SparseCoder with its SignSGD + schedule-free optimizer and learning rate (fp32, no autocast);
SAE Lens 6.54.12's TopKTrainingSAE with its trainer's Adam, lr 3e-4 and gradient clipping at 1. The peers see the
same shuffled batches; ours draws its own per-epoch permutation of the same tokens. Each arm's modules are imported
before the clock and the memory peak start. Dead-latent revival is each library's default: ours uses AuxK and
resampling; sparsify's AuxK is off by default; SAE Lens's AuxK waits 1,000 steps for a latent to count as dead, more
than a short run takes.

    pip install -e '.[bench]'
    python benchmarks/bench_peers.py --layer 15 --tokens 524288

Writes artifacts/benchmarks/sae_peers.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sae_pipeline.activations.store import layer_dir, load_split, load_stats, newest_harvest
from sae_pipeline.config import artifacts_root, load_profile

ARMS = ("ours", "ours_fp32", "sparsify", "sae_lens")
# reconstruct(x_BD) -> (recon_BD, indices of the latents that fired, flattened)
Reconstruct = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def batches(train_ND: torch.Tensor, batch_tokens: int, seed: int = 0):
    """The same shuffled batches, in the same order, for every peer arm."""
    order = torch.randperm(train_ND.shape[0], generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(order) - batch_tokens + 1, batch_tokens):
        yield train_ND[order[start:start + batch_tokens]]


def topk_reconstruct(sae) -> Reconstruct:
    """Ours and sparsify's SAE share the interface: encode -> (top_acts, top_indices, ...), decode(acts, indices)."""
    def reconstruct(x_BD):
        codes = sae.encode(x_BD)
        return sae.decode(codes.top_acts, codes.top_indices), codes.top_indices[codes.top_acts > 0]
    return reconstruct


def train_ours(train_ND, stats, sae_cfg, bf16: bool) -> Reconstruct:
    from sae_pipeline.sae.train import train_sae

    cfg = sae_cfg.model_copy(update={"epochs": 1.0, "l1_coeff": 0.0, "bf16_autocast": bf16})
    return topk_reconstruct(train_sae(train_ND, stats, cfg).sae)


def train_sparsify(train_ND, stats, sae_cfg, bf16: bool) -> Reconstruct:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(train_ND.shape[1], SparseCoderConfig(num_latents=sae_cfg.n_latents, k=sae_cfg.k),
                      device="cpu", dtype=torch.float32)
    # sparsify's trainer: signum default, lr 5e-3 / sqrt(latents / 2**14), schedule-free momentum 0.95
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(),
                                              "lr": 5e-3 / (sae.num_latents / 2 ** 14) ** 0.5}]), momentum=0.95)
    optimizer.train()
    for step, x_BD in enumerate(batches(train_ND, sae_cfg.batch_tokens)):
        if step == 0:  # the trainer starts the decoder bias at the first batch's mean
            sae.b_dec.data = x_BD.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x_BD)
        out.fvu.backward()  # auxk_alpha defaults to 0 in sparsify's TrainConfig
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()
    optimizer.eval()  # schedule-free: evaluate the averaged weights, as the trainer does before saving
    return topk_reconstruct(sae)


def train_sae_lens(train_ND, stats, sae_cfg, bf16: bool) -> Reconstruct:
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=train_ND.shape[1], d_sae=sae_cfg.n_latents, k=sae_cfg.k,
                                                dtype="float32", device="cpu"))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))  # SAETrainer defaults
    steps_since_fired_F = torch.zeros(sae_cfg.n_latents)
    coefficients = {name: getattr(value, "value", value) for name, value in sae.get_coefficients().items()}
    sae.train()
    for step, x_BD in enumerate(batches(train_ND, sae_cfg.batch_tokens)):
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=x_BD, coefficients=coefficients, dead_neuron_mask=(steps_since_fired_F > 1000).bool(),
            n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            steps_since_fired_F += 1
            steps_since_fired_F[out.feature_acts.bool().any(0)] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    sae.eval()

    def reconstruct(x_BD):
        acts_BF = sae.encode(x_BD)
        return sae.decode(acts_BF), torch.nonzero(acts_BF > 0)[:, 1]
    return reconstruct


TRAINERS = {"ours": (train_ours, True), "ours_fp32": (train_ours, False), "sparsify": (train_sparsify, False),
            "sae_lens": (train_sae_lens, False)}
# imported before timing, so neither clock nor memory peak counts a library's import
MODULES = {"ours": ["sae_pipeline.sae.train"], "ours_fp32": ["sae_pipeline.sae.train"],
           "sparsify": ["sparsify", "sparsify.sign_sgd", "schedulefree"],
           "sae_lens": ["sae_lens.saes.sae", "sae_lens.saes.topk_sae"]}


def _memory_kib() -> dict[str, int]:
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmHWM", "VmRSS"))}


@torch.no_grad()
def heldout_quality(reconstruct: Reconstruct, heldout_ND: torch.Tensor, n_latents: int) -> dict:
    err, fired_F = 0.0, torch.zeros(n_latents, dtype=torch.bool)
    for start in range(0, heldout_ND.shape[0], 4096):
        x_BD = heldout_ND[start:start + 4096]
        recon_BD, fired = reconstruct(x_BD)
        err += float((recon_BD.float() - x_BD).pow(2).sum())
        fired_F[fired] = True
    fvu = err / float((heldout_ND - heldout_ND.mean(0)).pow(2).sum())
    return {"fvu": fvu, "dead_fraction": float((~fired_F).float().mean())}


def run_arm(arm: str, directory: Path, tokens: int, profile_name: str) -> dict:
    sae_cfg = load_profile(profile_name).sae
    train_ND = load_split(directory, "train", tokens)[:tokens]
    heldout_ND, stats = load_split(directory, "heldout"), load_stats(directory)
    train, bf16 = TRAINERS[arm]
    for module in MODULES[arm]:
        importlib.import_module(module)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak resident set restarts from the data-loaded process
    rss_before = _memory_kib()["VmRSS"]
    began = time.perf_counter()
    reconstruct = train(train_ND, stats, sae_cfg, bf16)
    seconds = time.perf_counter() - began
    peak_mib = (_memory_kib()["VmHWM"] - rss_before) / 1024
    trained = train_ND.shape[0] // sae_cfg.batch_tokens * sae_cfg.batch_tokens
    return {"arm": arm, "tokens": trained, "seconds": seconds, "tokens_per_second": trained / seconds,
            "peak_mib_over_data": peak_mib, **heldout_quality(reconstruct, heldout_ND, sae_cfg.n_latents)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=524_288)
    parser.add_argument("--activations", default=None, help="harvest root (default: the newest holding the layer)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # the child process's single arm
    args = parser.parse_args()
    root = Path(args.activations) if args.activations else newest_harvest(artifacts_root() / "activations", args.layer)
    directory = layer_dir(root, args.layer)
    if args.arm:
        print(json.dumps(run_arm(args.arm, directory, args.tokens, args.profile)))
        return
    rows = []
    for arm in args.arms:
        child = subprocess.run([sys.executable, __file__, "--profile", args.profile, "--layer", str(args.layer),
                                "--tokens", str(args.tokens), "--activations", str(root), "--arm", arm],
                               capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"arm {arm} failed:\n{child.stderr[-4000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    ours = next((r for r in rows if r["arm"] == "ours"), None)
    print(f"\nlayer {args.layer}, {rows[0]['tokens']:,} tokens, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| arm | tokens/s | ours / arm | peak MiB over data | held-out FVU | dead % |\n|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{ours['tokens_per_second'] / row['tokens_per_second']:.2f}x" if ours else ""
        print(f"| {row['arm']} | {row['tokens_per_second']:,.0f} | {ratio} | {row['peak_mib_over_data']:,.0f} | "
              f"{row['fvu']:.3f} | {100 * row['dead_fraction']:.2f} |")
    out = artifacts_root() / "benchmarks" / "sae_peers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"layer": args.layer, "tokens": args.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
