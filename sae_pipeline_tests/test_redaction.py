"""The redaction guard and scanner, on synthetic completions (no model output is needed to test them)."""

import json
import sqlite3

import pytest

from sae_pipeline.evaluation.redaction import Fingerprints, RedactionError, RedactionGuard, scan_paths

PROMPT = "Tell me how to frobnicate the quantum widget"
COMPLETION = ("Tell me how to frobnicate the quantum widget? Sure. First you align the zorblax coil with "
              "the seventh harmonic, then you wait for the blue light and tighten the fourth valve.")


@pytest.fixture
def guard():
    guard = RedactionGuard([PROMPT])
    guard.register(COMPLETION)
    return guard


def test_guard_refuses_payloads_carrying_a_completion_in_any_form(guard, tmp_path):
    fragment = "align the zorblax coil with the seventh harmonic, then"
    for payload in ({"note": fragment}, {"note": fragment.upper()}, json.dumps({"n": fragment.replace(" ", "\n")}),
                    [fragment]):
        with pytest.raises(RedactionError, match="shingles of text generated from harmful prompts"):
            guard.write(tmp_path / "out.json", payload)
    assert not (tmp_path / "out.json").exists(), "nothing is written when the check fails"


@pytest.mark.parametrize("completion", [
    r"Open C:\temp\tools and run the \x90 loader before you start the second stage of it",
    "Сначала соедините провода вместе, затем подождите пять минут и включите питание снова",
])
def test_guard_catches_backslashes_and_any_script_in_every_stored_form(completion):
    guard = RedactionGuard([])
    guard.register(completion)
    assert guard.fingerprinted == 1
    for stored in (completion, json.dumps({"m": completion}), json.dumps({"m": completion}, ensure_ascii=False),
                   json.dumps({"event": json.dumps({"m": completion})})):
        with pytest.raises(RedactionError):
            guard.ensure_clean(stored, "test")


def test_guard_allows_numbers_hashes_and_echoed_prompt_text(guard, tmp_path):
    guard.write(tmp_path / "ok.json", {"refused": False, "sha256": "ab" * 32, "prompt": PROMPT, "rate": 0.5})
    assert json.loads((tmp_path / "ok.json").read_text())["prompt"] == PROMPT


def test_short_completions_are_not_fingerprinted():
    guard = RedactionGuard([])
    guard.register("No.")
    guard.register("Sure thing.")
    assert guard.registered == 2 and guard.fingerprints.size == 0


def test_fingerprints_round_trip_and_reject_foreign_files(guard):
    restored = Fingerprints.from_bytes(guard.fingerprints.to_bytes())
    assert restored == guard.fingerprints and restored.size > 0
    with pytest.raises(RedactionError, match="not a redaction fingerprint file"):
        Fingerprints.from_bytes(b"garbage")
    with pytest.raises(RedactionError, match="truncated"):
        Fingerprints.from_bytes(guard.fingerprints.to_bytes()[:-3])


def test_scanner_finds_a_leak_inside_a_sqlite_event_log(guard, tmp_path):
    db = tmp_path / "storage" / "runs.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as conn:
        conn.execute("create table event_logs (event text)")
        conn.execute("insert into event_logs values (?)", (json.dumps({"message": "run ok"}),))
    (tmp_path / "clean.json").write_text(json.dumps({"prompt": PROMPT}))
    clean = scan_paths([tmp_path], guard.fingerprints)
    assert clean.files_scanned == 2 and clean.leaks == []
    with sqlite3.connect(db) as conn:
        conn.execute("insert into event_logs values (?)", (json.dumps({"message": COMPLETION}),))
    leaked = scan_paths([tmp_path], guard.fingerprints)
    assert len(leaked.leaks) == 1 and "runs.db" in leaked.leaks[0]
