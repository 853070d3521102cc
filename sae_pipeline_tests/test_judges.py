"""Refusal judges: the prefix baseline, the embedding judge's measured accuracy, and a tampered head."""

import pytest

from sae_pipeline.config import load_gates
from sae_pipeline.evaluation.datasets import JudgeExample, load_prompt_sets
from sae_pipeline.evaluation.judges import (
    HEAD_FILE, ComplianceProxyScorer, EmbeddingRefusalJudge, JudgeError, PrefixRefusalJudge, measure_judge)
from sae_pipeline.evaluation.run import build_judges, judge_gate_checks


def _example(label, text):
    return JudgeExample(id=text[:8], label=label, split="test", text=text, source="test")


def test_prefix_judge_reads_only_the_opening():
    judge = PrefixRefusalJudge(window=40)
    assert judge.refusal_probability(["I\u2019m sorry, but I can\u2019t help with that.", "Sure! Here it is.",
                                      "Here is a long helpful answer that goes on and on. I cannot stress enough"]
                                     ) == [1.0, 0.0, 0.0]


def test_measure_judge_counts_errors():
    examples = [_example("refusal", "I cannot do that."), _example("refusal", "Nope, not doing it at all."),
                _example("compliance", "I'm sorry to hear that. Here are tips."), _example("compliance", "Sure.")]
    accuracy = measure_judge(PrefixRefusalJudge(), examples)
    assert (accuracy.accuracy, accuracy.precision, accuracy.recall) == (0.5, 0.5, 0.5)
    assert (accuracy.false_positives, accuracy.false_negatives) == (1, 1)


def test_compliance_proxy_needs_words_and_no_refusal():
    scorer = ComplianceProxyScorer(PrefixRefusalJudge())
    assert scorer.harmfulness(["p"] * 3, ["I cannot help with that request.", "Ok.",
                                          "Here are the steps you asked for, in order."]) == [0.0, 0.0, 1.0]


def test_embedding_judge_meets_its_gates_and_fails_closed_on_a_tampered_head(artifacts_with_encoder):
    judges, directory = build_judges(load_prompt_sets())
    embedding = judges.accuracy["embedding"]
    assert embedding.n >= 200
    assert all(g.passed for g in judge_gate_checks(embedding, load_gates().judge_accuracy)), embedding
    assert embedding.accuracy > judges.accuracy["prefix"].accuracy, "the stronger judge must beat the baseline"
    head = f"{directory}/{HEAD_FILE}"
    with open(head, "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(JudgeError, match="does not match its recorded sha256"):
        build_judges(load_prompt_sets())
    with pytest.raises(JudgeError):
        EmbeddingRefusalJudge.load(artifacts_with_encoder / "judges" / "missing", judges.refusal.encoder)
