"""One forward pass feeds every hooked layer and stops after the last; shards resume where they stopped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sae_pipeline.activations.store import (
    SPLITS, append_shard, finish_stats, layer_dir, read_index,
)
from sae_pipeline.config import HarvestConfig
from sae_pipeline.corpus.build import iter_documents, render_document
from sae_pipeline.hashing import config_hash
from sae_pipeline.model.hooks import capture_outputs, run_until_captured

class CorpusTooSmallError(RuntimeError):
    pass


DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class HarvestResult(NamedTuple):
    root: Path
    layers: list[int]
    tokens_per_split: dict[str, int]
    tokens_per_second: float  # forward tokens (all positions) per second in this call; 0 when all was resumed
    shards_written: int  # in this call, over all layers; 0 when every shard already existed


def harvest_root(base: Path, model_hash: str, corpus_sha: str, config: HarvestConfig) -> Path:
    """Activations are keyed by what made them: model, corpus, and the harvest settings (less the layer list)."""
    settings = config.model_dump(exclude={"layers"})
    return base / f"{model_hash[:12]}_{corpus_sha[:12]}_{config_hash(settings)[:8]}"


def token_windows(corpus_dir: Path, tokenizer: PreTrainedTokenizerBase, context_len: int) -> Iterator[list[int]]:
    """The corpus as one stream (documents joined by EOS) cut into fixed windows."""
    buffer: list[int] = []
    for document in iter_documents(corpus_dir):
        buffer.extend(tokenizer(render_document(document, tokenizer), add_special_tokens=False).input_ids)
        buffer.append(tokenizer.eos_token_id)
        while len(buffer) >= context_len:
            yield buffer[:context_len]
            buffer = buffer[context_len:]
    raise CorpusTooSmallError(f"the corpus at {corpus_dir} ran out of text before the harvest's token budget; "
                              f"lower train_tokens/heldout_tokens or add corpus sources")


def _windows_needed(config: HarvestConfig) -> dict[str, tuple[int, int]]:
    """Per split: (windows per shard, number of shards). Token budgets round up to whole shards."""
    per_window = config.context_len - config.skip_positions
    per_shard = max(1, config.shard_tokens // per_window)
    budgets = {"train": config.train_tokens, "heldout": config.heldout_tokens}
    return {split: (per_shard, -(-budgets[split] // (per_shard * per_window))) for split in SPLITS}


def harvest(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, corpus_dir: Path, root: Path,
            layers: list[int], config: HarvestConfig) -> HarvestResult:
    root.mkdir(parents=True, exist_ok=True)
    plan = _windows_needed(config)
    store_dtype = DTYPES[config.store_dtype]
    device = next(model.parameters()).device
    windows = token_windows(corpus_dir, tokenizer, config.context_len)
    forward_tokens, forward_seconds, shards_written = 0, 0.0, 0
    for split in SPLITS:
        per_shard, n_shards = plan[split]
        done = {layer: len(read_index(layer_dir(root, layer))["shards"][split]) for layer in layers}
        start = min(done.values())
        for _ in range(start * per_shard):  # resume: skip windows of shards every layer already holds
            next(windows)
        bar = tqdm(total=n_shards * per_shard, initial=start * per_shard, desc=f"harvest {split} L{layers}",
                   unit="win")
        for shard in range(start, n_shards):
            todo = [layer for layer in layers if done[layer] <= shard]
            shard_windows = [next(windows) for _ in range(per_shard)]
            parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in todo}
            began = time.perf_counter()
            with torch.inference_mode(), capture_outputs(model, todo) as captured:
                for i in range(0, per_shard, config.batch_sequences):
                    batch = torch.tensor(shard_windows[i:i + config.batch_sequences], device=device)
                    run_until_captured(model, batch)
                    for layer in todo:
                        kept_BSD = captured[layer][:, config.skip_positions:]
                        parts[layer].append(kept_BSD.reshape(-1, kept_BSD.shape[-1]).cpu())
                    bar.update(batch.shape[0])
            forward_seconds += time.perf_counter() - began
            forward_tokens += per_shard * config.context_len
            for layer in todo:
                append_shard(layer_dir(root, layer), split, torch.cat(parts[layer]), store_dtype)
            shards_written += len(todo)
        bar.close()
    for layer in layers:
        finish_stats(layer_dir(root, layer))
    tokens = {split: plan[split][0] * plan[split][1] * (config.context_len - config.skip_positions) for split in SPLITS}
    return HarvestResult(root, layers, tokens, forward_tokens / forward_seconds if forward_seconds else 0.0,
                         shards_written)


def heldout_windows(corpus_dir: Path, tokenizer: PreTrainedTokenizerBase, config: HarvestConfig,
                    n_windows: int) -> torch.Tensor:
    """The first n token windows of the held-out split, re-derived from the corpus (same order as the harvest)."""
    plan = _windows_needed(config)
    skip = plan["train"][0] * plan["train"][1]
    n_windows = min(n_windows, plan["heldout"][0] * plan["heldout"][1])
    windows = token_windows(corpus_dir, tokenizer, config.context_len)
    for _ in range(skip):
        next(windows)
    return torch.tensor([next(windows) for _ in range(n_windows)])
