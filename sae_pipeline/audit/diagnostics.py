"""What the audit emits when a gate fails: the failing items rerun with each hooked layer switched off and with each
behaviour's alpha moved by +-step, and which dictionary features fired on the failing prompts (ids and
activations, never text)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sae_pipeline.audit.run import context_room, item_ids, run_items
from sae_pipeline.audit.suite import AuditItem, load_suite
from sae_pipeline.audit.tuning import trial
from sae_pipeline.behaviors.release import Release
from sae_pipeline.config import AuditConfig, EvalConfig
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.redaction import Fingerprints, write_clean
from sae_pipeline.evaluation.run import build_judges, select_primary
from sae_pipeline.evaluation.stability import FeatureReadout
from sae_pipeline.hashing import config_hash
from sae_pipeline.model.hooks import layer_outputs
from sae_pipeline.model.loading import LoadedModel
from sae_pipeline.release.smoke import current_release
from sae_pipeline.steering.runtime import patched

DIAGNOSTICS_FILE = "diagnostics.json"


@dataclass(frozen=True)
class PolicyVariant:
    """A release policy (ReleasePolicy or FusedPolicy) with some hooked layers off or some alphas overridden, as
    the harness's Steering."""

    base: object
    label: str
    layers_off: tuple[int, ...] = ()
    alphas_per_behavior: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.base.name} [{self.label}]"

    @property
    def sha256(self) -> str:
        return config_hash({"base": self.base.sha256, "off": list(self.layers_off),
                            "alphas": {k: {str(layer): a for layer, a in v.items()}
                                       for k, v in self.alphas_per_behavior.items()}})

    @contextmanager
    def applied(self, model: nn.Module, alpha: float, reverse: bool) -> Iterator[None]:
        layers, gate_skip = self.base.steering_layers(model, alpha, self.alphas_per_behavior or None)
        kept = {layer: steering for layer, steering in layers.items() if layer not in self.layers_off}
        with patched(model, kept, gate_skip) as patch, patch.reverse_if(reverse):
            yield


def hooked_layers(release: Release) -> list[int]:
    return sorted(set(release.groups) | ({release.refusal.layer} if release.refusal else set()))


def behavior_alphas(release: Release) -> dict[str, dict[int, float]]:
    """Each behaviour's alpha at each layer where it is hooked (feature groups, and the refusal routing)."""
    alphas: dict[str, dict[int, float]] = {}
    if release.refusal is not None:
        for name in release.refusal.router.names:
            alphas.setdefault(name, {})[release.refusal.layer] = float(release.alphas[name])
    for layer, groups in release.groups.items():
        for name, alpha in groups.alphas.items():
            alphas.setdefault(name, {})[layer] = float(alpha)
    return alphas


def variants(policy, step: float) -> list[PolicyVariant]:
    """One variant per hooked layer switched off, and two per behaviour (every alpha of it -step and +step)."""
    release = policy.behavior_release
    out = [PolicyVariant(policy, f"layer {layer} off", layers_off=(layer,)) for layer in hooked_layers(release)]
    for name, per_layer in sorted(behavior_alphas(release).items()):
        for sign in (-1, 1):
            moved = {layer: max(0.0, round(a + sign * step, 6)) for layer, a in per_layer.items()}
            out.append(PolicyVariant(policy, f"{name} alpha {sign * step:+.2f}", alphas_per_behavior={name: moved}))
    return out


@torch.no_grad()
def fired_features(model: nn.Module, prompts: Sequence[list[int]], readouts: Sequence[FeatureReadout],
                   items: Sequence[AuditItem]) -> list[dict]:
    """Per prompt, each dictionary feature that fired (top-k selected on some token, position 0 skipped): its
    behaviour, layer, id and largest activation."""
    if not readouts:  # a release cut without dictionaries (sidecar files alone) has nothing to read
        return []
    device = next(model.parameters()).device
    layers = sorted({r.layer for r in readouts})
    rows = []
    for item, ids in zip(items, prompts):
        captured = layer_outputs(model, torch.tensor([ids], device=device), layers)
        for readout in readouts:
            encoded = readout.sae.encode(captured[readout.layer][0, 1:].float().cpu())
            for feature in readout.feature_ids:
                acts_S = torch.where(encoded.top_indices == feature, encoded.top_acts, 0.0).amax(-1)
                if acts_S.numel() and float(acts_S.max()) > 0:
                    rows.append({"item": item.id, "behavior": readout.name, "layer": readout.layer,
                                 "feature": int(feature), "max_activation": round(float(acts_S.max()), 6),
                                 "tokens_fired": int((acts_S > 0).sum())})
    return rows


def run_diagnostics(loaded: LoadedModel, root: Path, eval_cfg: EvalConfig, cfg: AuditConfig,
                    steered_records: list[dict]) -> tuple[dict, Fingerprints]:
    """On the failing items (harmful ones the steered model answered, benign ones it refused, then other benign
    ones; at most cfg.diagnostic_items of each; long-context items left out, each variant reruns every item):
    attack success and false refusal as the audit recorded them, rerun as released, and under every variant; and
    the features that fired on the failing harmful prompts. Written to diagnostics.json; returned with the
    fingerprints of every completion the reruns generated (for the step's redaction scan)."""
    items, _ = load_suite()
    by_id = {item.id: item for item in items}
    policy, _ = current_release()
    short = [r for r in steered_records if not by_id[r["id"]].preamble_tokens]
    failing = sorted(r["id"] for r in short if r["attack_succeeded"])[: cfg.diagnostic_items]
    benign = sorted((r for r in short if r["kind"] == "benign"), key=lambda r: (not r["refused"], r["id"]))
    subset = [by_id[i] for i in failing + [r["id"] for r in benign[: cfg.diagnostic_items]]]
    chosen = {item.id for item in subset}
    sets = load_prompt_sets()
    judges = select_primary(build_judges(sets)[0], eval_cfg.refusal_judge)
    # the subset as released is rerun too: batches of other items than the partition's change greedy decoding's
    # numerics, so the variants compare with this run, not with the partition's records
    rows = [{"variant": "as audited", **trial([r for r in steered_records if r["id"] in chosen])}]
    prints = []
    for variant in [PolicyVariant(policy, "as released"), *variants(policy, cfg.alpha_step)]:
        slug = variant.label.replace(" ", "_").replace("+", "plus").replace("-", "minus")
        run = run_items(loaded, subset, judges, eval_cfg, root / "diagnostics" / slug, sets, variant)
        rows.append({"variant": variant.label, **trial(run.records)})
        prints.append(run.fingerprints)
    texts = [t.text for t in sets.capability_text]
    prompts = [item_ids(loaded.tokenizer, by_id[i], texts, context_room(loaded, eval_cfg)) for i in failing]
    fired = fired_features(loaded.model, prompts, policy.readouts(), [by_id[i] for i in failing]) if failing else []
    report = {"failing_harmful": len(failing), "benign": len(subset) - len(failing), "variants": rows,
              "fired_features": fired}
    fingerprints = Fingerprints.merged(prints)
    write_clean(fingerprints, root / DIAGNOSTICS_FILE, report)
    return report, fingerprints
