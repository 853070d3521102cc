"""Where an SAE training step spends its time: torch.profiler over a few steps of `train_sae`, by kernel.

Synthetic activations at a profile's d_model (bench_peers.synthetic_activations), the profile's dictionary, k and
batch, the bf16 autocast `bench_peers.py` times ours with. Prints the operators sorted by their own device time
(the kernels on a GPU, the ops on a CPU) and the step's wall time, so the table's shares can be read against the
throughput `bench_peers.py` reports; then each piece of a step timed alone, as it runs now and as it could. The
header line also holds a run's fixed cost (set-up, maintenance passes, fold) and, on a GPU, its host syncs by the
line that issued them.

    python benchmarks/profile_sae_step.py --profile mistral-7b --device cuda     # the device machine
    .venv/bin/python benchmarks/profile_sae_step.py --steps 4                     # embedded default, CPU
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench_peers import synthetic_activations  # the script directory is on sys.path
from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.config import load_profile
from sae_pipeline.sae.model import _latent_rows, _token_of_entry
from sae_pipeline.sae.train import train_sae


def _median_ms(fn, device: str, repeats: int = 10) -> float | str:
    try:
        fn()
    except (RuntimeError, NotImplementedError) as error:  # e.g. no bf16 CSR product on this device
        return f"unsupported: {str(error).splitlines()[0][:80]}"
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return round(1e3 * sorted(times)[len(times) // 2], 3)


def sync_census(run_steps) -> dict[str, int]:
    """Host syncs during run_steps() (CUDA's sync debug mode), by the innermost line of ours that issued them; a
    sync in a backward pass is re-raised at its `backward()` call."""
    where: Counter[str] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        ours = [frame for frame in traceback.extract_stack() if "sae_pipeline" in frame.filename]
        where[f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].line}" if ours else
              f"{filename}:{lineno}"] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_steps()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return dict(where.most_common())


def kernel_candidates(batch: int, d_model: int, n_latents: int, k: int, device: str) -> dict[str, float | str]:
    """ms per call of each piece of a step, as it runs now (fp32 sparse products) and as it could (bf16 sparse, or
    dense bf16 tensor-core products over the (B, F) codes): the measurements the next speed change rests on."""
    g = torch.Generator(device=device).manual_seed(0)
    x_BD = torch.randn(batch, d_model, device=device, generator=g)
    W_DF = torch.randn(d_model, n_latents, device=device, generator=g) / d_model ** 0.5
    W_FD = W_DF.T.contiguous()
    idx_BK = torch.rand(batch, n_latents, device=device, generator=g).topk(k, dim=-1).indices
    acts_BK = torch.rand(batch, k, device=device, generator=g)
    grad_BD = torch.randn(batch, d_model, device=device, generator=g)
    x16, W16_DF, W16_FD, acts16, grad16 = (t.bfloat16() for t in (x_BD, W_DF, W_FD, acts_BK, grad_BD))
    pre16_BF = x16 @ W16_DF
    codes16_BF = torch.zeros(batch, n_latents, device=device, dtype=torch.bfloat16).scatter_(1, idx_BK, acts16)
    starts = torch.arange(0, batch * k, k, device=device)
    tokens = _token_of_entry(idx_BK)
    fp = torch.nn.functional
    return {
        "encoder matmul bf16 (B,D)@(D,F)": _median_ms(lambda: x16 @ W16_DF, device),
        "top-k of (B,F) bf16": _median_ms(lambda: pre16_BF.topk(k, dim=-1, sorted=False), device),
        "W_enc cast fp32->bf16": _median_ms(lambda: W_DF.bfloat16(), device),
        "decode embedding_bag fp32": _median_ms(
            lambda: fp.embedding_bag(idx_BK, W_FD, per_sample_weights=acts_BK, mode="sum"), device),
        "decode embedding_bag bf16": _median_ms(
            lambda: fp.embedding_bag(idx_BK, W16_FD, per_sample_weights=acts16, mode="sum"), device),
        "decode dense bf16 (B,F)@(F,D), scatter included": _median_ms(
            lambda: torch.zeros(batch, n_latents, device=device, dtype=torch.bfloat16).scatter_(
                1, idx_BK, acts16) @ W16_FD, device),
        "grad acts per-sample backward fp32": _median_ms(
            lambda: torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_BD, W_FD, idx_BK.flatten(), starts, tokens, 0), device),
        "grad acts per-sample backward bf16": _median_ms(
            lambda: torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad16, W16_FD, idx_BK.flatten(), starts, tokens, 0), device),
        "grad rows CSR fp32 (F,B)@(B,D)": _median_ms(lambda: _latent_rows(idx_BK, acts_BK, grad_BD, n_latents),
                                                     device),
        "grad rows CSR bf16": _median_ms(lambda: _latent_rows(idx_BK, acts16, grad16, n_latents), device),
        "grad rows dense bf16 (F,B)@(B,D)": _median_ms(lambda: codes16_BF.T @ grad16, device),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--dead-window-tokens", type=int, default=None,
                        help="shorter than the profile's, so latents die and AuxK runs in the profiled steps")
    parser.add_argument("--out", default="artifacts/benchmarks/sae_step_profile.txt")
    args = parser.parse_args()
    settings = load_profile(args.profile)
    window = args.dead_window_tokens or settings.sae.dead_window_tokens
    cfg = settings.sae.model_copy(update={"epochs": 1.0, "l1_coeff": 0.0, "bf16_autocast": True,
                                          "dead_window_tokens": window})
    dead_fractions = []  # at each run's end: how much AuxK had to do
    train_ND = synthetic_activations(2 * args.steps * cfg.batch_tokens, settings.d_model, args.device)
    stats = WhiteningStats(train_ND.mean(0), train_ND.std(0), train_ND.shape[0])

    def run(steps: int, maintenance: bool = True) -> float:
        if args.device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        result = train_sae(train_ND[:steps * cfg.batch_tokens], stats,
                           cfg if maintenance else cfg.model_copy(update={"maintenance_at_fractions": []}))
        dead_fractions.append(result.history[-1]["dead_fraction"])
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - began

    run(args.steps)  # warm-up: kernels, cuBLAS and cuSPARSE handles, the allocator
    once_s = run(args.steps)
    # a step's time: the difference of two runs; the rest of a run is fixed (set-up, maintenance passes, fold)
    plain_s = (run(2 * args.steps) - once_s) / args.steps
    passes = len({round(fraction * args.steps) for fraction in cfg.maintenance_at_fractions})  # as train_sae counts
    maintenance_s = (once_s - run(args.steps, maintenance=False)) / max(1, passes)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as prof:
        profiled_s = run(args.steps) / args.steps
    sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60)
    header = {"profile": args.profile, "device": args.device, "d_model": train_ND.shape[1], "n_latents": cfg.n_latents,
              "k": cfg.k, "batch_tokens": cfg.batch_tokens, "steps": args.steps, "torch": torch.__version__,
              "step_ms": round(1e3 * plain_s, 2), "tokens_per_s": round(cfg.batch_tokens / plain_s),
              "step_ms_profiled_with_setup": round(1e3 * profiled_s, 2),
              "fixed_ms_per_run": round(1e3 * (once_s - args.steps * plain_s), 1),
              "maintenance_ms_each": round(1e3 * maintenance_s, 1), "dead_window_tokens": cfg.dead_window_tokens,
              "max_dead_fraction_at_a_runs_end": max(dead_fractions)}
    if args.device == "cuda":  # a step with no host sync lets the host queue the next while the GPU works
        header["host_syncs_in_a_run_of_steps"] = {"steps": args.steps, **sync_census(lambda: run(args.steps))}
    kernels = kernel_candidates(cfg.batch_tokens, train_ND.shape[1], cfg.n_latents, cfg.k, args.device)
    text = json.dumps(header) + "\n" + table + "\n" + "\n".join(
        f"{ms:9.3f} ms  {name}" if isinstance(ms, float) else f"{ms}  {name}" for name, ms in kernels.items())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
