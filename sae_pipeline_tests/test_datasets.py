"""The frozen datasets: the lock, split hygiene, sizes, and clear errors for changed or malformed files."""

import pytest

from sae_pipeline.config import load_gates
from sae_pipeline.evaluation.datasets import (
    BENIGN_DOMAINS, FILES, HARM_CATEGORIES, DatasetError, load_prompt_sets, lock_mismatches, normalise,
    size_shortfalls, split_overlaps, write_lock)


def test_committed_datasets_match_the_lock_and_meet_the_sizes():
    assert lock_mismatches() == [], "a dataset file changed without `--update-lock`"
    sets = load_prompt_sets()
    assert split_overlaps(sets) == []
    assert size_shortfalls(sets, load_gates().datasets) == []
    assert {r.category for r in sets.harmful} == set(HARM_CATEGORIES)
    assert {r.domain for r in sets.benign} == set(BENIGN_DOMAINS)
    assert all(r.source for name in FILES for r in getattr(sets, name)), "every record names its source"


def test_a_changed_file_fails_closed_until_relocked(data_copy):
    path = data_copy / FILES["benign"].path
    path.write_text(path.read_text().replace("\"prompt\": \"", "\"prompt\": \"Please, ", 1))
    with pytest.raises(DatasetError, match="benign: prompts/benign.jsonl changed"):
        load_prompt_sets(data_copy)
    write_lock(data_copy)
    assert load_prompt_sets(data_copy).dataset_hash != load_prompt_sets().dataset_hash


def test_overlapping_splits_and_duplicates_are_reported(data_copy):
    path = data_copy / FILES["harmful"].path
    lines = path.read_text().splitlines()
    heldout = next(line for line in lines if '"split": "heldout"' in line)
    leaked = heldout.replace('"split": "heldout"', '"split": "tuning"').replace('-h-', '-x-')
    path.write_text("\n".join(lines + [leaked]) + "\n")
    write_lock(data_copy)
    problems = split_overlaps(load_prompt_sets(data_copy))
    assert any("in both 'heldout' and 'tuning'" in p for p in problems)
    assert any("share the text" in p for p in problems)


def test_a_malformed_record_names_file_and_line(data_copy):
    path = data_copy / FILES["clean_domain_qa"].path
    path.write_text(path.read_text() + '{"id": "x", "domain": "astrology", "question": "q", "answer": "a", '
                                       '"source": "s"}\n')
    with pytest.raises(DatasetError, match=r"clean_domain_qa\.jsonl:73 is not a valid CleanQuestion"):
        write_lock(data_copy)


def test_shortfalls_name_the_group(data_copy):
    path = data_copy / FILES["harmful"].path
    path.write_text("\n".join(line for line in path.read_text().splitlines() if '"fraud-h-' not in line) + "\n")
    write_lock(data_copy)
    assert size_shortfalls(load_prompt_sets(data_copy), load_gates().datasets) == ["harmful fraud/heldout: 0 < 25"]


def test_normalisation_folds_case_width_and_whitespace():
    assert normalise("  How DO I\tkill a\u3000Python process? ") == "how do i kill a python process?"


def test_a_malformed_lock_is_named(data_copy):
    (data_copy / "datasets.lock").write_text('{"version": 1, "files": {"harmful": "oops"}}')
    with pytest.raises(DatasetError, match="is not a valid lock file: every entry needs path, sha256 and splits"):
        load_prompt_sets(data_copy)


def test_a_non_utf8_file_is_named(data_copy):
    (data_copy / FILES["harmful"].path).write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(DatasetError, match="harmful.jsonl is not UTF-8"):
        load_prompt_sets(data_copy)
