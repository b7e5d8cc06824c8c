"""Reading the calibration set ``S`` from a JSONL file, with errors that point at the byte.

One JSON object per non-blank line, the text under a field (default ``"text"``), or a prompt and a
completion under two fields. Every error names the file and the line, and the first bad thing on
it: a directory given for the file, a byte that is not UTF-8 (its byte offset in the file, so
``head -c`` / ``xxd -s`` land on it), malformed JSON (``line:column`` and the parser's cause), a
missing field (with the keys present). This module imports no torch, so the command line reads
and checks the data before it loads anything heavy; :mod:`lora_da_ref.data` tokenises the result.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

__all__ = ["check_data_file", "read_jsonl_fields", "read_jsonl_pairs", "read_jsonl_texts"]


def check_data_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is a readable regular file, else an error saying what it is.

    Raises:
        FileNotFoundError: nothing exists at ``path``.
        ValueError: ``path`` is a directory or another non-regular file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    return path


def read_jsonl_fields(
    path: str | Path, fields: Sequence[str], *, limit: int | None = None
) -> list[tuple[str, ...]]:
    """The string values of ``fields`` of each record, in file order (the first ``limit``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a regular file, a line is not UTF-8, not a JSON object, lacks
            a field or has a non-string value, or the file holds no records.
    """
    path = check_data_file(path)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    records: list[tuple[str, ...]] = []
    for lineno, line in _lines(path):
        record = _record(line, lineno, path)
        records.append(tuple(_field(record, lineno, path, f) for f in fields))
        if limit is not None and len(records) >= limit:
            break
    if not records:
        raise ValueError(f"{path}: no JSON records found (the file is empty or blank)")
    return records


def read_jsonl_texts(
    path: str | Path, *, field: str = "text", limit: int | None = None
) -> list[str]:
    """Texts of the calibration set ``S``: ``record[field]`` of each JSONL line, in file order.

    Args:
        path: a ``.jsonl`` file, one JSON object per non-blank line.
        field: the key holding the text.
        limit: keep only the first ``limit`` records (the official code uses the first 256).

    Raises: as :func:`read_jsonl_fields`.
    """
    return [text for (text,) in read_jsonl_fields(path, (field,), limit=limit)]


def read_jsonl_pairs(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    limit: int | None = None,
) -> list[tuple[str, str]]:
    """``(prompt, completion)`` pairs of a JSONL file (e.g. ``{"prompt": ..., "completion": ...}``).

    Same rules and errors as :func:`read_jsonl_texts`, for both fields.
    """
    records = read_jsonl_fields(path, (prompt_field, completion_field), limit=limit)
    return [(prompt, completion) for prompt, completion in records]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, decoded text) of each non-blank line; bytes are decoded line by line, so a
    bad byte is reported at its line and file offset rather than as a whole-file failure."""
    offset = 0
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = raw[err.start]
                raise ValueError(
                    f"{path}:{lineno}: byte offset {offset + err.start}: not UTF-8 "
                    f"(byte 0x{byte:02x}, {err.reason}); re-encode the file as UTF-8"
                ) from None
            offset += len(raw)
            if line.strip():
                yield lineno, line


def _record(line: str, lineno: int, path: Path) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{lineno}:{err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _field(record: dict, lineno: int, path: Path, field: str) -> str:
    if field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise ValueError(f"{path}:{lineno}: missing field {field!r} (keys present: {keys})")
    text = record[field]
    if not isinstance(text, str):
        raise ValueError(
            f"{path}:{lineno}: field {field!r} must be a string, got {type(text).__name__}"
        )
    return text
