"""The candidate operating point, the per-strength gate quantities and the rule that picks the operating point."""

import pytest
import torch

from sae_pipeline.config import load_gates
from sae_pipeline.gates import GateResult
from sae_pipeline.steering.runtime import ProbeGate
from sae_pipeline.steering.sidecar import DenseSidecar
from sae_pipeline.steering.sweep import (
    STRENGTH_GATES, Candidate, choose_alpha, reverse_capability_recovery, strength_gate_values, strength_results)


def _rate(value):
    return {"rate": value, "ci_low": value, "ci_high": value, "n": 100}


def _metrics(completion, benign, borderline, ppl, accuracy, kl=0.0, flips=0):
    return {"harmful_completion_rate": {"overall": _rate(completion)},
            "benign_false_refusal_rate": {"overall": _rate(benign), "borderline": _rate(borderline)},
            "capability": {"perplexity": ppl, "next_token_kl": kl, "task_accuracy": {"overall": _rate(accuracy)}},
            "feature_stability": {"sign_flips": flips}}


BASELINE = _metrics(completion=0.9, benign=0.01, borderline=0.0, ppl=20.0, accuracy=0.5)


def test_gate_quantities_are_relative_where_the_issue_says_so():
    values = strength_gate_values(BASELINE, _metrics(0.045, 0.02, 0.04, 20.1, 0.49, kl=0.01, flips=1))
    assert set(values) == set(STRENGTH_GATES)
    assert values["harmful_completion_reduction_min"] == pytest.approx(0.95)
    assert values["perplexity_increase_max"] == pytest.approx(0.005)
    assert values["task_accuracy_drop_max"] == pytest.approx(0.01)
    assert (values["benign_false_refusal_max"], values["borderline_false_refusal_max"]) == (0.02, 0.04)
    assert (values["next_token_kl_max"], values["sign_flips_max"]) == (0.01, 1.0)
    results = {g.name: g.passed for g in strength_results(load_gates().steering, BASELINE,
                                                          _metrics(0.045, 0.02, 0.04, 20.1, 0.49, kl=0.01, flips=1))}
    assert results == {"harmful_completion_reduction_min": True, "benign_false_refusal_max": True,
                       "borderline_false_refusal_max": False, "next_token_kl_max": True,
                       "perplexity_increase_max": True, "task_accuracy_drop_max": True, "sign_flips_max": False}


def test_reverse_recovery_is_the_worse_of_accuracy_and_perplexity():
    assert reverse_capability_recovery(BASELINE, _metrics(0.9, 0.0, 0.0, 25.0, 0.5)) == pytest.approx(0.8)
    assert reverse_capability_recovery(BASELINE, _metrics(0.9, 0.0, 0.0, 20.0, 0.45)) == pytest.approx(0.9)


REDUCTIONS = {0.0: 0.0, 0.4: 0.5, 0.8: 0.93, 1.2: 0.97}


def _gates(alpha, job, *others):
    """The harmful-completion gate (its value: the alpha's reduction) first, then others."""
    return [GateResult("harmful_completion_reduction_min", REDUCTIONS[alpha], 0.92, job, "test"),
            *(GateResult(f"g{i}", 0.0, 0.0, p, "test") for i, p in enumerate(others))]


def test_the_smallest_passing_alpha_wins_else_the_job_comes_first():
    assert choose_alpha({0.0: _gates(0.0, False, True, True), 0.4: _gates(0.4, True, True, True),
                         0.8: _gates(0.8, True, True, True), 1.2: _gates(1.2, True, False, True)}) == 0.4
    # alpha 0 passes every gate but the harmful one: it never wins over an alpha that does the job
    assert choose_alpha({0.0: _gates(0.0, False, True, True), 0.4: _gates(0.4, False, True, True),
                         0.8: _gates(0.8, True, False, False), 1.2: _gates(1.2, True, False, True)}) == 1.2
    # nobody does the job: most gates, then the largest reduction
    assert choose_alpha({0.0: _gates(0.0, False, True, True), 0.4: _gates(0.4, False, True, True),
                         0.8: _gates(0.8, False, True, False), 1.2: _gates(1.2, False, False, False)}) == 0.4


def _candidate(feature_layer):
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(2, 64, generator=generator), dim=-1)
    sidecar = DenseSidecar(directions, directions.clone(), torch.full((2,), -10.0))
    gate = ProbeGate(torch.zeros(128), 1.0, (2,))  # bias > 0: every prompt fires
    return Candidate({feature_layer: sidecar}, gate, torch.ones(64), 3, refusal_beta=2.0, epsilon=0.02,
                     gate_skip=1, component_hashes={"sidecar": "s", "gate": "g", "refusal": "r"})


def test_one_strength_drives_both_modes_and_zero_is_the_unsteered_model(tiny):
    apart, merged = _candidate(1), _candidate(3)
    layers = apart.layers_at(0.5)
    assert layers[1].alpha == 0.5 and layers[1].refusal_D is None
    assert layers[3].sidecar is None and layers[3].beta == 1.0 and layers[3].gate.layers == (2,)
    joined = merged.layers_at(0.5)[3]
    assert joined.alpha == 0.5 and joined.beta == 1.0 and joined.sidecar is not None
    assert apart.sha256 != merged.sha256 == _candidate(3).sha256

    ids = torch.tensor([tiny.tokenizer("a prompt to steer").input_ids])
    with torch.no_grad():
        before = tiny.model(input_ids=ids).logits
        with apart.applied(tiny.model, 0.0, reverse=False):
            assert torch.equal(tiny.model(input_ids=ids).logits, before)
        with apart.applied(tiny.model, 1.0, reverse=False):
            forward = tiny.model(input_ids=ids).logits
        assert not torch.equal(forward, before)
        assert torch.equal(tiny.model(input_ids=ids).logits, before)


def test_reverse_needs_steer_debug(tiny, monkeypatch):
    from sae_pipeline.steering.runtime import SteeringError

    monkeypatch.delenv("STEER_DEBUG", raising=False)
    with pytest.raises(SteeringError, match="STEER_DEBUG"):
        with _candidate(1).applied(tiny.model, 1.0, reverse=True):
            pass
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None
    monkeypatch.setenv("STEER_DEBUG", "1")
    ids = torch.tensor([tiny.tokenizer("a prompt to steer").input_ids])
    with torch.no_grad():
        with _candidate(1).applied(tiny.model, 1.0, reverse=False):
            forward = tiny.model(input_ids=ids).logits
        with _candidate(1).applied(tiny.model, 1.0, reverse=True):
            flipped = tiny.model(input_ids=ids).logits
    assert not torch.equal(forward, flipped)


def test_an_ensemble_spreads_the_candidate_over_its_schedule_and_skips_inert_layers(tiny):
    from sae_pipeline.steering.ensemble import Ensemble, Schedule, ablations, grid_around

    base = _candidate(1)  # features at 1, gate reading 2
    refusals = {3: torch.ones(64), 4: 2 * torch.ones(64)}
    ensemble = Ensemble(base, refusals, {3: "r3", 4: "r4"}, Schedule("mid", {0: 1.0, 1: 0.5, 3: 0.4, 4: 0.0}))
    assert ensemble.steerable_layers() == [1, 3, 4] and ensemble.active_layers() == [1, 3, 4]
    layers = ensemble.layers_at(1.0)
    assert set(layers) == {1, 3}  # 0 is inert (nothing to steer), 4 is scheduled off
    assert layers[1].alpha == 0.5 and layers[1].refusal_D is None and layers[1].gate is None
    assert layers[3].sidecar is None and layers[3].beta == 0.4 * 2.0 and layers[3].gate is base.gate
    assert ensemble.layers_at(0.5)[3].beta == 0.2 * 2.0
    other = Ensemble(base, refusals, {3: "r3", 4: "r4"}, Schedule("mid", {0: 1.0, 1: 0.5, 3: 0.5, 4: 0.0}))
    assert other.sha256 != ensemble.sha256
    ids = torch.tensor([tiny.tokenizer("a request").input_ids])
    with torch.no_grad():
        clean = tiny.model(input_ids=ids).logits
        with ensemble.applied(tiny.model, 1.0, reverse=False):
            assert not torch.equal(tiny.model(input_ids=ids).logits, clean)
        assert torch.equal(tiny.model(input_ids=ids).logits, clean)
    grid = grid_around(ensemble.schedule, ensemble.active_layers(), 0.1)
    assert [s.alphas for s in grid] == [{0: 1.0, 1: 0.6, 3: 0.4, 4: 0.0}, {0: 1.0, 1: 0.4, 3: 0.4, 4: 0.0},
                                        {0: 1.0, 1: 0.5, 3: 0.5, 4: 0.0}, {0: 1.0, 1: 0.5, 3: 0.3, 4: 0.0},
                                        {0: 1.0, 1: 0.5, 3: 0.4, 4: 0.1}]  # 4 cannot go below 0
    assert [s.name for s in ablations(ensemble.schedule, ensemble.active_layers())] == [
        "mid without L1", "mid without L3"]
    with pytest.raises(ValueError, match="must follow the gate's layers"):
        Ensemble(base, {2: torch.ones(64)}, {2: "r2"}, Schedule("early", {2: 1.0}))
