"""Read rows from files or the hub, validate them, and normalise them into canonical records.

Canonical records (every prompt is a list of chat messages; a raw-text prompt is one user message):

- instruction: ``{"messages": [{"role", "content"}, ...], "input": str | None, "line": int}``
- preference:  ``{"prompt": [messages], "chosen": str, "rejected": str, "margin": float | None, "line": int}``
- prompt:      ``{"prompt": [messages], "input": str | None, "answer": str | None, "line": int}``

``input`` is the alpaca ``input`` column, kept apart so the alpaca template can render its ``### Input:``
section; the other templates append it to the first user turn. ``line`` is the 1-based source line (CSV:
row index + 2 for the header; Parquet and hub data: row index + 1), so every later error can name it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lit_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

Kind = Literal["instruction", "preference", "prompt"]
LOCAL_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
ROLES = ("system", "user", "assistant")
HH_MARKER = "\n\nAssistant:"


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


def read_rows(
    source: str, split: str = "train", skip_bad_rows: bool = False, setting: str = "data.train_file"
) -> tuple[list[dict], list[int], DataReport]:
    """Read raw rows with their 1-based source lines.

    Args:
        source: a ``.json`` (array or JSON Lines), ``.jsonl``, ``.csv`` or ``.parquet`` file, or a hub dataset name.
        split: the split to take from a hub dataset.
        skip_bad_rows: drop (and count) unparsable JSON lines instead of raising.
        setting: the setting that named ``source``, quoted in errors.
    """
    report = DataReport(source=os.path.basename(source) or source)
    if is_hub_name(source):
        rows, lines = _read_hub(source, split, setting)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ConfigError(f"{setting}: file not found: {source}")
        suffix = path.suffix.lower()
        if suffix in (".json", ".jsonl"):
            rows, lines = _read_json(path, skip_bad_rows, report)
        elif suffix in (".csv", ".parquet"):
            rows, lines = _read_table(path, suffix)
        else:
            raise ConfigError(f"{setting}: unsupported file type '{suffix}' ({source}); use {', '.join(LOCAL_SUFFIXES)}")
    if not rows and not report.dropped:
        raise DataError("no rows: the file is empty", file=str(source))
    report.rows_read += len(rows)
    report.rows_kept += len(rows)
    return rows, lines, report


def _read_hub(name: str, split: str, setting: str) -> tuple[list[dict], list[int]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # offline, unknown name, unknown split: all say the same thing to the user
        raise ConfigError(
            f"{setting}: the hub dataset '{name}' could not be reached or loaded ({type(e).__name__}: {e}); "
            f"pass a local file ({', '.join(LOCAL_SUFFIXES)}) instead"
        ) from e
    return list(ds), list(range(1, len(ds) + 1))


def _read_table(path: Path, suffix: str) -> tuple[list[dict], list[int]]:
    if suffix == ".csv":
        return _read_csv(path)
    import datasets

    try:
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except Exception as e:
        raise DataError(f"cannot read {suffix[1:]} file: {type(e).__name__}: {e}", file=str(path)) from e
    return list(ds), list(range(1, len(ds) + 1))


def _read_csv(path: Path) -> tuple[list[dict], list[int]]:
    """CSV rows as text, with the source line where each row starts (line 1 is the header).

    Read with the ``csv`` module rather than pandas: every cell stays text (pandas would turn an answer "42"
    into an int and fail the string check), multi-line quoted cells keep true line numbers, a UTF-8 BOM is
    accepted, and bad bytes are reported by line. An empty cell is a missing value (None). Columns with an
    empty header (a trailing comma, an unnamed index column) are ignored; a row with more cells than the
    header has columns is an error.
    """
    import csv
    import io

    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 (byte 0x{data[e.start]:02x}); save the file as UTF-8",
                        file=str(path), line=data.count(b"\n", 0, e.start) + 1) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            return [], []
        rows, lines, start = [], [], reader.line_num + 1
        for cells in reader:
            if any(c.strip() for c in cells):
                if len(cells) > len(header):
                    raise DataError(f"{len(cells)} cells but the header has {len(header)} columns",
                                    file=str(path), line=start)
                rows.append({k: (c if c != "" else None) for k, c in zip(header, cells) if k.strip()}
                            | {k: None for k in header[len(cells):] if k.strip()})
                lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"invalid CSV: {e}", file=str(path), line=reader.line_num) from None
    if not rows and any(k.strip() for k in header):
        raise DataError("no rows: the file has a header but no data rows", file=str(path))
    return rows, lines


def _read_json(path: Path, skip_bad_rows: bool, report: DataReport) -> tuple[list[dict], list[int]]:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 BOM (Windows editors) is not an error
    if data.lstrip()[:1] == b"[":
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
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if is_last and (not newline_after or e.pos >= len(text.rstrip()) - 1):
            raise RowError("invalid_json", f"invalid JSON: the last line is cut off ({e.msg}); is the file truncated?")
        raise RowError("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}")
    if not isinstance(obj, dict):
        raise RowError("invalid_json", f"expected a JSON object per line, got {type(obj).__name__} "
                                        "(a .json file may also hold one array of objects)")
    return obj


def _read_json_array(path: Path, data: bytes) -> tuple[list[dict], list[int]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError("not valid UTF-8", file=str(path), line=data.count(b"\n", 0, e.start) + 1) from None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"invalid JSON: {e.msg} at column {e.colno}", file=str(path), line=e.lineno) from None
    # Recover each element's line by decoding the array one element at a time.
    decoder, pos, lines = json.JSONDecoder(), text.index("[") + 1, []
    for _ in items:
        while text[pos] in " \t\r\n,":
            pos += 1
        lines.append(text.count("\n", 0, pos) + 1)
        _, pos = decoder.raw_decode(text, pos)
    for item, line in zip(items, lines):
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, got {type(item).__name__}", file=str(path), line=line)
    return items, lines


# ---------------------------------------------------------------------------------------------- normalising


def _text(row: dict, key: str, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowError(key, "missing; expected a string")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError(key, f"expected a string, got {type(value).__name__} ({str(value)[:40]!r})")
    return value


def check_messages(value: Any, key: str, end: Literal["assistant", "user", "any"] = "assistant") -> list[dict]:
    """Validate a chat message list: system turns only first, then user/assistant alternating from user."""
    if not isinstance(value, list) or not value:
        raise RowError(key, f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    out, expected = [], "user"
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RowError(f"{key}[{i}]", f"expected {{'role': one of {list(ROLES)}, 'content': str}}, got {str(m)[:60]}")
        role = m["role"]
        if role == "system" and out and out[-1]["role"] != "system":
            raise RowError(f"{key}[{i}].role", "a system message may only come before the conversation")
        if role != "system":
            if role != expected:
                raise RowError(f"{key}[{i}].role", f"expected '{expected}' (turns alternate, starting with user)")
            expected = "assistant" if role == "user" else "user"
        out.append({"role": role, "content": m["content"]})
    if end != "any" and out[-1]["role"] != end:
        raise RowError(f"{key}[{len(out) - 1}].role", f"expected the last message to be '{end}'")
    return out


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages", "question_answer")
PREFERENCE_FORMATS = ("prompt_chosen_rejected", "chat", "hh")
PROMPT_FORMATS = ("prompt", "instruction", "messages", "question", "preference")


def detect_format(row: dict, kind: Kind) -> str:
    """The record shape of a file, from the keys of its first row."""
    keys = set(row)
    if kind == "preference" and {"chosen", "rejected"} <= keys:
        if isinstance(row["chosen"], list):
            return "chat"
        return "prompt_chosen_rejected" if "prompt" in keys else "hh"
    if kind == "prompt":
        for key, fmt in (("prompt", "prompt"), ("instruction", "instruction"), ("messages", "messages"),
                         ("question", "question"), ("chosen", "preference")):
            if key in keys:
                return fmt
    if kind == "instruction":
        if "messages" in keys:
            return "messages"
        if "instruction" in keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
        if {"question", "answer"} <= keys:
            return "question_answer"
    raise RowError(None, f"cannot detect the {kind} format from the keys {sorted(keys)}; set data.format")


def _instruction(row: dict, fmt: str) -> dict:
    if fmt == "messages":
        return {"messages": check_messages(row.get("messages"), "messages"), "input": None}
    key_p, key_r = {"alpaca": ("instruction", "output"), "prompt_completion": ("prompt", "completion"),
                    "question_answer": ("question", "answer")}[fmt]
    prompt, response = _text(row, key_p), _text(row, key_r)
    inp = _text(row, "input", required=False) if fmt == "alpaca" else None
    return {"messages": _user(prompt) + [{"role": "assistant", "content": response}], "input": inp or None}


def _common_prefix_len(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split HH-RLHF style conversations into (prompt, chosen, rejected) at the last shared Assistant marker."""
    shared = chosen[: _common_prefix_len(chosen, rejected)]
    cut = shared.rfind(HH_MARKER)
    if cut < 0:
        raise RowError("chosen", f"no shared prefix ending in {HH_MARKER!r} between chosen and rejected; "
                                 "expected HH-RLHF style '\\n\\nHuman: ...\\n\\nAssistant: ...' text or a prompt field")
    end = cut + len(HH_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _preference(row: dict, fmt: str) -> dict:
    if fmt == "chat":
        chosen = check_messages(row.get("chosen"), "chosen")
        rejected = check_messages(row.get("rejected"), "rejected")
        n = _common_prefix_len(chosen[:-1], rejected[:-1])
        if n != len(chosen) - 1 or n != len(rejected) - 1:
            raise RowError("rejected", "chosen and rejected must share every message but the final assistant turn")
        prompt, c, r = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
        if not prompt or prompt[-1]["role"] != "user":
            raise RowError("chosen", "expected at least one user message before the final assistant turn")
    elif fmt == "hh":
        text, c, r = split_hh(_text(row, "chosen"), _text(row, "rejected"))
        prompt = _user(text)
    else:
        p = row.get("prompt")
        prompt = check_messages(p, "prompt", end="user") if isinstance(p, list) else _user(_text(row, "prompt"))
        c, r = _text(row, "chosen"), _text(row, "rejected")
    margin = row.get("margin")
    margin = None if margin is None else _number(margin, "margin", "a number or null")
    return {"prompt": prompt, "chosen": c, "rejected": r, "margin": margin}


def _prompt(row: dict, fmt: str, answer_field: str | None) -> dict:
    inp = None
    if fmt == "messages":
        msgs = check_messages(row.get("messages"), "messages", end="any")
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        if prompt[-1]["role"] != "user":
            raise RowError("messages", "expected a user turn to prompt with")
    elif fmt == "preference":
        prompt = _preference(row, _preference_format(row))["prompt"]
    elif fmt == "instruction":
        prompt, inp = _user(_text(row, "instruction")), _text(row, "input", required=False) or None
    else:
        p = row.get(fmt)
        prompt = check_messages(p, fmt, end="user") if isinstance(p, list) else _user(_text(row, fmt))
    answer = row.get(answer_field) if answer_field else None
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise RowError(answer_field, f"expected a string or number, got {type(answer).__name__}")
    return {"prompt": prompt, "input": inp, "answer": None if answer is None else str(answer)}


def _preference_format(row: dict) -> str:
    if isinstance(row.get("chosen"), list):
        return "chat"
    return "prompt_chosen_rejected" if "prompt" in row else "hh"


def responses(record: dict) -> list[str]:
    """Every response text of a canonical record (assistant turns, or the two sides of a pair)."""
    if "messages" in record:
        return [m["content"] for m in record["messages"] if m["role"] == "assistant"]
    return [record[k] for k in ("chosen", "rejected") if k in record]


def _number(value: Any, key: str, expected: str) -> float:
    """A finite float from a number (or, for CSV cells, numeric text); NaN/inf would poison a loss silently."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowError(key, f"expected {expected}, got str ({value[:40]!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowError(key, f"expected {expected}, got {type(value).__name__}")
    if not math.isfinite(value):
        raise RowError(key, f"expected {expected}, got {value} (not finite: it would make the loss NaN)")
    return float(value)


def _score(row: dict, score_field: str) -> float:
    return _number(row.get(score_field), score_field, "a number (data.score_field)")


def _quality_drop(record: dict, kind: Kind, seen: set | None) -> str | None:
    """The reason to drop a well-formed record, or None to keep it."""
    if kind != "prompt" and any(not r.strip() for r in responses(record)):
        return "empty_response"
    if kind == "prompt" and not any(m["content"].strip() for m in record["prompt"] if m["role"] == "user"):
        return "empty_prompt"  # a rollout needs something to answer
    if kind == "preference" and record["chosen"] == record["rejected"]:
        return "chosen_equals_rejected"
    if seen is not None:
        key = json.dumps({k: v for k, v in record.items() if k != "line"}, sort_keys=True)
        if key in seen:
            return "duplicate"
        seen.add(key)
    return None


def load_records(
    source: str,
    kind: Kind,
    format: str = "auto",
    split: str = "train",
    skip_bad_rows: bool = False,
    dedup: bool = True,
    score_field: str | None = None,
    min_score: float | None = None,
    answer_field: str | None = "answer",
    setting: str = "data.train_file",
) -> tuple[list[dict], DataReport]:
    """Read, validate, normalise and filter one source into canonical records (see the module docstring).

    Args:
        source: file path or hub dataset name.
        kind: which canonical record to build.
        format: a named input shape (see ``*_FORMATS``) or ``"auto"`` to detect it from the first row.
        split: hub split to read.
        skip_bad_rows: drop and count malformed rows instead of raising a DataError.
        dedup: drop exact duplicates (same prompt and responses).
        score_field: a numeric column to filter on with ``min_score``.
        min_score: drop rows whose ``score_field`` is below this.
        answer_field: ground-truth answer column of prompt records (None: no answers).
        setting: the setting that named ``source``, quoted in errors.
    """
    rows, lines, report = read_rows(source, split, skip_bad_rows, setting)
    if rows and format == "auto":
        try:
            format = detect_format(rows[0], kind)
        except RowError as e:
            raise DataError(e.message, file=source, line=lines[0]) from None
    _check_columns(rows, source, kind, format)
    build = {"instruction": _instruction, "preference": _preference,
             "prompt": lambda row, fmt: _prompt(row, fmt, answer_field)}[kind]
    records, seen, errors = [], set() if dedup else None, 0
    for row, line in zip(rows, lines):
        try:
            record = build(row, format)
            low = score_field is not None and min_score is not None and _score(row, score_field) < min_score
        except RowError as e:
            if not skip_bad_rows:
                raise DataError(e.message, file=source, line=line, field=e.field) from None
            errors += 1
            if errors <= 5:
                log.warning("skipping %s:%d: field '%s': %s", source, line, e.field, e.message)
            report.drop("malformed")
            continue
        reason = "low_score" if low else _quality_drop(record, kind, seen)
        if reason:
            report.drop(reason)
            continue
        record["line"] = line
        records.append(record)
    report.check()
    return records, report


_REQUIRED = {
    ("instruction", "alpaca"): ("instruction", "output"),
    ("instruction", "prompt_completion"): ("prompt", "completion"),
    ("instruction", "question_answer"): ("question", "answer"),
    ("instruction", "messages"): ("messages",),
    ("preference", "prompt_chosen_rejected"): ("prompt", "chosen", "rejected"),
    ("preference", "chat"): ("chosen", "rejected"),
    ("preference", "hh"): ("chosen", "rejected"),
    ("prompt", "preference"): ("chosen", "rejected"),
}


def _check_columns(rows: list[dict], source: str, kind: Kind, format: str) -> None:
    """A format the file cannot have: unknown name, or (for tables, whose rows share keys) a missing column."""
    known = {"instruction": INSTRUCTION_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS}[kind]
    if format == "auto" and not rows:
        return  # every row was dropped while reading (skip_bad_rows): "no rows left" is reported later
    if format not in known:
        raise ConfigError(f"data.format: unknown {kind} format '{format}'; expected 'auto' or one of {list(known)}")
    if not rows or source.lower().endswith((".json", ".jsonl")):
        return  # JSON rows may differ in keys: each row reports its own missing field with its line
    required = _REQUIRED.get((kind, format), (format,) if kind == "prompt" else ())
    for column in required:
        if column not in rows[0]:
            raise DataError(f"column '{column}' is missing (columns: {sorted(rows[0])})", file=source,
                            line=1 if source.lower().endswith(".csv") else None, field=column)
