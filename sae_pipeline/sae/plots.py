"""PNG figures for people: liveness histogram and training curve (rendered in the Dagster UI)."""

from __future__ import annotations

import torch

from sae_pipeline.plotting import plt, png


def liveness_histogram(firing_frequency_F: torch.Tensor, title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    freq = firing_frequency_F.clamp_min(1e-7).log10()
    ax.hist(freq.numpy(), bins=60, color="#4c72b0")
    ax.set_xlabel("log10 firing frequency on held-out tokens (dead latents at -7)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    return png(fig)


def training_curve(history: list[dict], title: str) -> bytes:
    fig, ax = plt.subplots(figsize=(6, 3.2))
    tokens = [row["tokens"] for row in history]
    ax.plot(tokens, [row["fvu"] for row in history], label="train FVU (whitened)")
    ax.plot(tokens, [row["dead_fraction"] for row in history], label="dead fraction")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.legend()
    ax.set_title(title)
    return png(fig)
