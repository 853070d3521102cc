"""sae-pipeline: SAE-based, feature-steered safety for open-weight chat models."""

from sae_pipeline.model.loading import load_model as _load_model


def load_model(name_or_path: str | None = None, **kwargs):
    """(model, tokenizer); the embedded SmolLM2-135M-Instruct when no name is given."""
    loaded = _load_model(name_or_path, **kwargs)
    return loaded.model, loaded.tokenizer


__all__ = ["load_model"]
