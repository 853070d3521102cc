"""Figures for the fused nets: how distillation went."""

from __future__ import annotations

from sae_pipeline.plotting import plt, png


def distillation_png(losses: list[float], layer: int) -> bytes:
    """The per-step loss (the batch's squared error over its squared target norm), log scale."""
    fig, axis = plt.subplots(figsize=(6, 3.2), layout="constrained")
    if losses:
        axis.plot(range(1, len(losses) + 1), losses, linewidth=0.8)
        axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("relative squared error")
    axis.set_title(f"layer {layer}: fused net distillation (step 0 = the exact fold)")
    return png(fig)
