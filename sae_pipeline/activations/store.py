"""Activation shards on disk: safetensors per shard, an index with sha256 per shard, whitening statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_pipeline.hashing import file_sha256

INDEX_FILE = "index.json"
STATS_FILE = "stats.safetensors"
SPLITS = ("train", "heldout")


class ShardError(RuntimeError):
    """A shard is missing, unreadable or does not match its recorded sha256."""


class WhiteningStats(NamedTuple):
    mean_D: torch.Tensor
    std_D: torch.Tensor
    n_tokens: int


def layer_dir(root: Path, layer: int) -> Path:
    return root / f"layer_{layer:02d}"


def newest_harvest(base: Path, layer: int, min_train_tokens: int = 0) -> Path:
    """The most recently written harvest root under `base` that holds `layer` with at least min_train_tokens
    training tokens (the benchmarks' default: a smaller harvest written later must not stand in for the one a
    benchmark's token budget needs)."""
    roots = sorted((r for r in base.glob("*") if layer_dir(r, layer).exists()
                    and read_index(layer_dir(r, layer))["n_train_tokens"] >= min_train_tokens),
                   key=lambda r: r.stat().st_mtime)
    if not roots:
        raise ShardError(f"no harvested activations for layer {layer} with >= {min_train_tokens:,} training tokens "
                         f"under {base}: materialise `activations` first")
    return roots[-1]


def read_index(directory: Path) -> dict:
    path = directory / INDEX_FILE
    if not path.exists():
        return {"shards": {split: [] for split in SPLITS}, "sum_D": None, "sumsq_D": None, "n_train_tokens": 0}
    return json.loads(path.read_text())


def write_index(directory: Path, index: dict) -> None:
    tmp = directory / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index))
    tmp.replace(directory / INDEX_FILE)


def append_shard(directory: Path, split: str, acts_ND: torch.Tensor, store_dtype: torch.dtype) -> None:
    """Write one shard atomically, then record it (and, for train, its moments) in the index."""
    directory.mkdir(parents=True, exist_ok=True)
    index = read_index(directory)
    number = len(index["shards"][split])
    name = f"{split}_{number:05d}.safetensors"
    tmp = directory / (name + ".tmp")
    save_file({"acts_ND": acts_ND.to(store_dtype).contiguous()}, str(tmp))
    tmp.replace(directory / name)
    index["shards"][split].append({"file": name, "n_tokens": int(acts_ND.shape[0]),
                                   "sha256": file_sha256(directory / name)})
    if split == "train":
        acts64 = acts_ND.to(torch.float64)
        sums, sumsqs = acts64.sum(0), (acts64 * acts64).sum(0)
        if index["sum_D"] is not None:
            sums += torch.tensor(index["sum_D"], dtype=torch.float64)
            sumsqs += torch.tensor(index["sumsq_D"], dtype=torch.float64)
        index["sum_D"], index["sumsq_D"] = sums.tolist(), sumsqs.tolist()
        index["n_train_tokens"] += int(acts_ND.shape[0])
    write_index(directory, index)


def finish_stats(directory: Path) -> WhiteningStats:
    index = read_index(directory)
    n = index["n_train_tokens"]
    if n == 0:
        raise ShardError(f"{directory} has no train shards to compute whitening statistics from")
    mean = torch.tensor(index["sum_D"], dtype=torch.float64) / n
    var = torch.tensor(index["sumsq_D"], dtype=torch.float64) / n - mean * mean
    stats = WhiteningStats(mean.float(), var.clamp_min(1e-12).sqrt().float(), n)
    save_file({"mean_D": stats.mean_D, "std_D": stats.std_D,
               "n_tokens": torch.tensor([n], dtype=torch.int64)}, str(directory / STATS_FILE))
    return stats


def load_stats(directory: Path) -> WhiteningStats:
    path = directory / STATS_FILE
    if not path.exists():
        raise ShardError(f"no whitening statistics at {path}: the activation harvest for this layer is incomplete")
    tensors = load_file(str(path))
    return WhiteningStats(tensors["mean_D"], tensors["std_D"], int(tensors["n_tokens"][0]))


def load_split(directory: Path, split: str, max_tokens: int | None = None) -> torch.Tensor:
    """All shards of a split as one float32 (N, D) tensor, each verified against its recorded sha256."""
    shards = read_index(directory)["shards"][split]
    if not shards:
        raise ShardError(f"no {split} shards in {directory}: materialise the activations for this layer first")
    parts, total = [], 0
    for shard in shards:
        path = directory / shard["file"]
        if not path.exists() or file_sha256(path) != shard["sha256"]:
            raise ShardError(f"shard {path} is missing or does not match its recorded sha256; delete "
                             f"{directory} and harvest again")
        try:
            parts.append(load_file(str(path))["acts_ND"].float())
        except (SafetensorError, KeyError, OSError) as err:
            raise ShardError(f"shard {path} is unreadable ({err}); delete {directory} and harvest again") from err
        total += parts[-1].shape[0]
        if max_tokens is not None and total >= max_tokens:
            break
    acts = torch.cat(parts)
    return acts if max_tokens is None else acts[:max_tokens]
