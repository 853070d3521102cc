"""Figures for the behaviour dictionaries: what the cross-talk filter kept and how close the behaviours sit."""

from __future__ import annotations

import numpy as np
import torch

from sae_pipeline.plotting import plt, png


def crosstalk_figure(layer: int, pair_max_cos: dict[str, float], kept: dict[str, int], flagged: dict[str, int],
                     keep: int, cos_max: float, flagged_cos_max: float) -> bytes:
    """Left: max |cos| between each pair of behaviours' final directions; right: features kept per behaviour
    (clean and flagged) against the count asked for."""
    names = list(kept)
    matrix = np.full((len(names), len(names)), np.nan)
    for pair, value in pair_max_cos.items():
        a, b = pair.split("|")
        matrix[names.index(a), names.index(b)] = matrix[names.index(b), names.index(a)] = value
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    top = max(flagged_cos_max, float(np.nanmax(matrix, initial=0)))
    shown = left.imshow(matrix, cmap="viridis", vmin=0, vmax=top)
    left.set_xticks(range(len(names)), names, rotation=45, ha="right")
    left.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if not np.isnan(matrix[i, j]):
                left.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=7,
                          color="black" if matrix[i, j] > top / 2 else "white")
    left.set_title(f"layer {layer}: max |cos| between behaviours\n(gates {cos_max:g}, flagged {flagged_cos_max:g})")
    fig.colorbar(shown, ax=left, fraction=0.046, pad=0.02)
    clean = [kept[n] - flagged[n] for n in names]
    right.bar(names, clean, color="#4c72b0", label="clean")
    right.bar(names, [flagged[n] for n in names], bottom=clean, color="#dd8452", label="flagged (deflated)")
    right.axhline(keep, color="#c44e52", linestyle="--", label=f"asked for ({keep})")
    right.set_ylabel("features kept")
    right.tick_params(axis="x", rotation=45)
    right.legend(fontsize=8)
    right.set_title("kept per behaviour")
    return png(fig)


def ranking_scatter(delta_mu_F: torch.Tensor, probe_weight_F: torch.Tensor, live: list[int], top: list[int],
                    title: str) -> bytes:
    """Every live latent by |delta_mu| and |probe weight| (the two ranked quantities), the top-ranked highlighted."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for ids, colour, label in ((live, "#bbbbbb", "live latents"), (top, "#c44e52", f"top {len(top)}")):
        ax.scatter(delta_mu_F[ids].abs().numpy(), probe_weight_F[ids].abs().numpy(), s=6, color=colour, label=label)
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_xlabel("|delta_mu| (behaviour vs benign, pooled z)")
    ax.set_ylabel("|standardised probe weight|")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png(fig)
