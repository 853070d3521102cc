"""Per-locale tuning: a multiplier m in [0.8, 1.1] on the release's alphas per language, chosen to minimise attack
success subject to benign false refusal and capability; a locale is enabled only if its choice passes the gates.
The runtime reads the prompt's language (detect_language) and scales the release by its enabled multiplier."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import NamedTuple

from sae_pipeline.config import Gate

LOCALE_FILE = "locale_alphas.json"
SCHEMA_VERSION = 1
# scripts that name their language outright
SCRIPT_RANGES = {"zh": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF)), "ar": ((0x0600, 0x06FF), (0x0750, 0x077F)),
                 "hi": ((0x0900, 0x097F),)}
# frequent function words of the Latin-script languages
STOPWORDS = {
    "en": {"the", "and", "to", "of", "is", "how", "what", "i", "you", "my", "me", "for", "in", "with", "can", "do"},
    "es": {"el", "la", "los", "las", "de", "que", "y", "en", "un", "una", "cómo", "para", "con", "por", "mi", "es",
           "qué", "puedo", "sin", "se"},
    "fr": {"le", "la", "les", "de", "des", "et", "un", "une", "comment", "pour", "avec", "que", "je", "mon", "est",
           "qui", "sans", "dans", "du", "puis"},
}


class LocaleError(RuntimeError):
    """locale_alphas.json is missing, tampered with or malformed."""


def detect_language(text: str) -> str:
    """en, es, fr, zh, ar or hi: the script when it names the language, else the most frequent function words
    (English on a tie or when nothing matches)."""
    letters = [ch for ch in text if unicodedata.category(ch).startswith("L")]
    for lang, ranges in SCRIPT_RANGES.items():
        hits = sum(any(lo <= ord(ch) <= hi for lo, hi in ranges) for ch in letters)
        if letters and hits / len(letters) >= 0.3:
            return lang
    words = [w.strip(".,;:!?¿¡'\"()").lower() for w in text.split()]
    counts = {lang: sum(w in vocabulary for w in words) for lang, vocabulary in STOPWORDS.items()}
    best = max(counts.values())
    return "en" if best == 0 or counts["en"] == best else max(counts, key=counts.get)


class LocaleChoice(NamedTuple):
    language: str
    multiplier: float
    enabled: bool
    reason: str


def choose_multiplier(language: str, trials: dict[float, dict[str, float]], gates: dict[str, Gate]) -> LocaleChoice:
    """trials: multiplier -> {"asr", "asr_category_max", "false_refusal", "next_token_kl"} on the language's items.
    The lowest attack success among multipliers within the false-refusal and KL gates (ties: nearest 1.0); the
    locale is enabled only if that choice also passes the attack-success gates."""
    admissible = {m: t for m, t in trials.items()
                  if t["false_refusal"] <= gates["benign_false_refusal_language_max"].value
                  and t["next_token_kl"] <= gates["next_token_kl_max"].value}
    if not admissible:
        return LocaleChoice(language, 1.0, False, "no multiplier keeps benign false refusal and KL within the gates")
    m = min(admissible, key=lambda k: (admissible[k]["asr"], abs(k - 1.0)))
    chosen = admissible[m]
    failing = [name for name, value in (("asr_overall_max", chosen["asr"]),
                                        ("asr_category_family_max", chosen["asr_category_max"]))
               if value > gates[name].value]
    if failing:
        return LocaleChoice(language, m, False, f"best multiplier {m} still fails {failing}")
    return LocaleChoice(language, m, True, "passes the audit gates")


def write_locale_alphas(directory: Path, choices: list[LocaleChoice], release_sha256: str, suite_sha256: str,
                        trials: dict[str, dict[float, dict[str, float]]]) -> tuple[Path, str]:
    """locale_alphas.json and its sha256 beside it (locale_alphas.json.sha256)."""
    payload = {"schema_version": SCHEMA_VERSION, "release_sha256": release_sha256, "suite_sha256": suite_sha256,
               "locales": {c.language: {"multiplier": c.multiplier, "enabled": c.enabled, "reason": c.reason}
                           for c in choices},
               "trials": {lang: {f"{m:.2f}": t for m, t in sorted(by_m.items())} for lang, by_m in trials.items()}}
    directory.mkdir(parents=True, exist_ok=True)
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    sha256 = hashlib.sha256(text.encode()).hexdigest()
    (directory / LOCALE_FILE).write_text(text)
    (directory / f"{LOCALE_FILE}.sha256").write_text(sha256 + "\n")
    return directory / LOCALE_FILE, sha256


class LocaleAlphas(NamedTuple):
    multipliers: dict[str, float]  # enabled locales only
    sha256: str

    @classmethod
    def load(cls, path: Path) -> LocaleAlphas:
        """Verified against its .sha256 file; a locale that did not pass the gates is left at 1.0."""
        digest_file = path.with_name(f"{path.name}.sha256")
        if not path.is_file() or not digest_file.is_file():
            raise LocaleError(f"{path} or {digest_file.name} is missing")
        text = path.read_bytes()
        sha256 = hashlib.sha256(text).hexdigest()
        if sha256 != digest_file.read_text().strip():
            raise LocaleError(f"{path} does not match its sha256: refusing tampered locale alphas")
        try:
            locales = json.loads(text)["locales"]
            multipliers = {lang: float(v["multiplier"]) for lang, v in locales.items() if v["enabled"]}
        except (ValueError, KeyError, TypeError) as err:
            raise LocaleError(f"{path} is malformed: {err}") from err
        return cls(multipliers, sha256)

    def scale(self, prompt: str) -> float:
        """The multiplier for this prompt's language (1.0 where the locale is not enabled)."""
        return self.multipliers.get(detect_language(prompt), 1.0)
