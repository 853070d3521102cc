import json
import os

import pytest
import torch

from sae_pipeline.activations import harvest as harvest_module
from sae_pipeline.activations import store
from sae_pipeline.activations.harvest import CorpusTooSmallError, harvest, heldout_windows, token_windows
from sae_pipeline.activations.store import (
    ShardError, layer_dir, load_split, load_stats, newest_harvest, read_index,
)
from sae_pipeline.corpus.build import build_corpus
from sae_pipeline.model.hooks import capture_outputs, run_until_captured


@pytest.fixture
def tiny_corpus(tmp_path, tiny, tiny_profile):
    out = tmp_path / "corpus"
    build_corpus(tiny_profile.corpus, out, tiny.tokenizer, tiny.tokenizer_hash)
    return out


def _shard_bytes(root, layers):
    return {(layer, path.name): path.read_bytes() for layer in layers
            for path in sorted(layer_dir(root, layer).glob("*.safetensors"))}


def test_harvest_writes_shards_stats_and_matches_a_direct_forward(tmp_path, tiny, tiny_profile, tiny_corpus):
    cfg = tiny_profile.harvest
    result = harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "acts", [1, 3], cfg)
    for layer in (1, 3):
        train = load_split(layer_dir(result.root, layer), "train")
        assert train.shape[0] >= cfg.train_tokens and train.shape[1] == 64
        stats = load_stats(layer_dir(result.root, layer))
        assert torch.allclose(stats.mean_D, train.mean(0), atol=1e-4)
        assert torch.allclose(stats.std_D, train.std(0, unbiased=False), atol=1e-3)
    first = next(token_windows(tiny_corpus, tiny.tokenizer, cfg.context_len))
    with torch.no_grad(), capture_outputs(tiny.model, [3]) as captured:
        run_until_captured(tiny.model, torch.tensor([first]))
    direct = captured[3][0, cfg.skip_positions:]
    stored = load_split(layer_dir(result.root, 3), "train")[: direct.shape[0]]
    assert torch.allclose(stored, direct, atol=1e-5)
    heldout_ids = heldout_windows(tiny_corpus, tiny.tokenizer, cfg, 2)
    assert heldout_ids.shape == (2, cfg.context_len)


def test_interrupted_harvest_resumes_to_identical_shards(tmp_path, tiny, tiny_profile, tiny_corpus, monkeypatch):
    cfg = tiny_profile.harvest
    reference = harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "ref", [1, 3], cfg)
    calls = {"n": 0}
    real_append = store.append_shard

    def flaky_append(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_append(*args, **kwargs)

    monkeypatch.setattr(harvest_module, "append_shard", flaky_append)
    with pytest.raises(KeyboardInterrupt):
        harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "resumed", [1, 3], cfg)
    partial = read_index(layer_dir(tmp_path / "resumed", 1))["shards"]["train"]
    assert 0 < len(partial) < len(read_index(layer_dir(reference.root, 1))["shards"]["train"])
    monkeypatch.setattr(harvest_module, "append_shard", real_append)
    resumed = harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "resumed", [1, 3], cfg)
    assert 0 < resumed.shards_written < reference.shards_written
    assert harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "resumed", [1, 3], cfg).shards_written == 0
    assert _shard_bytes(tmp_path / "resumed", [1, 3]) == _shard_bytes(reference.root, [1, 3])
    assert torch.equal(load_stats(layer_dir(tmp_path / "resumed", 3)).std_D,
                       load_stats(layer_dir(reference.root, 3)).std_D)


def test_corrupt_or_missing_shard_is_a_clear_error(tmp_path, tiny, tiny_profile, tiny_corpus):
    result = harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "acts", [1], tiny_profile.harvest)
    shard = layer_dir(result.root, 1) / "train_00000.safetensors"
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(ShardError, match="train_00000.*does not match its recorded sha256"):
        load_split(layer_dir(result.root, 1), "train")
    with pytest.raises(ShardError, match="materialise the activations"):
        load_split(tmp_path / "nothing", "train")


def test_budget_beyond_the_corpus_is_named(tmp_path, tiny, tiny_profile, tiny_corpus):
    greedy = tiny_profile.harvest.model_copy(update={"train_tokens": 10_000_000})
    with pytest.raises(CorpusTooSmallError, match="ran out of text"):
        harvest(tiny.model, tiny.tokenizer, tiny_corpus, tmp_path / "acts", [1], greedy)


def test_newest_harvest_is_the_latest_root_holding_the_layer_and_enough_tokens(tmp_path):
    older, newer = tmp_path / "older", tmp_path / "newer"
    for root, layers, tokens in ((older, (3, 5), 1000), (newer, (5,), 10)):
        for layer in layers:
            layer_dir(root, layer).mkdir(parents=True)
            (layer_dir(root, layer) / "index.json").write_text(json.dumps({"n_train_tokens": tokens}))
    os.utime(older, (1, 1))
    assert newest_harvest(tmp_path, 5) == newer
    assert newest_harvest(tmp_path, 3) == older  # the newer root lacks layer 3
    assert newest_harvest(tmp_path, 5, min_train_tokens=100) == older  # the newer one holds too few tokens
    with pytest.raises(ShardError, match="layer 7"):
        newest_harvest(tmp_path, 7)
