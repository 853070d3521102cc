"""Top-k SAE training, ours vs eai-sparsify and SAE Lens, on the same cached activations in one run.

Every arm trains a top-k SAE with the same dictionary size, k, batch and token budget on the same harvested
activations (the first --tokens of a layer's train split), then the same code measures held-out FVU and dead %
(latents that never fire on the held-out split). Each arm runs in its own process, so its peak memory (the peak
resident set while training, above the resident set with the data loaded; Linux's clear_refs resets the peak)
is its own. Peers run as their own trainers run them, at their defaults:
sparsify 1.3.3's SparseCoder with its SignSGD + schedule-free optimizer and learning rate (fp32 on a CPU; on a GPU
with bf16 autocast, as the issue's H100 reference was measured);
SAE Lens 6.54.12's TopKTrainingSAE with its trainer's Adam, lr 3e-4 and gradient clipping at 1 (fp32: its trainer's
autocast is off by default). Ours is the λ 0 (sparse-gradient) path, as the peers have no L1 term. The peers see the
same shuffled batches; ours draws its own per-epoch permutation of the same tokens. Each arm's modules are imported
before the clock and the memory peak start. Dead-latent revival is each library's default: ours uses AuxK and
resampling; sparsify's AuxK is off by default; SAE Lens's AuxK waits 1,000 steps for a latent to count as dead, more
than a short run takes.

    pip install -e '.[bench]'
    python benchmarks/bench_peers.py --layer 15 --tokens 524288
    # GPU, the issue's shapes (d 4096, 16,384 latents, k 32, batch 16,384) on synthetic sparse activations:
    python benchmarks/bench_peers.py --profile mistral-7b --synthetic --device cuda --tokens 2097152

On a GPU each arm first trains on 8 batches untimed (JIT compilation, such as sparsify's Triton kernels, and library
start-up stay out of the clock), the clock stops after a synchronize, and the peak is CUDA's peak allocation above
the data. The data sits on the GPU, so the figure is the trainer's, not the host-to-GPU copy's; the GPU-only arm
ours_host_data keeps it in host memory in bf16, as the SAE stage does, and its batches cross through the pinned
prefetch.

Writes artifacts/benchmarks/sae_peers_{profile}_{device}[_synthetic].json and prints a markdown table.
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

from sae_pipeline.activations.store import WhiteningStats, layer_dir, load_split, load_stats, newest_harvest
from sae_pipeline.config import artifacts_root, load_profile

ARMS = ("ours", "ours_fp32", "ours_host_data", "sparsify", "sae_lens")
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


def synthetic_activations(n_tokens: int, d_model: int, device: str, seed: int = 0, active: int = 32,
                          atoms_per_dim: int = 4) -> torch.Tensor:
    """Tokens made of `active` of d_model * atoms_per_dim random unit directions (exponential coefficients), plus
    an offset, per-dimension scales and a little noise: a dictionary an SAE can find, at any shape, no model."""
    shapes = torch.Generator().manual_seed(1234)  # the same dictionary for every split
    atoms_AD = torch.nn.functional.normalize(torch.randn(d_model * atoms_per_dim, d_model, generator=shapes), dim=1)
    offset_D, scale_D = torch.randn(d_model, generator=shapes), torch.rand(d_model, generator=shapes) + 0.5
    atoms_AD, offset_D, scale_D = atoms_AD.to(device), offset_D.to(device), scale_D.to(device)
    tokens = torch.Generator(device=device).manual_seed(seed)
    parts = []
    for start in range(0, n_tokens, 65_536):
        n = min(65_536, n_tokens - start)
        ids_NK = torch.randint(0, atoms_AD.shape[0], (n, active), generator=tokens, device=device)
        coef_NK = torch.empty(n, active, device=device).exponential_(generator=tokens)
        x_ND = torch.nn.functional.embedding_bag(ids_NK, atoms_AD, per_sample_weights=coef_NK, mode="sum")
        parts.append((x_ND + 0.05 * torch.randn(n, d_model, generator=tokens, device=device)) * scale_D + offset_D)
    return torch.cat(parts)


def train_ours(train_ND, stats, sae_cfg, bf16: bool, device: str | None = None) -> Reconstruct:
    from sae_pipeline.sae.train import train_sae

    cfg = sae_cfg.model_copy(update={"epochs": 1.0, "l1_coeff": 0.0, "bf16_autocast": bf16})
    return topk_reconstruct(train_sae(train_ND, stats, cfg, device=device).sae)


def train_ours_from_host(train_ND, stats, sae_cfg, bf16: bool) -> Reconstruct:
    """Ours as the SAE stage runs it on a GPU: activations in host memory in their store's bf16 (run_arm moved them
    there before the clock), batches reaching the GPU through the pinned prefetch."""
    return train_ours(train_ND, stats, sae_cfg, bf16, device="cuda")


def train_sparsify(train_ND, stats, sae_cfg, bf16: bool) -> Reconstruct:
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    sae = SparseCoder(train_ND.shape[1], SparseCoderConfig(num_latents=sae_cfg.n_latents, k=sae_cfg.k),
                      device=train_ND.device, dtype=torch.float32)
    # sparsify's trainer: signum default, lr 5e-3 / sqrt(latents / 2**14), schedule-free momentum 0.95
    optimizer = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(),
                                              "lr": 5e-3 / (sae.num_latents / 2 ** 14) ** 0.5}]), momentum=0.95)
    optimizer.train()
    for step, x_BD in enumerate(batches(train_ND, sae_cfg.batch_tokens)):
        if step == 0:  # the trainer starts the decoder bias at the first batch's mean
            sae.b_dec.data = x_BD.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        with torch.autocast(x_BD.device.type, dtype=torch.bfloat16, enabled=bf16):
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
                                                dtype="float32", device=str(train_ND.device)))
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))  # SAETrainer defaults
    steps_since_fired_F = torch.zeros(sae_cfg.n_latents, device=train_ND.device)
    coefficients = {name: getattr(value, "value", value) for name, value in sae.get_coefficients().items()}
    sae.train()
    for step, x_BD in enumerate(batches(train_ND, sae_cfg.batch_tokens)):
        with torch.autocast(x_BD.device.type, dtype=torch.bfloat16, enabled=bf16):
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


# arm -> (trainer, bf16 autocast on a CPU, on a GPU): each peer as its trainer runs there (sparsify's GPU figure in
# the issue was taken with bf16 autocast)
TRAINERS = {"ours": (train_ours, True, True), "ours_fp32": (train_ours, False, False),
            "ours_host_data": (train_ours_from_host, True, True),
            "sparsify": (train_sparsify, False, True), "sae_lens": (train_sae_lens, False, False)}
# imported before timing, so neither clock nor memory peak counts a library's import
MODULES = {"ours": ["sae_pipeline.sae.train"], "ours_fp32": ["sae_pipeline.sae.train"],
           "ours_host_data": ["sae_pipeline.sae.train"],
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
        fired_F[fired.cpu()] = True
    fvu = err / float((heldout_ND - heldout_ND.mean(0)).pow(2).sum())
    return {"fvu": fvu, "dead_fraction": float((~fired_F).float().mean())}


def load_data(args) -> tuple[torch.Tensor, torch.Tensor, WhiteningStats]:
    """(train, held-out) on args.device and whitening statistics (train_sae moves them where it trains): a harvested
    layer's, or synthetic at the profile's d_model."""
    if args.synthetic:
        d_model = load_profile(args.profile).d_model
        train_ND = synthetic_activations(args.tokens, d_model, args.device, seed=0)
        heldout_ND = synthetic_activations(65_536, d_model, args.device, seed=1)
        stats = WhiteningStats(train_ND.mean(0), train_ND.std(0), train_ND.shape[0])
        return train_ND, heldout_ND, stats
    directory = layer_dir(Path(args.activations), args.layer)
    return (load_split(directory, "train", args.tokens)[:args.tokens].to(args.device),
            load_split(directory, "heldout").to(args.device), load_stats(directory))


def _peak_start(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2 ** 20
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # the peak resident set restarts from the data-loaded process
    return _memory_kib()["VmRSS"] / 1024


def _peak_mib_over(start_mib: float, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2 ** 20 - start_mib
    return _memory_kib()["VmHWM"] / 1024 - start_mib


def run_arm(arm: str, args) -> dict:
    sae_cfg = load_profile(args.profile).sae
    train_ND, heldout_ND, stats = load_data(args)
    if arm == "ours_host_data":
        if args.device != "cuda":
            sys.exit("the ours_host_data arm copies host batches to a GPU: run it with --device cuda")
        train_ND = train_ND.to("cpu", torch.bfloat16)
    train, bf16_cpu, bf16_gpu = TRAINERS[arm]
    for module in MODULES[arm]:
        importlib.import_module(module)
    bf16 = bf16_gpu if args.device == "cuda" else bf16_cpu
    if args.device == "cuda":
        train(train_ND[:8 * sae_cfg.batch_tokens], stats, sae_cfg, bf16)
    start_mib = _peak_start(args.device)
    began = time.perf_counter()
    reconstruct = train(train_ND, stats, sae_cfg, bf16)
    peak_mib = _peak_mib_over(start_mib, args.device)  # synchronizes a GPU first
    seconds = time.perf_counter() - began
    trained = train_ND.shape[0] // sae_cfg.batch_tokens * sae_cfg.batch_tokens
    return {"arm": arm, "device": args.device, "tokens": trained, "seconds": seconds,
            "tokens_per_second": trained / seconds, "peak_mib_over_data": peak_mib,
            **heldout_quality(reconstruct, heldout_ND, sae_cfg.n_latents)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=524_288)
    parser.add_argument("--activations", default=None,
                        help="harvest root (default: the newest holding the layer with --tokens training tokens)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic activations at the profile's d_model")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--arms", nargs="+", default=[arm for arm in ARMS if arm != "ours_host_data"], choices=ARMS)
    parser.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # the child process's single arm
    args = parser.parse_args()
    if not args.synthetic and not args.activations:
        args.activations = str(newest_harvest(artifacts_root() / "activations", args.layer, args.tokens))
    if args.arm:
        print(json.dumps(run_arm(args.arm, args)))
        return
    rows = []
    for arm in args.arms:
        forwarded = [f"--{name}={value}" for name, value in (("profile", args.profile), ("layer", args.layer),
                     ("tokens", args.tokens), ("activations", args.activations), ("device", args.device))
                     if value is not None]
        child = subprocess.run([sys.executable, __file__, *forwarded, *(["--synthetic"] if args.synthetic else []),
                                "--arm", arm], capture_output=True, text=True)
        if child.returncode:
            sys.exit(f"arm {arm} failed:\n{child.stderr[-4000:]}")
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    ours = next((r for r in rows if r["arm"] == "ours"), None)
    data = "synthetic" if args.synthetic else f"layer {args.layer}"
    print(f"\n{data}, profile {args.profile}, {rows[0]['tokens']:,} tokens, {args.device}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}\n")
    print("| arm | tokens/s | ours / arm | peak MiB over data | held-out FVU | dead % |\n|---|---|---|---|---|---|")
    for row in rows:
        ratio = f"{ours['tokens_per_second'] / row['tokens_per_second']:.2f}x" if ours else ""
        print(f"| {row['arm']} | {row['tokens_per_second']:,.0f} | {ratio} | {row['peak_mib_over_data']:,.0f} | "
              f"{row['fvu']:.3f} | {100 * row['dead_fraction']:.2f} |")
    synthetic = "_synthetic" if args.synthetic else ""
    out = artifacts_root() / "benchmarks" / f"sae_peers_{args.profile}_{args.device}{synthetic}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"data": data, "profile": args.profile, "device": args.device, "tokens": args.tokens,
                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
