"""Figures for feature discovery: where the ranked latents sit among all latents."""

from __future__ import annotations

import torch

from sae_pipeline.plotting import plt, png


def delta_mu_histogram(delta_mu_F: torch.Tensor, live_F: torch.Tensor, top_n: int, title: str) -> bytes:
    values = delta_mu_F[live_F].float()
    cutoff = values.sort(descending=True).values[min(top_n, len(values)) - 1] if len(values) else 0.0
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(values.numpy(), bins=80, color="#4c72b0", log=True)
    ax.axvline(float(cutoff), color="#c44e52", linestyle="--", label=f"top {top_n}")
    ax.set_xlabel("delta_mu = E[z | harmful] - E[z | benign] (pooled over prompt tokens)")
    ax.set_ylabel("live latents")
    ax.set_title(title)
    ax.legend()
    return png(fig)
