"""Reading raw records: a Hugging Face Hub dataset id, local ``.jsonl`` / JSON-array ``.json`` files, or folders of
them, as ``(location, object)`` pairs whose location names the file and line (JSONL) or record index (JSON array).

Every preparation that reads records (instructions, chat conversations) goes through here, so all of them give the
same one-line errors for the same malformed input, and report what ``--skip_invalid`` skipped the same way
(:func:`report_skipped`). What a record must contain is the caller's business.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple, Union

from lit_adapter.errors import UserError

Source = Union[str, Path, Sequence[Union[str, Path]]]
"""A Hub dataset id, a file or folder, or several of them."""


class InvalidRecord(Exception):
    """A single bad record (invalid JSON on one line, a missing field); skippable with ``skip_invalid``."""


def report_skipped(log: Callable[[str], None], skipped: int, reasons: Sequence[str], examples: int = 5) -> None:
    """Says how many invalid records ``--skip_invalid`` skipped and why, with the first ``examples`` reasons
    (each naming its file and line), so a skip is never silent."""
    if skipped:
        log(f"skipped {skipped:,} invalid records, e.g.:")
        for reason in reasons[:examples]:
            log(f"  {reason}")


def iter_source(source: Source) -> Iterator[Tuple[str, Any]]:
    """``(location, object)`` for every record of a Hub dataset id or local file(s)/folder(s), as :func:`load_records`
    reads them (other record formats, such as chat conversations, share the reading and its one-line errors); a
    line of invalid JSON is yielded as a ``ValueError`` whose message says why, so a caller can skip it."""
    for where, obj in iter_records(source):
        yield where, (ValueError(str(obj)) if isinstance(obj, InvalidRecord) else obj)


def iter_records(source: Source) -> Iterator[Tuple[str, Any]]:
    """``(location, object)`` as :func:`iter_source`, with a skippable problem yielded as an :class:`InvalidRecord`
    (the instruction reader raises it, or counts it under ``skip_invalid``)."""
    files = resolve_source(source)
    return _iter_hub(source_name(source)) if files is None else (item for path in files for item in _iter_file(path))


def resolve_source(source: Source) -> Optional[List[Path]]:
    """The sorted, de-duplicated data files of a local ``source``; ``None`` if it names a Hub dataset."""
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    if not entries:
        raise UserError("no data source given")
    if len(entries) == 1 and isinstance(entries[0], str) and _looks_like_hub_id(entries[0]):
        return None
    files = set()
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            found = [p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl")]
            if not found:
                raise UserError(f"no .json or .jsonl files in the folder {path}")
            files.update(p.resolve() for p in found)
        elif path.is_file():
            files.add(path.resolve())
        else:
            raise UserError(f"data file or folder not found: {path}")
    return sorted(files, key=str)


def source_name(source: Source) -> str:
    """The source as one string: the Hub id or path (the first, for a list)."""
    return str(source) if isinstance(source, (str, Path)) else str(source[0])


def _looks_like_hub_id(text: str) -> bool:
    return not Path(text).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not (
        text.endswith((".json", ".jsonl"))
    )


def _iter_hub(dataset_id: str) -> Iterator[Tuple[str, Any]]:
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, split="train")
    except Exception as err:  # network, authentication and missing-dataset failures all land here
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise UserError(
            f"could not load {dataset_id!r} from the Hugging Face Hub ({reason}); it is neither a local file nor "
            "folder. When offline, pass local files: --source data.jsonl, a JSON-array .json, several files or a folder"
        ) from None
    for i, row in enumerate(rows):
        yield f"{dataset_id} record index {i}", row


def _iter_file(path: Path) -> Iterator[Tuple[str, Any]]:
    """Yields ``(location, object)`` pairs; a skippable parse problem is yielded as an ``InvalidRecord``."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    start = _skip_ws(text, 0)
    if start < len(text) and text[start] == "[":  # JSON array, whatever the extension says
        yield from _iter_json_array(path, text, start)
    elif path.suffix == ".json" and start == len(text):
        raise UserError(f"{path} is empty; expected a JSON array of records")
    else:
        yield from _iter_jsonl(path, text)


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _line_col(text: str, pos: int) -> str:
    line = text.count("\n", 0, pos) + 1
    return f"line {line}, column {pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def _iter_json_array(path: Path, text: str, start: int) -> Iterator[Tuple[str, Any]]:
    # Decoding one element at a time gives errors a record index, which a one-line json.dump file needs.
    decoder = json.JSONDecoder()
    # A complete array ends with "]"; anything else means the file was cut off (a partial download or copy).
    truncated = not text.rstrip().endswith("]")
    pos = _skip_ws(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        return
    index = 0
    while True:
        if pos >= len(text):
            raise UserError(f"{path} is truncated: the JSON array ends after record index {index - 1} without ']'")
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            if truncated:
                raise UserError(
                    f"{path} is truncated: record index {index} is incomplete and the JSON array is not closed"
                ) from None
            raise UserError(
                f"{path}: invalid JSON in record index {index} ({err.msg} at line {err.lineno}, column {err.colno})"
            ) from None
        yield f"{path} record index {index}", obj
        index += 1
        pos = _skip_ws(text, pos)
        if pos >= len(text):
            raise UserError(f"{path} is truncated: the JSON array ends after record index {index - 1} without ']'")
        if text[pos] == "]":
            rest = _skip_ws(text, pos + 1)
            if rest < len(text):
                raise UserError(f"{path}: unexpected data after the JSON array at {_line_col(text, rest)}")
            return
        if text[pos] != ",":
            raise UserError(
                f"{path}: invalid JSON after record index {index - 1}: expected ',' or ']' at {_line_col(text, pos)}"
            )
        pos = _skip_ws(text, pos + 1)


def _iter_jsonl(path: Path, text: str) -> Iterator[Tuple[str, Any]]:
    lines = text.split("\n")  # not splitlines(): it also splits at U+2028 etc., which may sit inside strings
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        where = f"{path} line {i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            if i == last and not text.endswith("\n"):
                raise UserError(f"{where}: incomplete JSON at the end of the file; is the file truncated?") from None
            yield where, InvalidRecord(f"invalid JSON ({err.msg} at column {err.colno})")
            continue
        yield where, obj
