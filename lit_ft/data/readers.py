"""Reading rows from local files (JSON, JSON Lines, CSV, Parquet) or a hub dataset, with the 1-based source line
of every row kept, so later errors can name it (CSV: the header is line 1; Parquet and hub data: row index + 1)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lit_ft.data.csv_rows import read_csv, text_bytes
from lit_ft.errors import ConfigError, DataError
from lit_ft.data.recipes import resolve_source

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


@dataclass
class DataReport:
    """What happened to the rows of one source: ``rows_read == rows_kept + sum(dropped.values())``."""

    source: str
    rows_read: int = 0
    rows_kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str, count: int = 1) -> None:
        """Count ``count`` rows dropped for ``reason`` (they leave ``rows_kept``)."""
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count
            self.rows_kept -= count

    def check(self) -> None:
        assert self.rows_read == self.rows_kept + sum(self.dropped.values()), self

    def summary(self) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.dropped.items()))
        total = sum(self.dropped.values())
        return f"{self.source}: read {self.rows_read} rows, kept {self.rows_kept}, dropped {total}" + (
            f" ({reasons})" if reasons else ""
        )


class RowError(Exception):
    """A bad field in one row; the caller adds file and line and turns it into a DataError or a drop."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field, self.message = field, message


# ---------------------------------------------------------------------------------------------- reading


def is_hub_name(source: str) -> bool:
    """True when ``source`` names a hub dataset rather than a local file or folder."""
    if os.path.exists(source) or source.startswith(("/", ".", "~")) or source.endswith(LOCAL_SUFFIXES):
        return False
    return True


@dataclass
class SourceSpec:
    """How rows are read: the subset and splits of a hub dataset (or a `save_to_disk` folder), and columns renamed
    before the format is detected."""

    subset: str | None = None
    """Hub dataset configuration (subset) name, e.g. `main` for `openai/gsm8k`."""
    train_split: str = "train"
    """Split that data.train_file reads (hub dataset or saved folder)."""
    val_split: str = "test"
    """Split that data.val_file reads (hub dataset or saved folder)."""
    columns: dict[str, str] | None = None
    """Columns renamed {from: to} before the format is detected, e.g. `{question: prompt, response: completion}`."""

    def __post_init__(self):
        if self.columns is not None and not (isinstance(self.columns, dict) and all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in self.columns.items())):
            raise ConfigError(f"data.source.columns={self.columns!r}: expected a mapping of column names "
                              "{from: to}")


def read_rows(
    source: str, split: str = "train", skip_bad_rows: bool = False, setting: str = "data.train_file",
    subset: str | None = None, columns: dict[str, str] | None = None,
) -> tuple[list[dict], list[int], DataReport]:
    """Read raw rows with their 1-based source lines.

    Args:
        source: a ``.json`` (array or JSON Lines), ``.jsonl``, ``.csv`` or ``.parquet`` file, or a hub dataset name.
        split: the split to take from a hub dataset.
        skip_bad_rows: drop (and count) unparsable JSON lines instead of raising.
        setting: the setting that named ``source``, quoted in errors.
        subset: the hub dataset's configuration name.
        columns: columns renamed {from: to} (`SourceSpec.columns`); ShareGPT rows become chat messages after it.
    """
    source = resolve_source(source, setting)  # `demo:NAME`: a demo file shipped with lit_ft
    report = DataReport(source=os.path.basename(source) or source)
    if is_hub_name(source):
        rows, lines = _read_hub(source, split, setting, subset)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ConfigError(f"{setting}: file not found: {source}")
        _check_readable(path, setting)
        suffix = path.suffix.lower()
        if path.is_dir():
            rows, lines = _read_saved_dataset(path, split, setting)
        elif suffix in (".json", ".jsonl"):
            rows, lines = _read_json(path, skip_bad_rows, report)
        elif suffix in (".csv", ".parquet"):
            rows, lines = _read_table(path, suffix)
        else:
            raise ConfigError(f"{setting}: unsupported file type '{suffix}' ({source}); use {', '.join(LOCAL_SUFFIXES)}")
    if not rows and not report.dropped:
        raise DataError("no rows: the file is empty", file=str(source))
    if columns:
        rows = rename_columns(rows, columns, source, setting)
    rows = [from_sharegpt(row, source, line) for row, line in zip(rows, lines)]
    report.rows_read += len(rows)
    report.rows_kept += len(rows)
    return rows, lines, report


def _check_readable(path: Path, setting: str) -> None:
    """Refuse, naming the setting, what cannot be opened (permissions, a folder that is not a saved dataset)."""
    if path.is_dir():
        if not any((path / m).exists() for m in SAVED_DATASET_MARKERS):
            raise ConfigError(f"{setting}: {path} is a directory, not a data file (nor a folder written by "
                              "datasets' save_to_disk); name the file inside it")
        return
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot read {path}: {e.strerror or e}") from e


SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _read_saved_dataset(path: Path, split: str, setting: str) -> tuple[list[dict], list[int]]:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (its ``split``); lines are
    row numbers, as for Parquet."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path), keep_in_memory=True)
    except Exception as e:  # a half-written folder: pyarrow / json errors, all one message to the user
        raise ConfigError(f"{setting}: cannot load the saved dataset {path}: {type(e).__name__}: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"{setting}: the saved dataset {path} has no split '{split}' (it has {list(ds)})")
        ds = ds[split]
    return list(ds), list(range(1, len(ds) + 1))


def _read_hub(name: str, split: str, setting: str, subset: str | None = None) -> tuple[list[dict], list[int]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all say the same thing to the user
        raise ConfigError(
            f"{setting}: the hub dataset '{name}' could not be reached or loaded ({type(e).__name__}: {e}); "
            f"pass a local file ({', '.join(LOCAL_SUFFIXES)}) instead"
        ) from e
    return list(ds), list(range(1, len(ds) + 1))


def _read_table(path: Path, suffix: str) -> tuple[list[dict], list[int]]:
    if suffix == ".csv":
        return read_csv(path)
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:
        raise DataError(f"cannot read {suffix[1:]} file: {type(e).__name__}: {e}", file=str(path)) from e
    return list(ds), list(range(1, len(ds) + 1))


def _read_json(path: Path, skip_bad_rows: bool, report: DataReport) -> tuple[list[dict], list[int]]:
    data = text_bytes(path).removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not an error
    # A .jsonl file is lines whatever its first character: its first line being an array is line 1's fault.
    if data.lstrip()[:1] == b"[" and path.suffix.lower() != ".jsonl" and not _array_then_more(data):
        return _read_json_array(path, data)
    rows, lines = [], []
    raw_lines = data.split(b"\n")
    last = max((i for i, b in enumerate(raw_lines) if b.strip()), default=-1)
    for i, raw in enumerate(raw_lines):
        if not raw.strip():
            continue
        try:
            rows.append(_parse_json_line(raw, is_last=i == last, newline_after=i < len(raw_lines) - 1))
            lines.append(i + 1)
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(e.message, file=str(path), line=i + 1) from None
            report.rows_read += 1
            report.rows_kept += 1
            report.drop(e.field or "invalid_json")
    return rows, lines


def _parse_json_line(raw: bytes, is_last: bool, newline_after: bool) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RowError("invalid_utf8", f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise RowError("invalid_json", "invalid JSON: nested too deeply (thousands of levels) to read") from None
    except _DuplicateKey as e:
        raise RowError("invalid_json", f"invalid JSON: duplicate key {e.args[0]!r} in one object (which one is "
                                        "meant?)") from None
    except json.JSONDecodeError as e:
        if is_last and (not newline_after or e.pos >= len(text.rstrip()) - 1):
            raise RowError("invalid_json", f"invalid JSON: the last line is cut off ({e.msg}); is the file truncated?")
        raise RowError("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        raise RowError("invalid_json", f"expected a JSON object per line, got {type(obj).__name__} "
                                        "(a .json file may also hold one array of objects)")
    return obj


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` refusing duplicate keys, which ``json`` would silently resolve to the last."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _array_then_more(data: bytes) -> bool:
    """True when the first line is a complete JSON value with more lines after it: JSON Lines whose first row is an
    array (a .json array file spreads over lines or stands alone)."""
    first, _, rest = data.lstrip().partition(b"\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _read_json_array(path: Path, data: bytes) -> tuple[list[dict], list[int]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("not valid UTF-8", file=str(path), line=data.count(b"\n", 0, e.start) + 1) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", file=str(path), line=e.lineno) from None
    except RecursionError:
        raise DataError("invalid JSON: nested too deeply (thousands of levels) to read", file=str(path)) from None
    # Decode the array again one element at a time: each element's line, and duplicate keys named by line.
    decoder, pos, lines = json.JSONDecoder(object_pairs_hook=_unique_keys), text.index("[") + 1, []
    for i, _ in enumerate(items):
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        try:
            items[i], pos = decoder.raw_decode(text, pos)
        except _DuplicateKey as e:
            raise DataError(f"invalid JSON: duplicate key {e.args[0]!r} in one object (which one is meant?)",
                            file=str(path), line=lines[-1]) from None
    for item, line in zip(items, lines):
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {type(item).__name__}", file=str(path), line=line)
    return items, lines


# ---------------------------------------------------------------------------------------------- shapes of rows


def rename_columns(rows: list[dict], columns: dict[str, str], source: str, setting: str) -> list[dict]:
    """Rows with columns renamed {from: to}; a `from` that no row has is refused (a typo would read nothing)."""
    present = set().union(*(r.keys() for r in rows)) if rows else set()
    missing = sorted(set(columns) - present)
    if missing:
        raise ConfigError(f"data.source.columns: {missing} are not columns of {setting}={source} "
                          f"(it has {sorted(present)})")
    return [{columns.get(k, k): v for k, v in r.items()} for r in rows]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "model": "assistant",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}


def from_sharegpt(row: dict, source: str, line: int) -> dict:
    """A ShareGPT row (`conversations`: [{from, value}]) as a chat row (`messages`: [{role, content}]); other rows
    unchanged. ShareGPT's speakers: system, human (user), gpt (assistant; chatgpt, bing, bard in some dumps), and
    LLaMA-Factory's tool turns: function_call (an assistant turn that calls: its value the call as JSON text,
    {"name", "arguments"}, or a list of them) and observation (the tool's result, answering the calls before it in
    order); `lit_ft.data.tools` checks and parses them as it does OpenAI-style messages."""
    turns = row.get("conversations")
    if "messages" in row or not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t for t in turns):
        return row
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"ShareGPT speaker {turn['from']!r} is not one of {sorted(SHAREGPT_ROLES)}",
                            file=source, line=line, field=f"conversations[{i}].from")
        if str(turn["from"]).lower() == "function_call":
            messages.append({"role": role, "content": "", "function_call": turn.get("value")})
        else:
            messages.append({"role": role, "content": turn.get("value")})
    out = {k: v for k, v in row.items() if k != "conversations"}
    out["messages"] = messages
    return out
