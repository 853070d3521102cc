"""Small tensor files pinned by sha256: write returns the hash, read verifies it (fail closed)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sae_pipeline.hashing import file_sha256


class TensorFileError(RuntimeError):
    """A pinned tensor file is missing, unreadable, or not the file its sha256 names."""


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> str:
    save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, path)
    return file_sha256(path)


def load_tensors(path: Path, sha256: str) -> dict[str, torch.Tensor]:
    try:
        if file_sha256(path) != sha256:
            raise TensorFileError(f"{path} does not match its recorded sha256")
        return load_file(path)
    except (OSError, SafetensorError) as err:
        raise TensorFileError(f"cannot read {path}: {err}") from err
