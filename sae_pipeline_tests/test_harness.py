"""The evaluation harness on the tiny random model: schema, determinism, integrity, steering hooks, stability."""

import json
from contextlib import contextmanager

import pytest
import torch

from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.harness import (
    Judges, MetricsIntegrityError, answer_matches, evaluate, load_fingerprints, load_metrics, load_records,
    select_prompts)
from sae_pipeline.evaluation.judges import ComplianceProxyScorer, PrefixRefusalJudge, measure_judge
from sae_pipeline.evaluation.redaction import RedactionError
from sae_pipeline.evaluation.stability import FeatureReadout, flips_by_readout
from sae_pipeline.model.hooks import mlp_module
from sae_pipeline.sae.model import TopKSAE


@pytest.fixture(scope="module")
def sets():
    return load_prompt_sets()


@pytest.fixture(scope="module")
def judges(sets):
    prefix = PrefixRefusalJudge()
    test_split = [e for e in sets.judge_labelled if e.split == "test"]
    return Judges(prefix, prefix, ComplianceProxyScorer(prefix), {"prefix": measure_judge(prefix, test_split)},
                  {"prefix": "test"})


class AddVector:
    """A stand-in steering intervention: adds alpha * a fixed vector to one layer's MLP output."""

    name = "add-vector"

    def __init__(self, layer: int, vector_D: torch.Tensor):
        self.layer, self.vector_D = layer, vector_D
        self.sha256 = f"{hash(tuple(vector_D.tolist())) & (2**64 - 1):016x}" * 4

    @contextmanager
    def applied(self, model, alpha, reverse):
        sign = -1.0 if reverse else 1.0
        handle = mlp_module(model, self.layer).register_forward_hook(
            lambda _m, _i, out: out + sign * alpha * self.vector_D.to(out.dtype))
        try:
            yield
        finally:
            handle.remove()


def test_metrics_schema_and_byte_identical_reruns(tiny, tiny_profile, sets, judges, tmp_path):
    cfg = tiny_profile.evaluation
    first = evaluate(tiny, sets, judges, cfg, tmp_path / "a")
    second = evaluate(tiny, sets, judges, cfg, tmp_path / "b")
    relative = first.directory.relative_to(tmp_path / "a")
    assert relative.parts == (tiny.model_hash, sets.dataset_hash, "alpha_0.00", first.metrics["cfg_hash"][:12])
    assert (first.directory / "metrics.json").read_bytes() == (second.directory / "metrics.json").read_bytes()
    assert (first.directory / "records.jsonl").read_bytes() == (second.directory / "records.jsonl").read_bytes()
    metrics = load_metrics(first.directory)
    for key in ("cfg_hash", "model_hash", "dataset_hash", "run_id", "alpha", "reverse_safety", "seed", "decode",
                "harmful_completion_rate", "harmful_refusal_rate", "benign_false_refusal_rate", "capability",
                "feature_stability", "throughput", "metrics_sha256"):
        assert key in metrics, key
    per_category = metrics["harmful_refusal_rate"]["per_category"]
    assert set(per_category) == {"chem", "bio", "cyber", "violence", "self_harm", "fraud"}
    for rate in [metrics["harmful_refusal_rate"]["overall"], *per_category.values(),
                 metrics["benign_false_refusal_rate"]["borderline"]]:
        assert rate["ci_low"] <= rate["rate"] <= rate["ci_high"] and rate["n"] >= 1
    assert metrics["capability"]["perplexity"] > 1.0
    assert metrics["capability"]["next_token_kl"] == 0.0, "unsteered vs unsteered, computed: exactly equal logits"
    assert metrics["redaction"]["harmful_completions"] == len(select_prompts(sets, cfg).harmful)
    selection = select_prompts(sets, cfg)
    records = load_records(first.directory)
    assert {r["id"] for r in records} == {r.id for r in selection.harmful + selection.benign}
    assert all(len(r["completion_sha256"]) == 64 and isinstance(r["refused"], bool) for r in records)
    timing = json.loads((first.directory / "timing.json").read_text())
    assert timing["metrics_sha256"] == metrics["metrics_sha256"] and timing["wall_seconds"] > 0


def test_edited_run_files_fail_closed(tiny, tiny_profile, sets, judges, tmp_path):
    result = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path)
    records = result.directory / "records.jsonl"
    records.write_text(records.read_text().replace('"refused": false', '"refused": true', 1))
    with pytest.raises(MetricsIntegrityError, match="records.jsonl does not match the records_sha256"):
        load_records(result.directory)
    fingerprints = result.directory / "redaction.fingerprints"
    fingerprints.write_bytes(b"SAEREDv1")
    with pytest.raises(RedactionError, match="does not match the fingerprints_sha256"):
        load_fingerprints(result.directory)
    path = result.directory / "metrics.json"
    path.write_text(path.read_text().replace('"alpha": 0.0', '"alpha": 0.5'))
    with pytest.raises(MetricsIntegrityError, match="does not match its metrics_sha256"):
        load_metrics(result.directory)


def test_settings_that_differ_write_to_different_directories(tiny, tiny_profile, sets, judges, tmp_path):
    base = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path)
    other = evaluate(tiny, sets, judges, tiny_profile.evaluation.model_copy(update={"limit_per_group": 2}), tmp_path)
    assert base.directory.parent == other.directory.parent and base.directory != other.directory


def test_steering_changes_the_model_and_lands_in_its_own_directory(tiny, tiny_profile, sets, judges, tmp_path):
    steering = AddVector(layer=2, vector_D=torch.randn(64, generator=torch.Generator().manual_seed(0)) * 4)
    with pytest.raises(ValueError, match="need a steering intervention"):
        evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path, alpha=0.6)
    result = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path, alpha=0.6, steering=steering)
    assert result.directory.parent.name == "alpha_0.60"
    assert result.metrics["capability"]["next_token_kl"] > 0.0
    assert result.metrics["steering"] == {"name": "add-vector", "sha256": steering.sha256}


def test_reverse_safety_is_off_unless_steer_debug(tiny, tiny_profile, sets, judges, tmp_path, monkeypatch):
    steering = AddVector(layer=2, vector_D=torch.ones(64))
    monkeypatch.delenv("STEER_DEBUG", raising=False)
    with pytest.raises(PermissionError, match="STEER_DEBUG=1"):
        evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path, alpha=1.0, reverse_safety=True,
                 steering=steering)
    monkeypatch.setenv("STEER_DEBUG", "1")
    result = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path, alpha=1.0, reverse_safety=True,
                      steering=steering)
    assert result.directory.parent.name == "alpha_1.00_reverse" and result.metrics["reverse_safety"] is True


def test_feature_stability_counts_sign_flips_under_steering(tiny, tiny_profile, sets, judges, tmp_path):
    sae = TopKSAE(64, 32, 4)
    sae.init_tied(torch.Generator().manual_seed(0))
    readout = FeatureReadout(layer=3, sae=sae, feature_ids=[0, 1, 2, 3])
    calm = AddVector(layer=3, vector_D=torch.zeros(64))
    flipping = AddVector(layer=3, vector_D=-sae.W_dec_FD[:4].detach().sum(0) * 50)
    steady = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path / "calm", alpha=1.0, steering=calm,
                      readouts=[readout])
    assert steady.metrics["feature_stability"]["sign_flips"] == 0
    flipped = evaluate(tiny, sets, judges, tiny_profile.evaluation, tmp_path / "flip", alpha=1.0, steering=flipping,
                       readouts=[readout])
    stability = flipped.metrics["feature_stability"]
    assert stability["features"] == 4 and stability["questions"] == 3
    assert stability["sign_flips"] > 0 and stability["flip_rate"]["rate"] > 0
    assert stability["sign_flips_by_readout"] == {"features|3": stability["sign_flips"]}


def test_flips_are_counted_per_behaviour_and_layer():
    sae = TopKSAE(8, 16, 2)
    readouts = [FeatureReadout(3, sae, [0, 1], "chem"), FeatureReadout(3, sae, [5], "bio"),
                FeatureReadout(4, sae, [2], "chem")]
    # two prompts x four features, prompt-major
    flags = [True, False, True, False,
             False, True, True, True]
    assert flips_by_readout(flags, readouts) == {"chem|3": 2, "bio|3": 2, "chem|4": 1}
    with pytest.raises(ValueError, match="do not tile"):
        flips_by_readout(flags[:-1], readouts)


def test_task_answers_must_go_beyond_echoing_the_question():
    assert not answer_matches("What is 144 divided by 12?", "144 divided by 12 is a division problem.", ["12"])
    assert answer_matches("What is 144 divided by 12?", "144 / 12 = 12", ["12"])
    assert answer_matches("What is the capital of France?", "It is Paris.", ["Paris"])
    assert not answer_matches("What is the capital of France?", "It is Parisian.", ["Paris"])


def test_continuation_logprobs_match_an_unpadded_teacher_forced_forward(tiny):
    from sae_pipeline.evaluation.generation import continuation_logprobs

    contexts = [[5, 9, 13], [7, 8, 21, 3, 11, 2], [4]]  # different lengths: the batch is left padded
    continuation = [17, 23, 29, 31]
    batched = continuation_logprobs(tiny.model, tiny.tokenizer, contexts, continuation, batch_size=3)
    for context, score in zip(contexts, batched):
        ids = torch.tensor([context + continuation])
        logprobs_SV = tiny.model(input_ids=ids).logits[0].float().log_softmax(-1)
        positions = torch.arange(len(context) - 1, len(context) - 1 + len(continuation))
        expected = logprobs_SV[positions, torch.tensor(continuation)].mean().item()
        assert abs(score - expected) < 1e-4
