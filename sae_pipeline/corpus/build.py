"""Assemble the benign corpus from its sources into one shuffled documents file plus a manifest with sha256."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import NamedTuple

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from sae_pipeline.config import CorpusConfig
from sae_pipeline.corpus.sources import CorpusSourceError, Document, read_source
from sae_pipeline.hashing import file_sha256

DOCUMENTS_FILE = "documents.jsonl"
MANIFEST_FILE = "manifest.json"


class CorpusManifest(NamedTuple):
    sha256: str
    n_documents: int
    n_tokens: int
    tokenizer_hash: str
    sources: list[dict]

    def to_json(self) -> str:
        return json.dumps(self._asdict(), indent=2)


def render_document(document: Document, tokenizer: PreTrainedTokenizerBase) -> str:
    """Plain text as is; chat turns through the model's own chat template, as the model sees real requests."""
    if "messages" in document:
        return tokenizer.apply_chat_template(document["messages"], tokenize=False)
    return document["text"]


def build_corpus(config: CorpusConfig, out_dir: Path, tokenizer: PreTrainedTokenizerBase,
                 tokenizer_hash: str) -> CorpusManifest:
    out_dir.mkdir(parents=True, exist_ok=True)
    documents: list[Document] = []
    source_rows = []
    for source in tqdm(config.sources, desc="corpus sources"):
        docs = list(read_source(source, out_dir / "downloads"))
        if not docs:
            raise CorpusSourceError(f"source {source.name!r} produced no documents (check `include`)")
        n_tokens = sum(len(tokenizer(render_document(d, tokenizer)).input_ids) for d in docs)
        source_rows.append({"name": source.name, "kind": source.kind, "license": source.license,
                            "style": source.style, "n_documents": len(docs), "n_tokens": n_tokens,
                            "requirement": source.requirement, "path": source.path, "dataset": source.dataset})
        documents.extend(docs)
    total_tokens = sum(row["n_tokens"] for row in source_rows)
    if total_tokens < config.min_tokens:
        raise CorpusSourceError(f"corpus has {total_tokens:,} tokens, fewer than min_tokens={config.min_tokens:,}; "
                                f"add sources in data/corpus_sources.yaml")
    random.Random(config.seed).shuffle(documents)
    tmp = out_dir / (DOCUMENTS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(out_dir / DOCUMENTS_FILE)
    manifest = CorpusManifest(file_sha256(out_dir / DOCUMENTS_FILE), len(documents), total_tokens,
                              tokenizer_hash, source_rows)
    (out_dir / MANIFEST_FILE).write_text(manifest.to_json())
    return manifest


def load_manifest(corpus_dir: Path) -> CorpusManifest:
    """Read the manifest and verify the documents file against its sha256 (fails closed)."""
    manifest_path, documents_path = corpus_dir / MANIFEST_FILE, corpus_dir / DOCUMENTS_FILE
    if not manifest_path.exists() or not documents_path.exists():
        raise FileNotFoundError(f"no corpus at {corpus_dir}: materialise the `corpus` asset first")
    manifest = CorpusManifest(**json.loads(manifest_path.read_text()))
    actual = file_sha256(documents_path)
    if actual != manifest.sha256:
        raise ValueError(f"corpus {documents_path} sha256 {actual[:12]} does not match its manifest "
                         f"{manifest.sha256[:12]}: the file changed after it was built; rebuild the corpus")
    return manifest


def iter_documents(corpus_dir: Path):
    with open(corpus_dir / DOCUMENTS_FILE, encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)
