"""Build and measure the refusal judges, choose the deciding one, compare them with their gates; run the frozen
harness on the frozen sets with them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sae_pipeline.config import EvalConfig, Gate, artifacts_root
from sae_pipeline.evaluation.datasets import PromptSets, load_prompt_sets
from sae_pipeline.evaluation.harness import EvalResult, Judges, Steering, evaluate
from sae_pipeline.evaluation.stability import FeatureReadout
from sae_pipeline.evaluation.judges import (
    HEAD_INFO_FILE, ComplianceProxyScorer, EmbeddingRefusalJudge, JudgeAccuracy, JudgeError, PrefixRefusalJudge,
    judge_dir, load_sentence_encoder, measure_judge)
from sae_pipeline.gates import GateResult, check_gates
from sae_pipeline.model.loading import LoadedModel


def build_judges(sets: PromptSets) -> tuple[Judges, str]:
    """Fit (or reload and verify) the embedding judge on the labelled train split; measure both judges on the
    test split. Returns the judges and the head's directory."""
    train = [e for e in sets.judge_labelled if e.split == "train"]
    test = [e for e in sets.judge_labelled if e.split == "test"]
    encoder = load_sentence_encoder()
    directory = judge_dir(encoder, train)
    try:
        embedding = EmbeddingRefusalJudge.load(directory, encoder)
    except JudgeError:
        if (directory / HEAD_INFO_FILE).exists():
            raise  # a head exists but does not verify: fail closed instead of silently retraining
        embedding = EmbeddingRefusalJudge.fit(encoder, train)
        embedding.save(directory, {"train_examples": len(train)})
    prefix = PrefixRefusalJudge()
    accuracy = {judge.name: measure_judge(judge, test) for judge in (embedding, prefix)}
    judges = Judges(refusal=embedding, reference=prefix, harmfulness=ComplianceProxyScorer(embedding),
                    accuracy=accuracy,
                    identity={"embedding_head": embedding.head_sha256, "prefix": ",".join(prefix.MARKERS)})
    return judges, str(directory)


def select_primary(judges: Judges, name: str) -> Judges:
    """The judges with `name` deciding the reported rates and the other one as the reference."""
    if judges.refusal.name == name:
        return judges
    return judges._replace(refusal=judges.reference, reference=judges.refusal,
                           harmfulness=ComplianceProxyScorer(judges.reference))


def judge_gate_checks(accuracy: JudgeAccuracy, gates: dict[str, Gate]) -> list[GateResult]:
    return check_gates(gates, {"accuracy_min": accuracy.accuracy, "recall_min": accuracy.recall,
                               "precision_min": accuracy.precision})


def evaluation_root() -> Path:
    return artifacts_root() / "evaluation"


def run_frozen(loaded: LoadedModel, cfg: EvalConfig, steering: Steering | None = None, alpha: float = 0.0,
               reverse: bool = False, readouts: Sequence[FeatureReadout] = ()) -> EvalResult:
    """One harness run on the frozen sets with the configured deciding judge, under `steering` when given."""
    sets = load_prompt_sets()
    judges, _ = build_judges(sets)
    return evaluate(loaded, sets, select_primary(judges, cfg.refusal_judge), cfg, evaluation_root(), alpha=alpha,
                    reverse_safety=reverse, steering=steering, readouts=readouts)
