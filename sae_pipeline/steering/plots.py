"""The steering A/B table (baseline vs steered, per group, with CIs) and the alpha curves, for the Dagster UI."""

from __future__ import annotations

from sae_pipeline.plotting import plt, png

# (label, path to the {group: rate} block or to one rate) in metrics.json
_RATE_BLOCKS = (("harmful refused", ("harmful_refusal_rate", "per_category")),
                ("harmful refused", ("harmful_refusal_rate", "overall")),
                ("harmful completed", ("harmful_completion_rate", "overall")),
                ("benign falsely refused", ("benign_false_refusal_rate", "per_domain")),
                ("benign falsely refused", ("benign_false_refusal_rate", "overall")),
                ("benign falsely refused", ("benign_false_refusal_rate", "borderline")),
                ("task accuracy", ("capability", "task_accuracy", "overall")))
_CURVES = (("harmful refused", ("harmful_refusal_rate", "overall")),
           ("harmful completed", ("harmful_completion_rate", "overall")),
           ("benign falsely refused", ("benign_false_refusal_rate", "overall")),
           ("borderline falsely refused", ("benign_false_refusal_rate", "borderline")),
           ("task accuracy", ("capability", "task_accuracy", "overall")))


def _at(metrics: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        metrics = metrics[key]
    return metrics


def _groups(metrics: dict, path: tuple[str, ...]) -> dict[str, dict]:
    block = _at(metrics, path)
    return {path[-1]: block} if "rate" in block else block


def ab_rows(baseline: dict, steered: dict) -> list[dict]:
    """One row per (metric, group): both rates with their CIs and the change."""
    rows = []
    for label, path in _RATE_BLOCKS:
        for group, base in _groups(baseline, path).items():
            after = _groups(steered, path)[group]
            rows.append({"metric": label, "group": group, "n": base["n"],
                         "baseline": base["rate"], "baseline_ci": f"[{base['ci_low']:.3f}, {base['ci_high']:.3f}]",
                         "steered": after["rate"], "steered_ci": f"[{after['ci_low']:.3f}, {after['ci_high']:.3f}]",
                         "change": round(after["rate"] - base["rate"], 6)})
    for name in ("perplexity", "next_token_kl"):
        rows.append({"metric": name, "group": "capability", "n": 0, "baseline": baseline["capability"][name],
                     "baseline_ci": "", "steered": steered["capability"][name], "steered_ci": "",
                     "change": round(steered["capability"][name] - baseline["capability"][name], 6)})
    return rows


def alpha_curves_png(by_alpha: dict[float, dict], reverse: dict, reverse_alpha: float, chosen: float) -> bytes:
    """Each rate against alpha with its CI band; the chosen alpha marked; reverse-safety as crosses at its alpha."""
    alphas = sorted(by_alpha)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for (label, path), color in zip(_CURVES, ("#c44e52", "#8172b2", "#4c72b0", "#55a868", "#937860")):
        rates = [_at(by_alpha[a], path) for a in alphas]
        ax.plot(alphas, [r["rate"] for r in rates], marker="o", color=color, label=label)
        ax.fill_between(alphas, [r["ci_low"] for r in rates], [r["ci_high"] for r in rates], color=color, alpha=0.15)
        ax.plot([reverse_alpha], [_at(reverse, path)["rate"]], marker="x", markersize=9, color=color,
                linestyle="none")
    ax.axvline(chosen, color="black", linestyle="--", linewidth=1, label=f"operating point (alpha {chosen:.2f})")
    ax.set_xlabel("alpha (feature rule alpha; refusal beta = alpha x refusal_beta)")
    ax.set_ylabel("rate (95% bootstrap CI)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("steering strength sweep, held-out sets (x: reverse-safety)", fontsize=10)
    ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    return png(fig)
