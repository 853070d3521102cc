"""Foundation benchmarks, in one run on one machine:

1. activation harvest tokens/s vs a bare forward truncated at the same last layer (ratio; goal >= 0.9);
2. SAE training tokens/s (bf16 autocast vs fp32 master-only), same shapes as the profile;
3. prompt activations (what the feature scores, the screen's sigmas and the behaviour layer probes pool): the
   batched user-token capture vs one prompt per forward, prompts/s on the tuning prompts (ratio).

    python benchmarks/bench_foundation.py [--profile smollm2] [--windows 64] [--train-tokens 65536] [--prompts 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import torch

from sae_pipeline.activations.harvest import harvest, token_windows
from sae_pipeline.activations.store import WhiteningStats
from sae_pipeline.config import load_profile
from sae_pipeline.corpus.build import build_corpus
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.generation import chat_ids, user_token_span
from sae_pipeline.features.scoring import user_token_outputs
from sae_pipeline.layout import corpus_dir
from sae_pipeline.model.hooks import decoder_layers, layer_outputs
from sae_pipeline.model.loading import load_model
from sae_pipeline.sae.train import train_sae


def bare_forward_seconds(model, batches: list[torch.Tensor], last_layer: int) -> float:
    """A forward that simply has no layers past the last hooked one: the floor a harvest can reach."""
    layers = decoder_layers(model)
    kept = layers[: last_layer + 1]
    original = list(layers)
    layers._modules.clear()
    for i, layer in enumerate(kept):
        layers._modules[str(i)] = layer
    try:
        began = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model.model(input_ids=batch, use_cache=False)
        return time.perf_counter() - began
    finally:
        layers._modules.clear()
        for i, layer in enumerate(original):
            layers._modules[str(i)] = layer


def prompt_capture_rates(loaded, prompts: list[str], layer: int, batch_size: int) -> dict[str, float]:
    """Prompts/s: one forward per prompt (the capture before batching) against `user_token_outputs`."""
    began = time.perf_counter()
    for prompt in prompts:
        start, end = user_token_span(loaded.tokenizer, prompt)
        ids = torch.tensor([chat_ids(loaded.tokenizer, prompt)])
        layer_outputs(loaded.model, ids, [layer])[layer][0, max(start, 1):end]
    single = len(prompts) / (time.perf_counter() - began)
    began = time.perf_counter()
    for _ in user_token_outputs(loaded.model, loaded.tokenizer, prompts, [layer], batch_size):
        pass
    batched = len(prompts) / (time.perf_counter() - began)
    return {"one_per_forward": single, "batched": batched, "batched_over_one": batched / single}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--train-tokens", type=int, default=65_536)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--out", default="artifacts/benchmarks/foundation.json")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    dtype = torch.bfloat16 if profile.harvest.model_dtype == "bfloat16" else torch.float32
    loaded = load_model(profile.model, dtype=dtype)
    if not (corpus_dir(profile) / "manifest.json").exists():
        build_corpus(profile.corpus, corpus_dir(profile), loaded.tokenizer, loaded.tokenizer_hash)
    per_window = profile.harvest.context_len - profile.harvest.skip_positions
    split_tokens = args.windows * per_window  # each split is then one shard of `windows` windows
    cfg = profile.harvest.model_copy(update={"train_tokens": split_tokens, "heldout_tokens": split_tokens,
                                             "shard_tokens": split_tokens})
    windows = token_windows(corpus_dir(profile), loaded.tokenizer, cfg.context_len)
    n = args.windows
    batches = [torch.tensor([next(windows) for _ in range(min(cfg.batch_sequences, n - i))])
               for i in range(0, n, cfg.batch_sequences)]
    forward_tokens = n * cfg.context_len
    bare = bare_forward_seconds(loaded.model, batches, max(cfg.layers))
    scratch = Path(args.out).parent / "harvest_scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    began = time.perf_counter()
    harvest(loaded.model, loaded.tokenizer, corpus_dir(profile), scratch, cfg.layers, cfg)
    harvest_seconds = time.perf_counter() - began
    shutil.rmtree(scratch, ignore_errors=True)
    harvest_tokens = 2 * forward_tokens  # train and held-out splits
    acts = torch.randn(args.train_tokens, profile.d_model)
    stats = WhiteningStats(acts.mean(0), acts.std(0), args.train_tokens)
    train = {}
    for name, bf16 in (("bf16_autocast", True), ("fp32", False)):
        sae_cfg = profile.sae.model_copy(update={"epochs": 1.0, "bf16_autocast": bf16, "maintenance_at_fractions": []})
        train[name] = train_sae(acts, stats, sae_cfg).tokens_per_second
    sets = load_prompt_sets()
    tuning = [r.prompt for r in sets.harmful + sets.benign if r.split == profile.features.split]
    tuning = tuning[::max(1, len(tuning) // args.prompts)][:args.prompts]  # every length the set holds
    captures = prompt_capture_rates(loaded, tuning, max(cfg.layers), profile.features.batch_size)
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "profile": profile.name, "layers": cfg.layers,
        "bare_forward_tokens_per_s": forward_tokens / bare,
        "harvest_tokens_per_s": harvest_tokens / harvest_seconds,
        "harvest_over_bare": (harvest_tokens / harvest_seconds) / (forward_tokens / bare),
        "sae_train_tokens_per_s": train,
        "sae_shape": {"d_model": profile.d_model, "n_latents": profile.sae.n_latents, "k": profile.sae.k,
                      "batch_tokens": profile.sae.batch_tokens},
        "prompt_activations_per_s": {**captures, "prompts": len(tuning), "layer": max(cfg.layers),
                                     "batch_size": profile.features.batch_size},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
