"""The redaction guard: text generated from a harmful prompt lives in memory only.

Each harmful completion is cut into word shingles (8 consecutive words; a shorter completion of >= 4 words is one
shingle of all its words) whose 64-bit hashes are its fingerprint. Words are read from the text as written and from
the forms a stored copy would take (JSON-escaped, ASCII or not, and JSON inside JSON, as in Dagster's event log).
Shingles that also occur in any stored prompt are dropped: completions echo their request, and requests may be
stored. The guard checks every payload before it is persisted and raises on a hit (fail closed); the fingerprints
themselves are hashes and may be saved, so a later scan of the artifact tree, the Dagster storage and the W&B
directory can prove that nothing leaked."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np

SHINGLE_WORDS = 8
MIN_WORDS = 4  # fewer words than this carry no harmful content worth guarding (e.g. "Sure." or "No.")
_WORD = re.compile(r"\w+")  # Unicode words: a completion in any script is guarded
# \uXXXX turns back into its character (so an ASCII-escaped copy of non-Latin text still has words); any other
# escape splits words, identically in every form
_ESCAPE = re.compile(r"\\(?:u([0-9a-fA-F]{4})|.)")
_FINGERPRINT_MAGIC = b"SAEREDv1"


class RedactionError(RuntimeError):
    """Persisting this would leak text generated from a harmful prompt, or redaction cannot be guaranteed."""


def _words(text: str) -> list[str]:
    unescaped = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)) if m.group(1) else " ", text)
    return _WORD.findall(unescaped.casefold())


def _stored_forms(text: str) -> list[str]:
    """The text as written and as JSON would store it (escaped, ASCII-only or not, and escaped twice)."""
    return [text, json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1],
            json.dumps(json.dumps(text))[1:-1]]


def _hash(words: Iterable[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")


def _shingles(words: list[str], length: int) -> set[int]:
    return {_hash(words[i:i + length]) for i in range(len(words) - length + 1)}


def completion_shingles(text: str) -> dict[int, set[int]]:
    """{shingle length: hashes} over the stored forms of one completion; empty when it is too short to guard."""
    out: dict[int, set[int]] = {}
    for form in _stored_forms(text):
        words = _words(form)
        if len(words) >= MIN_WORDS:
            length = min(SHINGLE_WORDS, len(words))
            out.setdefault(length, set()).update(_shingles(words, length))
    return out


class Fingerprints(NamedTuple):
    by_length: dict[int, frozenset[int]]

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.by_length.values())

    def hits(self, text: str) -> int:
        words = _words(text)
        return sum(len(_shingles(words, length) & hashes) for length, hashes in self.by_length.items())

    @classmethod
    def merged(cls, prints: Iterable[Fingerprints]) -> Fingerprints:
        """Several runs' fingerprints as one (a step that generated in several runs scans with all of them)."""
        by_length: dict[int, set[int]] = {}
        for p in prints:
            for length, hashes in p.by_length.items():
                by_length.setdefault(length, set()).update(hashes)
        return cls({length: frozenset(h) for length, h in by_length.items()})

    def to_bytes(self) -> bytes:
        parts = [_FINGERPRINT_MAGIC]
        for length, hashes in sorted(self.by_length.items()):
            values = np.array(sorted(hashes), dtype="<u8")
            parts += [np.array([length, len(values)], dtype="<u8").tobytes(), values.tobytes()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> Fingerprints:
        if not blob.startswith(_FINGERPRINT_MAGIC):
            raise RedactionError("not a redaction fingerprint file: cannot guarantee a scan, stopping")
        by_length, offset = {}, len(_FINGERPRINT_MAGIC)
        try:
            while offset < len(blob):
                length, count = (int(v) for v in np.frombuffer(blob, dtype="<u8", count=2, offset=offset))
                offset += 16
                values = np.frombuffer(blob, dtype="<u8", count=count, offset=offset)
                offset += 8 * count
                by_length[length] = frozenset(int(v) for v in values)
        except ValueError as err:
            raise RedactionError(f"truncated redaction fingerprint file ({err}): cannot guarantee a scan") from err
        return cls(by_length)


def ensure_clean(fingerprints: Fingerprints, payload: object, where: str) -> str:
    """The payload as canonical JSON, if it carries no guarded text; raises RedactionError otherwise."""
    try:
        text = payload if isinstance(payload, str) else json.dumps(payload, sort_keys=True, indent=2, default=str)
    except (TypeError, ValueError) as err:
        raise RedactionError(f"{where}: payload cannot be serialised for the redaction check ({err})") from err
    if hits := fingerprints.hits(text):
        raise RedactionError(f"{where}: {hits} shingles of text generated from harmful prompts; not written")
    return text


class RedactionGuard:
    """Registers harmful completions (in memory) and vets everything a run persists."""

    def __init__(self, stored_texts: Iterable[str]):
        words = [_words(text) for text in stored_texts]
        self._allowed = {length: set().union(*(_shingles(w, length) for w in words))
                         for length in range(MIN_WORDS, SHINGLE_WORDS + 1)}
        self._by_length: dict[int, set[int]] = {}
        self.registered = self.fingerprinted = 0

    def register(self, completion: str) -> None:
        self.registered += 1
        new = {length: hashes - self._allowed[length] for length, hashes in completion_shingles(completion).items()}
        for length, hashes in new.items():
            self._by_length.setdefault(length, set()).update(hashes)
        self.fingerprinted += any(new.values())

    @property
    def fingerprints(self) -> Fingerprints:
        return Fingerprints({length: frozenset(h) for length, h in self._by_length.items() if h})

    def ensure_clean(self, payload: object, where: str) -> str:
        return ensure_clean(self.fingerprints, payload, where)

    def write(self, path: Path, payload: object) -> None:
        write_clean(self.fingerprints, path, payload)


def write_clean(fingerprints: Fingerprints, path: Path, payload: object) -> None:
    """Write the payload (canonical JSON, or the string as it is) only if it carries no guarded text."""
    text = ensure_clean(fingerprints, payload, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("" if text.endswith("\n") else "\n"))


class ScanReport(NamedTuple):
    files_scanned: int
    bytes_scanned: int
    leaks: list[str]  # "path: n shingles"


def scan_paths(roots: Iterable[Path], fingerprints: Fingerprints) -> ScanReport:
    """Search every file under the roots (any encoding: words are read from the raw bytes) for guarded shingles."""
    files, size, leaks = 0, 0, []
    for root in roots:
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in paths:
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue  # gone since listing (SQLite's -shm/-wal files come and go): it holds nothing now
            except OSError as err:
                raise RedactionError(f"cannot read {path} for the redaction scan: {err}") from err
            files, size = files + 1, size + len(data)
            if hits := fingerprints.hits(data.decode("utf-8", errors="replace")):
                leaks.append(f"{path}: {hits} shingles")
    return ScanReport(files, size, leaks)
