"""The record shapes a data file may have for each kind of record: their names, detecting one from a file's first
row, and the columns a table of that shape must have (`lit_ft.data.records` builds the canonical records)."""

from __future__ import annotations

from typing import Literal

from lit_ft.data.readers import RowError
from lit_ft.errors import ConfigError, DataError

Kind = Literal["instruction", "preference", "prompt", "unpaired"]
INSTRUCTION_FORMATS = ("alpaca", "prompt_completion", "messages", "question_answer", "preference")
PREFERENCE_FORMATS = ("prompt_chosen_rejected", "chat", "hh")
PROMPT_FORMATS = ("prompt", "instruction", "messages", "question", "preference")
UNPAIRED_FORMATS = ("unpaired",) + PREFERENCE_FORMATS


def detect_format(row: dict, kind: Kind) -> str:
    """The record shape of a file, from the keys of its first row."""
    keys = set(row)
    if kind == "unpaired" and "label" in keys:
        return "unpaired"
    if kind in ("preference", "unpaired") and {"chosen", "rejected"} <= keys:
        return preference_format(row)
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
        if {"chosen", "rejected"} <= keys:
            return "preference"
    raise RowError(None, f"cannot detect the {kind} format from the keys {sorted(keys)}; set data.format")


def preference_format(row: dict) -> str:
    """The shape of a preference row: chat message lists, or a prompt column with two texts, or HH-RLHF text."""
    if isinstance(row.get("chosen"), list):
        return "chat"
    return "prompt_chosen_rejected" if "prompt" in row else "hh"


_REQUIRED = {
    ("instruction", "alpaca"): ("instruction", "output"),
    ("instruction", "prompt_completion"): ("prompt", "completion"),
    ("instruction", "question_answer"): ("question", "answer"),
    ("instruction", "messages"): ("messages",),
    ("instruction", "preference"): ("chosen", "rejected"),
    ("preference", "prompt_chosen_rejected"): ("prompt", "chosen", "rejected"),
    ("preference", "chat"): ("chosen", "rejected"),
    ("preference", "hh"): ("chosen", "rejected"),
    ("prompt", "preference"): ("chosen", "rejected"),
    ("unpaired", "unpaired"): ("prompt", "completion", "label"),
    ("unpaired", "prompt_chosen_rejected"): ("prompt", "chosen", "rejected"),
    ("unpaired", "chat"): ("chosen", "rejected"),
    ("unpaired", "hh"): ("chosen", "rejected"),
}


def check_columns(rows: list[dict], source: str, kind: Kind, format: str) -> None:
    """A format the file cannot have: unknown name, or (for tables, whose rows share keys) a missing column."""
    known = {"instruction": INSTRUCTION_FORMATS, "preference": PREFERENCE_FORMATS, "prompt": PROMPT_FORMATS,
             "unpaired": UNPAIRED_FORMATS}[kind]
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
