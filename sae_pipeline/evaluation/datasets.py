"""Frozen, hash-locked evaluation datasets under data/: schemas, loading, the lock and split hygiene.

Prompts are requests only; no model output to a harmful prompt is ever stored here. `datasets.lock` records the
sha256 of every file and split; a file that changes without the lock being updated fails closed."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from sae_pipeline.config import HARM_CATEGORIES, Gate, data_dir as default_data_dir

BENIGN_DOMAINS = ("general", "coding", "math", "legal", "medical", "finance", "borderline")
LOCK_FILE = "datasets.lock"


class DatasetError(ValueError):
    """A dataset file is missing, malformed, or does not match datasets.lock; the message names the file."""


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str
    source: str


class HarmfulPrompt(_Record):
    category: Literal["chem", "bio", "cyber", "violence", "self_harm", "fraud"]
    split: Literal["tuning", "heldout"]
    prompt: str


class BenignPrompt(_Record):
    domain: Literal["general", "coding", "math", "legal", "medical", "finance", "borderline"]
    split: Literal["tuning", "heldout"]
    prompt: str


class CleanQuestion(_Record):
    domain: Literal["chemistry", "biology", "security"]
    question: str
    answer: str


class CapabilityText(_Record):
    topic: str
    text: str


class CapabilityTask(_Record):
    kind: Literal["arithmetic", "factual"]
    question: str
    answers: list[str]


class JudgeExample(_Record):
    label: Literal["refusal", "compliance"]
    split: Literal["train", "test"]
    text: str


class _FileSpec(NamedTuple):
    path: str
    record: type[_Record]
    text_field: str  # the field whose normalised sha256 decides duplicates and split overlap


FILES: dict[str, _FileSpec] = {
    "harmful": _FileSpec("prompts/harmful.jsonl", HarmfulPrompt, "prompt"),
    "benign": _FileSpec("prompts/benign.jsonl", BenignPrompt, "prompt"),
    "clean_domain_qa": _FileSpec("prompts/clean_domain_qa.jsonl", CleanQuestion, "question"),
    "capability_text": _FileSpec("capability/heldout_text.jsonl", CapabilityText, "text"),
    "capability_tasks": _FileSpec("capability/tasks.jsonl", CapabilityTask, "question"),
    "judge_labelled": _FileSpec("judge/refusal_labelled.jsonl", JudgeExample, "text"),
}


def normalise(text: str) -> str:
    """NFKC, lower case, whitespace collapsed: two prompts equal under this are the same prompt."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip().lower()


def text_sha256(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


class PromptSets(NamedTuple):
    harmful: list[HarmfulPrompt]
    benign: list[BenignPrompt]
    clean_domain_qa: list[CleanQuestion]
    capability_text: list[CapabilityText]
    capability_tasks: list[CapabilityTask]
    judge_labelled: list[JudgeExample]
    dataset_hash: str  # sha256 of datasets.lock: names every byte of every file


def _read_bytes(data_dir: Path, name: str) -> bytes:
    path = data_dir / FILES[name].path
    if not path.is_file():
        raise DatasetError(f"dataset {name!r}: {path} is missing")
    return path.read_bytes()


def _parse_records(data_dir: Path, name: str, raw: bytes) -> list[_Record]:
    spec = FILES[name]
    path = data_dir / spec.path
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"dataset {name!r}: {path} is not UTF-8 ({err})") from err
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(spec.record.model_validate_json(line))
        except ValidationError as err:
            raise DatasetError(f"dataset {name!r}: {path}:{number} is not a valid {spec.record.__name__}: {err}") \
                from err
    if not records:
        raise DatasetError(f"dataset {name!r}: {path} holds no records")
    return records


def _split_of(record: _Record) -> str:
    return getattr(record, "split", "all")


def _lock_entry(name: str, raw: bytes, records: list[_Record]) -> dict:
    spec = FILES[name]
    splits: dict[str, list[str]] = {}
    for record in records:
        splits.setdefault(_split_of(record), []).append(text_sha256(getattr(record, spec.text_field)))
    return {
        "path": spec.path,
        "sha256": hashlib.sha256(raw).hexdigest(),
        "records": len(records),
        "splits": {split: {"records": len(hashes), "sha256": hashlib.sha256("".join(sorted(hashes)).encode())
                           .hexdigest()} for split, hashes in sorted(splits.items())},
    }


def _read_all(data_dir: Path) -> dict[str, tuple[bytes, list[_Record]]]:
    """Every file read once: the lock is computed from, and the records parsed from, the same bytes."""
    out = {}
    for name in FILES:
        raw = _read_bytes(data_dir, name)
        out[name] = (raw, _parse_records(data_dir, name, raw))
    return out


def _lock_of(files: dict[str, tuple[bytes, list[_Record]]]) -> dict:
    return {"version": 1, "files": {name: _lock_entry(name, raw, records) for name, (raw, records) in files.items()}}


def compute_lock(data_dir: Path | None = None) -> dict:
    return _lock_of(_read_all(data_dir or default_data_dir()))


def write_lock(data_dir: Path | None = None) -> Path:
    """Re-lock after a reviewed change to a dataset file (the only way to make a changed file loadable)."""
    data_dir = data_dir or default_data_dir()
    path = data_dir / LOCK_FILE
    path.write_text(json.dumps(compute_lock(data_dir), indent=2, sort_keys=True) + "\n")
    return path


def lock_mismatches(data_dir: Path | None = None, files: dict | None = None) -> list[str]:
    """Every way the files differ from datasets.lock, in words; empty when they match."""
    data_dir = data_dir or default_data_dir()
    path = data_dir / LOCK_FILE
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        locked = json.loads(path.read_text())["files"]
        if not all(isinstance(v, dict) and {"path", "sha256", "splits"} <= set(v) for v in locked.values()):
            raise ValueError("every entry needs path, sha256 and splits")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{path} is not a valid lock file: {err}"]
    current = _lock_of(files if files is not None else _read_all(data_dir))["files"]
    problems = [f"{name}: not in the lock" for name in current if name not in locked]
    problems += [f"{name}: in the lock but not a known dataset" for name in locked if name not in current]
    for name in set(current) & set(locked):
        now, then = current[name], locked[name]
        if now["sha256"] != then["sha256"]:
            problems.append(f"{name}: {now['path']} changed (sha256 {now['sha256'][:12]} vs locked "
                            f"{then['sha256'][:12]})")
        for split in sorted(set(now["splits"]) | set(then["splits"])):
            if now["splits"].get(split) != then["splits"].get(split):
                problems.append(f"{name}: split {split!r} differs from the lock")
    return problems


def split_overlaps(sets: PromptSets) -> list[str]:
    """Duplicates within a file, prompts shared between splits, and prompts both harmful and benign."""
    problems = []
    for name in ("harmful", "benign", "clean_domain_qa", "capability_tasks", "judge_labelled"):
        field = FILES[name].text_field
        records = getattr(sets, name)
        counts = Counter(text_sha256(getattr(r, field)) for r in records)
        problems += [f"{name}: {n} records share the text of {r.id}" for r in records
                     if (n := counts[text_sha256(getattr(r, field))]) > 1]
        by_split: dict[str, set[str]] = {}
        for record in records:
            by_split.setdefault(_split_of(record), set()).add(text_sha256(getattr(record, field)))
        splits = sorted(by_split)
        for i, first in enumerate(splits):
            for second in splits[i + 1:]:
                if shared := by_split[first] & by_split[second]:
                    problems.append(f"{name}: {len(shared)} texts in both {first!r} and {second!r}")
    harmful = {text_sha256(r.prompt) for r in sets.harmful}
    if both := harmful & {text_sha256(r.prompt) for r in sets.benign}:
        problems.append(f"{len(both)} prompts are labelled both harmful and benign")
    return problems


def size_shortfalls(sets: PromptSets, gates: dict[str, Gate]) -> list[str]:
    counts = Counter((r.category, r.split) for r in sets.harmful)
    problems = []
    for category in HARM_CATEGORIES:
        for split, gate in (("tuning", "harmful_tuning_per_category_min"),
                            ("heldout", "harmful_heldout_per_category_min")):
            if counts[category, split] < gates[gate].value:
                problems.append(f"harmful {category}/{split}: {counts[category, split]} < {gates[gate].value:g}")
    if len(sets.benign) < gates["benign_total_min"].value:
        problems.append(f"benign: {len(sets.benign)} < {gates['benign_total_min'].value:g}")
    if len(sets.clean_domain_qa) < gates["clean_domain_qa_min"].value:
        problems.append(f"clean_domain_qa: {len(sets.clean_domain_qa)} < {gates['clean_domain_qa_min'].value:g}")
    return problems


def load_prompt_sets(data_dir: Path | None = None) -> PromptSets:
    """Every dataset, verified against datasets.lock first: a changed or tampered file fails closed."""
    data_dir = data_dir or default_data_dir()
    lock_bytes = (data_dir / LOCK_FILE).read_bytes() if (data_dir / LOCK_FILE).is_file() else b""
    files = _read_all(data_dir)
    if problems := lock_mismatches(data_dir, files):
        raise DatasetError("datasets do not match datasets.lock (after reviewing a change, re-lock with "
                           "`python -m sae_pipeline.evaluation.datasets --update-lock`): " + "; ".join(problems))
    return PromptSets(**{name: records for name, (_, records) in files.items()},
                      dataset_hash=hashlib.sha256(lock_bytes).hexdigest())


def main() -> None:
    parser = argparse.ArgumentParser(description="Verify or update data/datasets.lock.")
    parser.add_argument("--update-lock", action="store_true", help="rewrite the lock from the files as they are")
    args = parser.parse_args()
    if args.update_lock:
        print(f"wrote {write_lock()}")
    problems = lock_mismatches()
    print("\n".join(problems) or "datasets match datasets.lock")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
