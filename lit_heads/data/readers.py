"""Read records from JSONL, JSON and Parquet files or a hub data set, and turn them into examples.

Every record travels with a `where` string (`path:line`, `path:row 3`, `owner/name[train] row 3`) so
that any later error can point at the exact record.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lit_heads.data.records import Example, check_format_name, record_to_example, short_repr
from lit_heads.errors import DataError

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
# owner/name, optionally ':config' (GSM8K on the hub needs 'openai/gsm8k:main').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?$")
_DATA_SUFFIXES = SUPPORTED_SUFFIXES + (".csv", ".txt", ".tsv", ".arrow")


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig: a byte-order mark from Windows editors is harmless, not an error.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path}:{line}: the file is not valid UTF-8 (byte {data[err.start]:#04x} at offset {err.start}). "
            f"Re-save it as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed_{path.name}`."
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[Any, str]]:
    # Records end at "\n" only: str.splitlines() also splits on U+2028, U+0085 and other characters
    # that valid JSON may hold raw inside a string. A "\r" before the "\n" is JSON whitespace.
    for number, line in enumerate(_decode(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: malformed JSON line ({err.msg} at column {err.colno}). Each line of a .jsonl "
                f"file must be one complete JSON object; fix or remove that line."
            ) from None
        yield record, f"{path}:{number}"


def _read_json(path: Path) -> Iterator[tuple[Any, str]]:
    try:
        data = json.loads(_decode(path))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}). Fix the "
                        "file.") from None
    if isinstance(data, dict) and "data" in data:
        if not isinstance(data["data"], list):
            raise DataError(
                f"{path}: the file's 'data' field must be a list of records, but it is "
                f"{type(data['data']).__name__} ({short_repr(data['data'])}). Make 'data' a list: {{\"data\": "
                f"[{{...}}, {{...}}]}}."
            )
        data = data["data"]
    if not isinstance(data, list):
        shape = f"an object with keys {sorted(data)}" if isinstance(data, dict) else type(data).__name__
        raise DataError(
            f"{path}: a .json data file must hold a list of records or {{\"data\": [records]}}, but it holds {shape}. "
            f"Wrap the records in a list, or write them one per line as .jsonl."
        )
    for i, record in enumerate(data):
        yield record, f"{path}:record {i}"


def _read_parquet(path: Path) -> Iterator[tuple[Any, str]]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: cannot read it as Parquet ({err}). Check that the file is a complete Parquet "
                        "file.") from None
    for i, record in enumerate(rows):
        yield record, f"{path}:row {i}"


_READERS = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}


def looks_like_hub_id(name: str) -> bool:
    """True for 'owner/name' (or 'owner/name:config') that is not obviously a local file name."""
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(_DATA_SUFFIXES)


def is_hub_source(source: str | Path) -> bool:
    """Whether `read_records` would load `source` from the hub (no local file or folder of that name)."""
    path = Path(source).expanduser()
    return not path.is_file() and not path.is_dir() and looks_like_hub_id(str(source))


def _read_hub(name: str, split: str) -> Iterator[tuple[Any, str]]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        rows = datasets.load_dataset(repo, config or None, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, bad split: all mean "not loadable here"
        raise DataError(
            f"Data source '{name}' is not a local file (no such path exists) and loading it as a Hugging Face "
            f"hub data set (repo '{repo}', split '{split}') failed: {type(err).__name__}: {err}. Give the path of "
            f"a local {'/'.join(SUPPORTED_SUFFIXES)} file, or check the hub id, config and split and that the "
            f"hub is reachable."
        ) from None
    for i, record in enumerate(rows):
        yield record, f"{name}[{split}] row {i}"


def read_records(source: str | Path, split: str = "train") -> list[tuple[Any, str]]:
    """All raw records of a local file or a hub data set, each paired with where it came from.

    `split` is only used for hub data sets.
    """
    path = Path(source).expanduser()
    if path.is_file():
        reader = _READERS.get(path.suffix.lower())
        if reader is None:
            raise DataError(
                f"{path}: unsupported file type '{path.suffix}'. Supported: {', '.join(SUPPORTED_SUFFIXES)}; "
                f"convert the file to one of them."
            )
        return list(reader(path))
    if path.is_dir():
        raise DataError(f"{path} is a directory; give a data file ({', '.join(SUPPORTED_SUFFIXES)}) inside it.")
    if is_hub_source(source):
        return list(_read_hub(str(source), split))
    raise DataError(
        f"Data file {path} does not exist. Check the path (relative paths are resolved from {Path.cwd()}), "
        f"or give a hub data set id of the form owner/name."
    )


def load_examples(source: str | Path, format: str = "auto", split: str = "train") -> list[Example]:
    """Read `source` and convert every record (see `records.record_to_example`); never returns empty."""
    check_format_name(format)
    examples = [record_to_example(record, format, where) for record, where in read_records(source, split)]
    if not examples:
        raise DataError(f"Data source '{source}' holds no records. Give a data set with at least one example.")
    log.info("Read %d examples from %s", len(examples), source)
    return examples
