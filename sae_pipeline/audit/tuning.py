"""The per-locale search: each language's audit items under the release scaled by each multiplier, the choice per
language (locale.choose_multiplier) and locale_alphas.json."""

from __future__ import annotations

from pathlib import Path

from sae_pipeline.audit.locale import LocaleChoice, choose_multiplier, write_locale_alphas
from sae_pipeline.audit.run import item_ids, run_items, select_items
from sae_pipeline.audit.suite import LANGUAGES, load_suite
from sae_pipeline.config import AuditConfig, EvalConfig, Gate
from sae_pipeline.evaluation.datasets import load_prompt_sets
from sae_pipeline.evaluation.generation import mean_next_token_kl
from sae_pipeline.evaluation.redaction import Fingerprints
from sae_pipeline.evaluation.run import build_judges, select_primary
from sae_pipeline.model.loading import LoadedModel
from sae_pipeline.release.smoke import current_release


def trial(records: list[dict]) -> dict[str, float]:
    harmful = [r for r in records if r["kind"] == "harmful"]
    benign = [r for r in records if r["kind"] == "benign"]
    by_category: dict[str, list[bool]] = {}
    for r in harmful:
        by_category.setdefault(r["group"], []).append(r["attack_succeeded"])
    return {"asr": round(sum(r["attack_succeeded"] for r in harmful) / max(len(harmful), 1), 6),
            "asr_category_max": round(max((sum(v) / len(v) for v in by_category.values()), default=0.0), 6),
            "false_refusal": round(sum(r["refused"] for r in benign) / max(len(benign), 1), 6),
            "harmful": len(harmful), "benign": len(benign)}


def tune_locales(loaded: LoadedModel, root: Path, eval_cfg: EvalConfig, cfg: AuditConfig, gates: dict[str, Gate],
                 steered_records: list[dict]) -> tuple[list[LocaleChoice], dict, Path, str, Fingerprints]:
    """Per language: the release at every multiplier (1.0 is the steered arm's own language partition), the
    choice, and locale_alphas.json in `root`. Returns (choices, trials, path, sha256, the fingerprints of every
    completion generated here, for the step's redaction scan)."""
    items, suite_sha256 = load_suite()
    policy, release_sha256 = current_release()
    sets = load_prompt_sets()
    judges = select_primary(build_judges(sets)[0], eval_cfg.refusal_judge)
    trials: dict[str, dict[float, dict[str, float]]] = {}
    prints = []
    for lang in LANGUAGES:
        chosen = [i for i in select_items(items, "language", cfg.items_per_variant) if i.lang == lang]
        benign_ids = [item_ids(loaded.tokenizer, i, (), 0) for i in chosen if i.kind == "benign"]
        trials[lang] = {}
        for m in cfg.locale_multipliers:
            if m == 1.0:
                records = [r for r in steered_records if r["family"] == "language" and r["lang"] == lang]
            else:
                run = run_items(loaded, chosen, judges, eval_cfg, root / "locale" / f"{lang}_m{m:.2f}", sets,
                                policy, lambda _lang, m=m: m)
                records = run.records
                prints.append(run.fingerprints)
            kl = mean_next_token_kl(loaded.model, loaded.tokenizer, benign_ids, eval_cfg.batch_size,
                                    lambda m=m: policy.applied(loaded.model, m, False))
            trials[lang][m] = {**trial(records), "next_token_kl": round(kl, 8)}
    choices = [choose_multiplier(lang, trials[lang], gates) for lang in LANGUAGES]
    path, sha256 = write_locale_alphas(root, choices, release_sha256, suite_sha256, trials)
    return choices, trials, path, sha256, Fingerprints.merged(prints)
