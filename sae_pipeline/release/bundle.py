"""The release bundle (issue #8): what was evaluated, in one directory, pinned by a manifest and optionally signed.

`write_bundle` copies the behaviour release, the fused release (when there is one), the gates file and the
metrics that evaluated them into one directory and writes `manifest.json`: the sha256 and size of every file, the
model and tokenizer hashes, the package version. `sign_bundle` signs the manifest's bytes with an ed25519 private
key (`manifest.sig`); keys come from files or environment variables and never live in the repository.
`verify_bundle` fails closed (`BundleError`) on a missing, changed or unexpected file, and, when a public key is
given or configured (`SAE_PIPELINE_VERIFY_KEY`: a PEM file's path or the PEM text), on a missing or bad signature.
`apply_release` verifies the bundle and then applies the best path that loads: fused nets -> sidecars -> unsteered,
saying which and why."""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NamedTuple

from torch import nn

from sae_pipeline.hashing import file_sha256

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
VERIFY_KEY_ENV, SIGNING_KEY_ENV = "SAE_PIPELINE_VERIFY_KEY", "SAE_PIPELINE_SIGNING_KEY"
FUSED, BEHAVIORS = "fused", "behaviors"  # the bundle's release directories


class BundleError(RuntimeError):
    """A release bundle is incomplete, changed, carries extra files, or its signature does not verify."""


def _package_version() -> str:
    try:
        return version("sae-pipeline")
    except PackageNotFoundError:
        return "unknown"


def write_bundle(directory: Path, behavior_release: Path, fused_release: Path | None, files: dict[str, Path],
                 model_hash: str, tokenizer_hash: str) -> dict:
    """A fresh bundle in `directory`: the releases (as `behaviors/`, `fused/`), `files` ({name in the bundle:
    source}: gates, metrics) and the manifest."""
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(behavior_release, directory / BEHAVIORS)
    if fused_release is not None:
        shutil.copytree(fused_release, directory / FUSED)
    for name, source in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, directory / name)
    listed = sorted(p for p in directory.rglob("*") if p.is_file())
    manifest = {"version": 1, "package_version": _package_version(), "model_hash": model_hash,
                "tokenizer_hash": tokenizer_hash, "fused": fused_release is not None,
                "files": {str(p.relative_to(directory)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                          for p in listed}}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def _key_text(value: str) -> bytes:
    """A PEM key from an environment variable or argument holding the PEM text or a file's path."""
    return value.encode() if value.lstrip().startswith("-----BEGIN") else Path(value).read_bytes()


def sign_bundle(directory: Path, private_key: str | None = None) -> Path:
    """Sign the manifest with an ed25519 private key (PEM text or path; default SAE_PIPELINE_SIGNING_KEY)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    source = private_key or os.environ.get(SIGNING_KEY_ENV)
    if not source:
        raise BundleError(f"no signing key: pass one or set {SIGNING_KEY_ENV} (a PEM file's path or its text)")
    key = load_pem_private_key(_key_text(source), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError("the signing key is not an ed25519 private key")
    path = directory / SIGNATURE
    path.write_bytes(key.sign((directory / MANIFEST).read_bytes()))
    return path


def verify_bundle(directory: Path, public_key: str | None = None) -> dict:
    """The manifest, after every check: each listed file present with its sha256, nothing unlisted (beyond the
    manifest and its signature), and the signature when a public key is given or SAE_PIPELINE_VERIFY_KEY is set."""
    try:
        manifest_bytes = (directory / MANIFEST).read_bytes()
        manifest = json.loads(manifest_bytes)
        listed = manifest["files"]
    except (OSError, ValueError, KeyError) as err:
        raise BundleError(f"{directory}: no readable {MANIFEST} ({err})") from err
    source = public_key or os.environ.get(VERIFY_KEY_ENV)
    if source:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        key = load_pem_public_key(_key_text(source))
        if not isinstance(key, Ed25519PublicKey):
            raise BundleError("the verification key is not an ed25519 public key")
        if not (directory / SIGNATURE).exists():
            raise BundleError(f"{directory}: a verification key is configured but the manifest is not signed")
        try:
            key.verify((directory / SIGNATURE).read_bytes(), manifest_bytes)
        except InvalidSignature as err:
            raise BundleError(f"{directory}: the manifest's signature does not verify") from err
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - {MANIFEST, SIGNATURE}
    missing, extra = sorted(set(listed) - present), sorted(present - set(listed))
    changed = sorted(name for name in set(listed) & present
                     if file_sha256(directory / name) != listed[name]["sha256"])
    if missing or extra or changed:
        raise BundleError(f"{directory} does not match its manifest: missing {missing}, unexpected {extra}, "
                          f"changed {changed}")
    return manifest


class Applied(NamedTuple):
    path: str  # "fused", "sidecars" or "unsteered"
    reasons: list[str]  # why each better path was not taken


def apply_release(model: nn.Module, directory: Path, public_key: str | None = None, backend: str | None = None,
                  accept_failed_gates: bool = False, scale: float = 1.0) -> Applied:
    """Verify the bundle (BundleError when it fails: nothing is applied), then attach the best path that loads:
    the fused nets, else the behaviour sidecars, else nothing (the unsteered model). scale multiplies every alpha
    (per request: LocaleAlphas.scale(prompt)). remove_behaviors(model) detaches whatever was attached."""
    from sae_pipeline.fused.net import FusedNetError
    from sae_pipeline.fused.runtime import apply_fused_behaviors
    from sae_pipeline.steering.behaviors import apply_behaviors
    from sae_pipeline.steering.runtime import SteeringError
    from sae_pipeline.steering.sidecar import SidecarError

    manifest = verify_bundle(directory, public_key)
    reasons = []
    if manifest["fused"]:
        try:
            apply_fused_behaviors(model, directory / FUSED, backend=backend, accept_failed_gates=accept_failed_gates,
                                  scale=scale)
            return Applied("fused", reasons)
        except (SidecarError, FusedNetError, OSError, RuntimeError) as err:  # RuntimeError: SteeringError, ORT
            reasons.append(f"fused: {err}")
    else:
        reasons.append("fused: the bundle holds no fused release")
    try:
        apply_behaviors(model, directory / BEHAVIORS, accept_failed_gates=accept_failed_gates, scale=scale)
        return Applied("sidecars", reasons)
    except (SidecarError, SteeringError, OSError) as err:
        reasons.append(f"sidecars: {err}")
    return Applied("unsteered", reasons)
