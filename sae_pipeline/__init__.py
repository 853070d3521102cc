"""sae-pipeline: SAE-based, feature-steered safety for open-weight chat models."""


def load_model(name_or_path: str | None = None, **kwargs):
    """(model, tokenizer); the embedded SmolLM2-135M-Instruct when no name is given.

    Imported lazily so that `import sae_pipeline.config` stays light (no torch/transformers at import)."""
    from sae_pipeline.model.loading import load_model as load_with_hashes

    loaded = load_with_hashes(name_or_path, **kwargs)
    return loaded.model, loaded.tokenizer


def apply_patch(model, sae_path, **kwargs):
    """Attach steering hooks from an operating point or sidecars (see sae_pipeline.steering.operating_point)."""
    from sae_pipeline.steering.operating_point import apply_patch as apply

    return apply(model, sae_path, **kwargs)


def remove_patch(model) -> None:
    """Detach every steering hook; the model computes exactly as before."""
    from sae_pipeline.steering.runtime import remove_patch as remove

    remove(model)


def apply_behaviors(model, sae_paths_per_behavior, alphas_per_behavior=None, **kwargs):
    """Attach per-behaviour steering from a behaviour release directory or sidecars per behaviour and layer (see
    sae_pipeline.steering.behaviors)."""
    from sae_pipeline.steering.behaviors import apply_behaviors as apply

    return apply(model, sae_paths_per_behavior, alphas_per_behavior, **kwargs)


def apply_fused_behaviors(model, fused_paths_per_layer, alphas_per_behavior=None, **kwargs):
    """Attach one fused side-net per layer (PyTorch .safetensors or ONNX / INT8 .onnx; see
    sae_pipeline.fused.runtime); remove_behaviors detaches them."""
    from sae_pipeline.fused.runtime import apply_fused_behaviors as apply

    return apply(model, fused_paths_per_layer, alphas_per_behavior, **kwargs)


def apply_release(model, bundle_dir, public_key=None, **kwargs):
    """Verify a release bundle (manifest, and signature when a key is given or configured) and attach its best
    path that loads: fused nets, else sidecars, else nothing; returns which and why (sae_pipeline.release.bundle)."""
    from pathlib import Path

    from sae_pipeline.release.bundle import apply_release as apply

    return apply(model, Path(bundle_dir), public_key, **kwargs)


def remove_behaviors(model) -> None:
    """Detach every behaviour steering hook; the model computes exactly as before."""
    remove_patch(model)


__all__ = ["load_model", "apply_patch", "remove_patch", "apply_behaviors", "remove_behaviors", "apply_fused_behaviors",
           "apply_release"]
