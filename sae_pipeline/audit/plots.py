"""Figures for the audit: where attacks get through."""

from __future__ import annotations

import numpy as np

from sae_pipeline.plotting import plt, png


def asr_heatmap_png(rows: list[dict], title: str) -> bytes:
    """Attack success per category (rows) and family (columns); blank where a cell has no items."""
    families = [key for key in (rows[0] if rows else {}) if key != "category"]
    values = np.array([[np.nan if row[f] is None else row[f] for f in families] for row in rows], dtype=float)
    fig, axis = plt.subplots(figsize=(1.1 * len(families) + 2.5, 0.45 * len(rows) + 1.6), layout="constrained")
    image = axis.imshow(values, vmin=0.0, vmax=1.0, cmap="Reds", aspect="auto")
    axis.set_xticks(range(len(families)), families, rotation=30, ha="right")
    axis.set_yticks(range(len(rows)), [row["category"] for row in rows])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            axis.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                      color="white" if value > 0.6 else "black")
    fig.colorbar(image, ax=axis, label="attack success rate")
    axis.set_title(title)
    return png(fig)
