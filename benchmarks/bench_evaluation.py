"""Evaluation harness benchmarks, in one run on one machine:

1. batched greedy decoding (the harness's batch size) vs one prompt at a time: generated tokens/s (ratio);
2. the harness's own cost (judges, redaction fingerprints, hashing, bootstrap) as a share of a full run;
3. the two refusal judges' throughput (replies/s), embedding vs prefix.

No generated text is written: only counts and seconds.

    python benchmarks/bench_evaluation.py [--profile smollm2] [--prompts 16] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.config import load_profile
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.determinism import deterministic
from sae_pipeline.evaluation.generation import chat_ids, generate_greedy
from sae_pipeline.evaluation.harness import evaluate
from sae_pipeline.evaluation.run import build_judges
from sae_pipeline.model.loading import load_model


def _generation_rate(loaded, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    with deterministic(0):
        began = time.perf_counter()
        generations = generate_greedy(loaded.model, loaded.tokenizer, prompts, max_new_tokens, batch_size, "bench")
        seconds = time.perf_counter() - began
    tokens = sum(len(g.token_ids) for g in generations)
    return tokens / seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", default="smollm2")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default="artifacts/benchmarks/evaluation.json")
    args = parser.parse_args()
    profile = load_profile(args.profile)
    cfg = profile.evaluation
    loaded = load_model(profile.model, dtype=getattr(torch, cfg.model_dtype))
    sets = load_prompt_sets()
    benign = [r for r in sets.benign if r.split == "heldout"][: args.prompts]
    prompts = [chat_ids(loaded.tokenizer, r.prompt) for r in benign]

    batched, batched_tokens = _generation_rate(loaded, prompts, args.max_new_tokens, cfg.batch_size)
    single, single_tokens = _generation_rate(loaded, prompts, args.max_new_tokens, 1)

    judges, _ = build_judges(sets)
    replies = [e.text for e in sets.judge_labelled]
    rates = {}
    for judge in (judges.refusal, judges.reference):
        began = time.perf_counter()
        judge.refusal_probability(replies)
        rates[judge.name] = len(replies) / (time.perf_counter() - began)

    smoke = cfg.model_copy(update={"limit_per_group": 2, "benign_max_new_tokens": args.max_new_tokens,
                                   "capability_max_new_tokens": args.max_new_tokens})
    with tempfile.TemporaryDirectory() as tmp:
        result = evaluate(loaded, sets, judges, smoke, Path(tmp))
    generated = sum(result.metrics["throughput"]["generated_tokens"].values())
    decode_only = generated / batched  # seconds the same tokens take in bare batched decoding
    report = {
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "model": loaded.name, "dtype": cfg.model_dtype, "prompts": len(prompts),
        "max_new_tokens": args.max_new_tokens,
        "generation_tokens_per_s": {"batched": round(batched, 1), "batch_1": round(single, 1),
                                    "ratio": round(batched / single, 2)},
        "identical_token_counts": batched_tokens == single_tokens,  # bf16 padding shifts numerics a little
        "judge_replies_per_s": {k: round(v, 1) for k, v in rates.items()},
        "harness_smoke": {"wall_seconds": result.timing["wall_seconds"], "generated_tokens": generated,
                          "decode_share": round(decode_only / result.timing["wall_seconds"], 3)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
