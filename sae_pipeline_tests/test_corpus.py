import json

import pandas as pd
import pytest

from sae_pipeline.config import CorpusConfig, CorpusSource
from sae_pipeline.corpus.build import build_corpus, iter_documents, load_manifest, render_document
from sae_pipeline.corpus.sources import CorpusSourceError, rst_sections

RST = """Models
======

A model is the single, definitive source of information about your data. It contains the fields and behaviors
of the data you are storing. Generally, each model maps to a single database table, and every attribute of
the model represents a database field.

Can I use Django without a database?
------------------------------------

Yes. Django ships with an object-relational mapper, but you are free to use other tools; the rest of the
framework does not require the database layer, and several projects run without one at all in production.
"""


def _local(tmp_path, name, style="prose", **kw):
    return CorpusSource(name=name, kind="local", license="CC0 (written for the tests)", path=str(tmp_path / name),
                        style=style, **kw)


def test_local_txt_jsonl_parquet_and_chat_sources(tmp_path, tiny):
    (tmp_path / "notes.txt").write_text("Plain benign prose about gardening and tomatoes.\n" * 20)
    (tmp_path / "rows.jsonl").write_text("\n".join(json.dumps({"text": f"row {i} about bread"}) for i in range(5)))
    pd.DataFrame({"text": [f"parquet row {i} on cycling" for i in range(4)]}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "guide.txt").write_text(RST)
    config = CorpusConfig(min_tokens=10, sources=[
        _local(tmp_path, "notes.txt"), _local(tmp_path, "rows.jsonl"), _local(tmp_path, "t.parquet"),
        _local(tmp_path, "guide.txt", style="chat")])
    manifest = build_corpus(config, tmp_path / "out", tiny.tokenizer, tiny.tokenizer_hash)
    assert manifest.n_documents == 1 + 5 + 4 + 2
    assert [row["n_documents"] for row in manifest.sources] == [1, 5, 4, 2]
    assert load_manifest(tmp_path / "out").sha256 == manifest.sha256
    chats = [d for d in iter_documents(tmp_path / "out") if "messages" in d]
    questions = {d["messages"][0]["content"] for d in chats}
    assert "Can I use Django without a database?" in questions
    rendered = render_document(chats[0], tiny.tokenizer)
    assert "<|im_start|>user" in rendered and "<|im_start|>assistant" in rendered


def test_build_is_deterministic(tmp_path, tiny):
    (tmp_path / "a.txt").write_text("benign text " * 50)
    config = CorpusConfig(min_tokens=1, sources=[_local(tmp_path, "a.txt")])
    first = build_corpus(config, tmp_path / "one", tiny.tokenizer, tiny.tokenizer_hash)
    second = build_corpus(config, tmp_path / "two", tiny.tokenizer, tiny.tokenizer_hash)
    assert first.sha256 == second.sha256


def test_missing_empty_and_too_small_corpora_are_named(tmp_path, tiny):
    with pytest.raises(CorpusSourceError, match="does not exist"):
        build_corpus(CorpusConfig(sources=[_local(tmp_path, "absent.txt")]), tmp_path / "o", tiny.tokenizer, "h")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusSourceError, match="produced no documents"):
        build_corpus(CorpusConfig(sources=[_local(tmp_path, "empty.txt")]), tmp_path / "o", tiny.tokenizer, "h")
    (tmp_path / "short.txt").write_text("short")
    with pytest.raises(CorpusSourceError, match="fewer than min_tokens"):
        build_corpus(CorpusConfig(sources=[_local(tmp_path, "short.txt")], min_tokens=10_000), tmp_path / "o",
                     tiny.tokenizer, "h")


def test_tampered_corpus_fails_closed(tmp_path, tiny):
    (tmp_path / "a.txt").write_text("benign text " * 50)
    build_corpus(CorpusConfig(min_tokens=1, sources=[_local(tmp_path, "a.txt")]), tmp_path / "c", tiny.tokenizer, "h")
    with open(tmp_path / "c" / "documents.jsonl", "a") as handle:
        handle.write('{"source": "x", "text": "injected"}\n')
    with pytest.raises(ValueError, match="does not match its manifest"):
        load_manifest(tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="materialise the `corpus` asset"):
        load_manifest(tmp_path / "nowhere")


def test_rst_sections_split_on_underlined_titles():
    sections = list(rst_sections(RST))
    assert [title for title, _ in sections] == ["Models", "Can I use Django without a database?"]
    assert "object-relational mapper" in sections[1][1]
