import pytest

from sae_pipeline.config import PROFILE_NAMES, ConfigError, load_gates, load_profile


def test_every_profile_validates():
    for name in PROFILE_NAMES:
        profile = load_profile(name)
        assert profile.name == name
        assert all(0 <= layer < profile.n_layers for layer in profile.harvest.layers)


def test_default_profile_is_embedded_smollm2_with_issue_layers():
    profile = load_profile("smollm2")
    assert profile.model is None
    assert profile.harvest.layers == [9, 11, 15, 17, 19]
    assert load_profile("smollm2-pilot").harvest.layers == [15]
    mistral = load_profile("mistral-7b")
    assert (mistral.harvest.layers, mistral.d_model, mistral.sae.n_latents, mistral.sae.k) == (
        [10, 12, 16, 18, 20], 4096, 16384, 32)


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ConfigError, match="smollm2"):
        load_profile("gpt-5")


@pytest.mark.parametrize("override, message", [
    ({"sae": {"n_latents": 0}}, "n_latents"),
    ({"sae": {"k": 5000, "k_start": 5000}}, "exceed the dictionary size"),
    ({"sae": {"k_start": 8}}, "k_start"),
    ({"harvest": {"layers": [30]}}, "out of range"),
    ({"harvest": {"layers": []}}, "layers"),
])
def test_bad_values_fail_with_the_field_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_profile("smollm2").updated(**override)


def test_gates_carry_their_sources():
    gates = load_gates()
    assert gates.sae_quality["r2_min"].value == 0.90
    assert gates.sae_quality["dead_fraction_max"].value == 0.005
    assert all("issue #2" in gate.source for gate in gates.sae_quality.values())


def test_unreadable_gates_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "gates.yaml"
    bad.write_text("sae_quality: {r2_min: {value: high}}")
    with pytest.raises(ConfigError, match="gates file"):
        load_gates(bad)
