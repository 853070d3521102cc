"""The release bundle: manifest, ed25519 signature, fail-closed verification, and the fallback order
fused -> sidecars -> unsteered."""

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sae_pipeline.config import GATES_FILE
from sae_pipeline.release.bundle import BundleError, apply_release, sign_bundle, verify_bundle, write_bundle
from sae_pipeline_tests.test_fused import _fused_release


def _keys() -> tuple[str, str]:
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return private, public


def _bundle(tmp_path, with_fused: bool = True):
    fused, _ = _fused_release(tmp_path / "made")
    directory = tmp_path / "bundle"
    manifest = write_bundle(directory, tmp_path / "made" / "behaviors", fused if with_fused else None,
                            {"gates.yaml": GATES_FILE}, "model-sha", "tokenizer-sha")
    return directory, manifest


def test_a_bundle_verifies_and_fails_closed_on_any_change(tmp_path, monkeypatch):
    directory, manifest = _bundle(tmp_path)
    assert manifest["fused"] and manifest["model_hash"] == "model-sha" and "gates.yaml" in manifest["files"]
    assert {"fused/fused_config.json", "behaviors/multi_behavior_config.json"} <= set(manifest["files"])
    assert verify_bundle(directory) == manifest
    net = directory / "fused" / "fused_l2.onnx"
    original = net.read_bytes()
    net.write_bytes(original + b"\0")
    with pytest.raises(BundleError, match=r"changed \['fused/fused_l2.onnx'\]"):
        verify_bundle(directory)
    net.write_bytes(original)
    (directory / "notes.txt").write_text("not in the manifest")
    with pytest.raises(BundleError, match=r"unexpected \['notes.txt'\]"):
        verify_bundle(directory)
    (directory / "notes.txt").unlink()
    (directory / "gates.yaml").unlink()
    with pytest.raises(BundleError, match=r"missing \['gates.yaml'\]"):
        verify_bundle(directory)


def test_a_signed_manifest_verifies_with_its_key_and_only_with_it(tmp_path, monkeypatch):
    directory, _ = _bundle(tmp_path)
    private, public = _keys()
    with pytest.raises(BundleError, match="no signing key"):
        sign_bundle(directory)
    monkeypatch.setenv("SAE_PIPELINE_VERIFY_KEY", public)
    with pytest.raises(BundleError, match="the manifest is not signed"):
        verify_bundle(directory)
    key_file = tmp_path / "signing.pem"  # keys from a file or from the environment, never from the repository
    key_file.write_text(private)
    monkeypatch.setenv("SAE_PIPELINE_SIGNING_KEY", str(key_file))
    sign_bundle(directory)
    assert verify_bundle(directory)["fused"]
    _, stranger = _keys()
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(directory, stranger)
    manifest = directory / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"model-sha"', '"other-sha"'))
    with pytest.raises(BundleError, match="signature does not verify"):
        verify_bundle(directory)


def test_apply_release_falls_back_from_fused_to_sidecars_to_unsteered(tiny, tmp_path, monkeypatch):
    from sae_pipeline import apply_fused_behaviors, remove_behaviors

    ids = torch.tensor([tiny.tokenizer("steer these words, please").input_ids])

    def logits() -> torch.Tensor:
        with torch.no_grad():
            return tiny.model(input_ids=ids).logits

    clean = logits()
    directory, _ = _bundle(tmp_path)
    applied = apply_release(tiny.model, directory)
    steered = logits()
    remove_behaviors(tiny.model)
    apply_fused_behaviors(tiny.model, directory / "fused")
    assert applied.path == "fused" and applied.reasons == [] and torch.equal(steered, logits())
    assert not torch.allclose(steered, clean, atol=1e-4)
    monkeypatch.setenv("STEER_ENABLE", "0")  # the kill switch: hooks stay attached, inert
    assert torch.equal(logits(), clean)
    monkeypatch.delenv("STEER_ENABLE")
    remove_behaviors(tiny.model)
    # the fused backend asked for failed its gates: the sidecars take over, saying why
    applied = apply_release(tiny.model, directory, backend="int8")
    assert applied.path == "sidecars" and "int8 nets failed their error gates" in applied.reasons[0]
    assert torch.allclose(logits(), steered, atol=1e-4)  # the sidecars steer as the nets they fold
    remove_behaviors(tiny.model)
    # a bundle without fused nets, and the model already steered: nothing more is attached
    bare, _ = _bundle(tmp_path / "bare", with_fused=False)
    apply_fused_behaviors(tiny.model, directory / "fused")
    applied = apply_release(tiny.model, bare)
    assert applied.path == "unsteered" and "no fused release" in applied.reasons[0]
    assert "already patched" in applied.reasons[1]
    remove_behaviors(tiny.model)
    assert torch.equal(logits(), clean)
    # a changed bundle is refused before anything is attached
    (bare / "gates.yaml").write_text("changed")
    with pytest.raises(BundleError):
        apply_release(tiny.model, bare)
    assert torch.equal(logits(), clean)
