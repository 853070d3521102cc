"""Figures for the evaluation: rates with their bootstrap CIs, as PNG bytes for the Dagster UI."""

from __future__ import annotations

from sae_pipeline.plotting import plt, png


def rates_png(groups: dict[str, dict[str, dict]], title: str) -> bytes:
    """Horizontal bars per (panel, group) with 95% CI whiskers; groups: {panel: {group: rate_with_ci dict}}."""
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (panel, rates) in zip(axes[0], groups.items()):
        names = [name for name, r in rates.items() if r["rate"] is not None]
        values = [rates[n]["rate"] for n in names]
        low = [rates[n]["rate"] - rates[n]["ci_low"] for n in names]
        high = [rates[n]["ci_high"] - rates[n]["rate"] for n in names]
        ax.barh(names, values, xerr=[low, high], color="#4c72b0", capsize=3)
        ax.set_xlim(0, 1)
        ax.set_title(panel, fontsize=10)
        ax.invert_yaxis()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return png(fig)
