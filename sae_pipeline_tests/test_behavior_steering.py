"""Per-behaviour steering on the tiny model: grouped deltas add, subsets, overrides, control tokens, the release
directory and grouped sidecar files."""

import json

import pytest
import torch

from sae_pipeline.behaviors.release import CONFIG_FILE, RefusalRouting, read_release, write_release
from sae_pipeline.model.hooks import capture_outputs
from sae_pipeline.steering.behaviors import apply_behaviors, remove_behaviors
from sae_pipeline.steering.runtime import (
    REVERSE_TOKEN, CategoryRouter, LayerSteering, ProbeGate, SteeringError, patched)
from sae_pipeline.steering.sidecar import (
    DenseSidecar, SidecarError, decode_sae8, encode_sae8, save_dense, sidecar_groups)

LAYER = 2


def _sidecar(n: int, seed: int) -> DenseSidecar:
    generator = torch.Generator().manual_seed(seed)
    directions = torch.nn.functional.normalize(torch.randn(n, 64, generator=generator), dim=-1)
    return DenseSidecar(directions, directions.clone(), torch.full((n,), -10.0))  # always firing


@pytest.fixture
def ids(tiny):
    return torch.tensor([tiny.tokenizer("steer these words, please").input_ids])


@pytest.fixture
def paths(tmp_path):
    out = {}
    for seed, behavior in enumerate(("chem", "bio")):
        path = tmp_path / f"{behavior}.safetensors"
        save_dense(_sidecar(3, seed), path)
        out[behavior] = {LAYER: path}
    return out


def _mlp_output(model, ids) -> torch.Tensor:
    with torch.no_grad(), capture_outputs(model, [LAYER], stop_after_last=False) as captured:
        model(input_ids=ids)
    return captured[LAYER]


def _steered(model, ids, **kwargs) -> torch.Tensor:
    apply_behaviors(model, **kwargs)
    try:
        return _mlp_output(model, ids)
    finally:
        remove_behaviors(model)


def test_behaviours_sharing_a_layer_add_their_deltas_and_subsets_take_one_argument(tiny, ids, paths):
    clean = _mlp_output(tiny.model, ids)
    both = _steered(tiny.model, ids, sae_paths_per_behavior=paths, alphas_per_behavior={"chem": 0.5, "bio": 0.3})
    chem = _steered(tiny.model, ids, sae_paths_per_behavior=paths, alphas_per_behavior={"chem": 0.5},
                    behaviors=["chem"])
    bio = _steered(tiny.model, ids, sae_paths_per_behavior={"bio": paths["bio"]}, alphas_per_behavior={"bio": 0.3})
    assert not torch.allclose(chem, clean) and not torch.allclose(bio, clean)
    assert torch.allclose(both - clean, (chem - clean) + (bio - clean), atol=1e-5)
    # a per-layer override, and a behaviour at alpha 0 steers nothing
    muted = _steered(tiny.model, ids, sae_paths_per_behavior=paths,
                     alphas_per_behavior={"chem": {LAYER: 0.5}, "bio": 0.0})
    assert torch.allclose(muted, chem, atol=1e-6)
    # the reference rule alone: one group with one alpha is the single-sidecar runtime
    with patched(tiny.model, {LAYER: LayerSteering(_sidecar(3, 0), 0.5)}):
        assert torch.allclose(_mlp_output(tiny.model, ids), chem, atol=1e-6)
    assert torch.equal(_mlp_output(tiny.model, ids), clean)  # removal restores exactly


def test_control_tokens_act_on_every_behaviour(tiny, ids, paths, monkeypatch):
    clean = _mlp_output(tiny.model, ids)
    patch = apply_behaviors(tiny.model, paths, {"chem": 0.5, "bio": 0.3})
    try:
        with patch.request("<|no-steer|> hi"):
            assert torch.equal(_mlp_output(tiny.model, ids), clean)
        with pytest.raises(SteeringError, match="STEER_DEBUG"), patch.request(REVERSE_TOKEN):
            pass
        monkeypatch.setenv("STEER_DEBUG", "1")
        with patch.request(REVERSE_TOKEN):
            reversed_ = _mlp_output(tiny.model, ids)
    finally:
        remove_behaviors(tiny.model)
    both_at_one = _steered(tiny.model, ids, sae_paths_per_behavior=paths, alphas_per_behavior={"chem": 1, "bio": 1})
    assert torch.allclose(reversed_ - clean, -(both_at_one - clean), atol=1e-5)  # every group at -1
    # a behaviour at alpha 0, and hooks attached inert, stay untouched under reverse too
    chem_at_one = _steered(tiny.model, ids, sae_paths_per_behavior=paths, alphas_per_behavior={"chem": 1, "bio": 0})
    for alphas, steer_on, expected in (({"chem": 0.5, "bio": 0.0}, True, 2 * clean - chem_at_one),
                                       ({"chem": 0.5, "bio": 0.3}, False, clean)):
        patch = apply_behaviors(tiny.model, paths, alphas, steer_on=steer_on)
        try:
            with patch.request(REVERSE_TOKEN):
                assert torch.allclose(_mlp_output(tiny.model, ids), expected, atol=1e-5)
        finally:
            remove_behaviors(tiny.model)


def test_bad_requests_fail_before_any_hook(tiny, paths):
    with pytest.raises(SteeringError, match=r"unknown behaviours \['cyber'\]"):
        apply_behaviors(tiny.model, paths, behaviors=["cyber"])
    with pytest.raises(SteeringError, match="control tokens are fixed"):
        apply_behaviors(tiny.model, paths, reverse_token="<|flip|>")
    with pytest.raises(SteeringError, match=r"not hooked: \{'chem': \[7\]\}"):
        apply_behaviors(tiny.model, paths, {"chem": {"7": 0.5}})
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_a_release_directory_applies_as_written_and_fails_closed_when_tampered(tiny, ids, paths, tmp_path):
    release = tmp_path / "release"
    sidecars = {LAYER: {"chem": _sidecar(3, 0), "bio": _sidecar(3, 1)}}
    config = write_release(release, sidecars, {"chem": 0.5, "bio": 0.3}, nnz_per_feature=16,
                           provenance={"sae": {str(LAYER): {"sae_hash": "x"}}},
                           dictionaries={LAYER: {"chem": [4, 1, 9], "bio": [2, 3, 5, 7]}})
    assert config["layers"][str(LAYER)]["groups"] == [["chem", 3], ["bio", 3]]
    assert read_release(release).config["dictionaries"] == {str(LAYER): {"chem": [4, 1, 9], "bio": [2, 3, 5, 7]}}
    assert sidecar_groups(release / f"grouped_l{LAYER}.sae8") == {"chem": 3, "bio": 3}
    assert sidecar_groups(release / f"grouped_l{LAYER}.safetensors") == {"chem": 3, "bio": 3}
    assert sidecar_groups(release / f"chem_l{LAYER}.sae8") is None
    from_release = _steered(tiny.model, ids, sae_paths_per_behavior=release)
    from_paths = _steered(tiny.model, ids, sae_paths_per_behavior=paths,
                          alphas_per_behavior={"chem": 0.5, "bio": {str(LAYER): 0.3}})  # "2" and 2 alike
    assert torch.allclose(from_release, from_paths, atol=1e-6)
    with pytest.raises(SteeringError, match="grouped sidecar"):
        apply_behaviors(tiny.model, {"chem": {LAYER: release / f"grouped_l{LAYER}.sae8"}})
    swapped = json.loads((release / CONFIG_FILE).read_text())
    swapped["layers"][str(LAYER)]["groups"] = [["bio", 3], ["chem", 3]]  # each alpha would steer the other's rows
    (release / CONFIG_FILE).write_text(json.dumps(swapped))
    with pytest.raises(SidecarError, match="differ from the sidecar's"):
        read_release(release)
    write_release(release, sidecars, {"chem": 0.5, "bio": 0.3}, 16, {}, dictionaries={LAYER: {"cyber": [1]}})
    with pytest.raises(SidecarError, match=r"does not steer: \{'2': \['cyber'\]\}"):
        read_release(release)
    write_release(release, sidecars, {"chem": 0.5, "bio": 0.3}, nnz_per_feature=16, provenance={})
    grouped = release / f"grouped_l{LAYER}.safetensors"
    grouped.write_bytes(grouped.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(SidecarError, match="sha256"):
        read_release(release)
    (release / CONFIG_FILE).write_text(json.dumps({"version": 99}))
    with pytest.raises(SidecarError, match="version 99"):
        apply_behaviors(tiny.model, release)
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_grouped_sae8_headers_must_cover_the_rows():
    sidecar = _sidecar(4, 0)
    blob = encode_sae8(sidecar, 16, {"chem": 1, "bio": 3})
    assert torch.allclose(decode_sae8(blob).tau_N, sidecar.tau_N)
    with pytest.raises(SidecarError, match="cover the sidecar's 4 features"):
        encode_sae8(sidecar, 16, {"chem": 1, "bio": 2})


def _routing(gate_bias: float = 1.0) -> RefusalRouting:
    router = CategoryRouter(("chem", "bio"), torch.zeros(128, 2), torch.tensor([1.0, 0.0]), (1,))  # all to chem
    return RefusalRouting(LAYER, torch.ones(64), ProbeGate(torch.zeros(128), gate_bias, (1,)), router,
                          beta_per_alpha=2.0, gate_skip=3)


def test_a_release_carries_the_per_behaviour_refusal_mode_and_its_gates(tiny, ids, tmp_path):
    release = tmp_path / "release"
    sidecars = {LAYER: {"chem": _sidecar(3, 0), "bio": _sidecar(3, 1)}}
    passed = [{"name": "crosstalk_cos_max", "value": 0.04, "threshold": 0.05, "passed": True}]
    write_release(release, sidecars, {"chem": 0.5, "bio": 0.25}, 16, {}, _routing(), passed)
    patch = apply_behaviors(tiny.model, release)
    try:
        steering = patch.layers[LAYER].config
        assert steering.beta == 2.0 and steering.route_scale_C.tolist() == [0.5, 0.25]
        assert patch.gate_skip == 3 and steering.groups.names == ("chem", "bio")  # both modes on one layer
        _mlp_output(tiny.model, ids)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [0.5]  # fired, routed to chem
    finally:
        remove_behaviors(tiny.model)
    patch = apply_behaviors(tiny.model, release, {"chem": {LAYER: 0.75}}, behaviors=["bio"])
    try:  # chem off: its routed prompts go unsteered; bio's features stay
        assert patch.layers[LAYER].config.route_scale_C.tolist() == [0.0, 0.25]
        assert patch.layers[LAYER].config.groups.names == ("bio",)
        _mlp_output(tiny.model, ids)
        assert patch.layers[LAYER].fired_B.flatten().tolist() == [0.0]
    finally:
        remove_behaviors(tiny.model)
    patch = apply_behaviors(tiny.model, release, {"chem": {LAYER: 0.75}}, steer_on=False)
    try:
        assert patch.layers[LAYER].config.route_scale_C.tolist() == [0.75, 0.25]
        assert patch.layers[LAYER].config.beta == 0.0
    finally:
        remove_behaviors(tiny.model)

    failed = [{**passed[0], "name": "crosstalk_shortfall_max", "value": 85, "threshold": 0, "passed": False}]
    write_release(release, sidecars, {"chem": 0.5, "bio": 0.25}, 16, {}, _routing(), passed + failed)
    with pytest.raises(SidecarError, match=r"failed its gates \(crosstalk_shortfall_max\)"):
        apply_behaviors(tiny.model, release)
    accepted = apply_behaviors(tiny.model, release, accept_failed_gates=True)
    try:  # accepted explicitly: applied as written
        assert accepted.layers[LAYER].config.route_scale_C.tolist() == [0.5, 0.25]
    finally:
        remove_behaviors(tiny.model)
    router = release / "router.safetensors"
    raw = router.read_bytes()
    router.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(SidecarError, match="router.safetensors does not match"):
        read_release(release, accept_failed_gates=True)
    assert getattr(tiny.model, "_sae_pipeline_steering", None) is None


def test_the_screen_counts_the_dictionary_signs_a_steered_feature_flips(tiny):
    from sae_pipeline.behaviors.screen import steered_sign_flips
    from sae_pipeline.evaluation.generation import chat_ids
    from sae_pipeline.evaluation.stability import FeatureReadout, mean_pre_acts
    from sae_pipeline.sae.model import TopKSAE

    sae = TopKSAE(64, 32, 8)
    sae.init_tied(torch.Generator().manual_seed(0))
    prompts = [chat_ids(tiny.tokenizer, p) for p in ("bake a cake", "sort a list in python", "name three birds")]
    means_PF = mean_pre_acts(tiny.model, prompts, [FeatureReadout(LAYER, sae, list(range(32)))])
    feature = int(means_PF.min(0).values.argmax())  # positive on every prompt: removing it hard turns it negative
    assert means_PF[:, feature].min() > 0
    own_D = torch.nn.functional.normalize(sae.W_enc_DF[:, feature].detach(), dim=0)[None]
    flips = steered_sign_flips(tiny.model, prompts, sae, LAYER, list(range(32)), [feature], own_D, [-1], 500.0, 0.0)
    assert flips[feature] >= len(prompts), "its own sign flips on every prompt, at least"
    calm = steered_sign_flips(tiny.model, prompts, sae, LAYER, list(range(32)), [feature], own_D, [-1], 0.0, 0.0)
    assert calm == {feature: 0}
