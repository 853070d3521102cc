"""The operating point on disk and the public apply_patch / remove_patch API, on the tiny model."""

import json

import pytest
import torch

from sae_pipeline import apply_patch, remove_patch
from sae_pipeline.steering.operating_point import CONFIG_FILE, load_operating_point, save_operating_point
from sae_pipeline.steering.runtime import LayerSteering, ProbeGate, SteeringError, patched
from sae_pipeline.steering.sidecar import DenseSidecar, write_sae8

LAYER = 2


def _layers():
    generator = torch.Generator().manual_seed(0)
    directions = torch.nn.functional.normalize(torch.randn(4, 64, generator=generator), dim=-1)
    sidecar = DenseSidecar(directions, directions.clone(), torch.full((4,), -1.0))  # every token fires
    gate = ProbeGate(torch.randn(128, generator=generator), 0.1, (1,))
    return {LAYER: LayerSteering(sidecar, alpha=0.7, epsilon=0.0, refusal_D=torch.ones(64) * 0.05, beta=0.8,
                                 gate=gate)}


@pytest.fixture
def ids(tiny):
    return torch.tensor([tiny.tokenizer("an operating point, applied").input_ids])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_operating_point_applies_exactly_as_saved(tiny, ids, tmp_path):
    layers = _layers()
    save_operating_point(tmp_path / "op", layers, gate_skip=2, provenance={"model_hash": tiny.model_hash})
    with patched(tiny.model, layers, gate_skip=2):
        expected = _logits(tiny.model, ids)
    before = _logits(tiny.model, ids)
    apply_patch(tiny.model, tmp_path / "op")
    try:
        assert torch.equal(_logits(tiny.model, ids), expected) and not torch.equal(expected, before)
    finally:
        remove_patch(tiny.model)
    assert torch.equal(_logits(tiny.model, ids), before)
    apply_patch(tiny.model, tmp_path / "op", steer_on=False)
    try:
        assert torch.equal(_logits(tiny.model, ids), before)
    finally:
        remove_patch(tiny.model)
    loaded, gate_skip, config = load_operating_point(tmp_path / "op")
    assert gate_skip == 2 and config["model_hash"] == tiny.model_hash and loaded[LAYER].beta == 0.8


def test_edited_or_missing_files_fail_closed(tmp_path):
    directory = save_operating_point(tmp_path / "op", _layers(), gate_skip=1, provenance={})
    (directory / f"gate_l{LAYER}.safetensors").write_bytes(b"junk")
    with pytest.raises(SteeringError, match="gate_l2.safetensors does not match its recorded sha256"):
        load_operating_point(directory)
    (directory / f"gate_l{LAYER}.safetensors").unlink()
    with pytest.raises(SteeringError, match="cannot"):
        load_operating_point(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps({**config, "version": 9}))
    with pytest.raises(SteeringError, match="unsupported version 9"):
        load_operating_point(directory)


def test_sidecar_files_per_layer_with_alphas(tiny, ids, tmp_path):
    sidecar = _layers()[LAYER].sidecar
    write_sae8(sidecar, tmp_path / "l2.sae8", nnz_per_feature=64)
    before = _logits(tiny.model, ids)
    apply_patch(tiny.model, {LAYER: tmp_path / "l2.sae8"}, alphas={LAYER: 0.0})
    try:
        assert torch.equal(_logits(tiny.model, ids), before), "alpha 0 from the API is bit-identical too"
    finally:
        remove_patch(tiny.model)
    apply_patch(tiny.model, {LAYER: tmp_path / "l2.sae8"}, alpha=0.9)
    try:
        assert not torch.equal(_logits(tiny.model, ids), before)
    finally:
        remove_patch(tiny.model)
    with pytest.raises(SteeringError, match="control tokens are fixed"):
        apply_patch(tiny.model, {LAYER: tmp_path / "l2.sae8"}, reverse_token="<|rev|>")


def test_a_refusal_only_layer_with_a_two_layer_gate_round_trips(tiny, ids, tmp_path):
    generator = torch.Generator().manual_seed(5)
    layers = _layers()
    layers[3] = LayerSteering(None, 0.0, refusal_D=torch.randn(64, generator=generator), beta=1.5,
                              gate=ProbeGate(torch.randn(256, generator=generator), 0.5, (1, LAYER)))
    save_operating_point(tmp_path / "op", layers, gate_skip=2, provenance={})
    loaded, gate_skip, config = load_operating_point(tmp_path / "op")
    assert loaded[3].sidecar is None and loaded[3].gate.layers == (1, LAYER) and "sidecar" not in config["layers"]["3"]
    with patched(tiny.model, layers, gate_skip=2):
        expected = _logits(tiny.model, ids)
    apply_patch(tiny.model, tmp_path / "op", alpha=0.3)  # the override reaches the feature layer only
    try:
        patch = tiny.model._sae_pipeline_steering
        assert patch.layers[LAYER].config.alpha == 0.3 and patch.layers[3].config.alpha == 0.0
    finally:
        remove_patch(tiny.model)
    apply_patch(tiny.model, tmp_path / "op")
    try:
        assert torch.equal(_logits(tiny.model, ids), expected)
    finally:
        remove_patch(tiny.model)
