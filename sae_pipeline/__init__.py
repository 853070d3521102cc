"""sae-pipeline: SAE-based, feature-steered safety for open-weight chat models."""


def load_model(name_or_path: str | None = None, **kwargs):
    """(model, tokenizer); the embedded SmolLM2-135M-Instruct when no name is given.

    Imported lazily so that `import sae_pipeline.config` stays light (no torch/transformers at import)."""
    from sae_pipeline.model.loading import load_model as load_with_hashes

    loaded = load_with_hashes(name_or_path, **kwargs)
    return loaded.model, loaded.tokenizer


__all__ = ["load_model"]
