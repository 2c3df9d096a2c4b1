"""Validate rows and normalise them into canonical records (reading is `lit_ft.data.readers`).

Every format's row builder and the one drop rule they share are here, beside each other (each row's checks, in the
order a row meets them); the shapes a file may have, their detection and required columns are `lit_ft.data.formats`,
the rule every message list meets is `lit_ft.data.messages`, and the HH-RLHF text format is parsed in `lit_ft.data.hh`.

Canonical records (every prompt is a list of chat messages; a raw-text prompt is one user message):

- instruction: ``{"messages": [{"role", "content"}, ...], "input": str | None, "line": int}``
- preference:  ``{"prompt": [messages], "chosen": str, "rejected": str, "margin": float | None, "line": int}``
- prompt:      ``{"prompt": [messages], "input": str | None, "answer": str | None, "line": int}``
- unpaired:    ``{"prompt": [messages], "completion": str, "label": bool, "line": int}`` (KTO: a completion labelled
  desirable or not); read from pairs, each pair is kept whole while reading and splitting, then `unpair` makes it
  one desirable and one undesirable example of the same line

An HH-RLHF row (``"\n\nHuman: ...\n\nAssistant: ..."`` text) becomes its conversation's turns in ``prompt`` and keeps
the prompt as written in ``transcript`` (`lit_ft.data.hh`: the format, and `prompt_for`, what each template renders).

``input`` is the alpaca ``input`` column, kept apart so the alpaca template can render its ``### Input:``
section; the other templates append it to the first user turn. ``line`` is the 1-based source line (CSV:
row index + 2 for the header; Parquet and hub data: row index + 1), so every later error can name it.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from lit_ft.data.checks import check_unicode, is_blank, warn_unknown_columns
from lit_ft.data.formats import Kind, check_columns, detect_format, preference_format
from lit_ft.data.hh import hh_turns, split_hh
from lit_ft.data.messages import check_messages
from lit_ft.data.readers import DataReport, RowError, read_rows
from lit_ft.data.tools import parse_tools
from lit_ft.errors import DataError

log = logging.getLogger(__name__)



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


def _tools(tools: list[dict] | None) -> dict:
    """The record's ``tools`` entry: only where the row has tools (records without stay as they were)."""
    return {"tools": tools} if tools else {}


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _instruction(row: dict, fmt: str) -> dict:
    if fmt == "preference":  # SFT on the chosen side of preference pairs (the first stage of RLHF)
        pair = _preference(row, preference_format(row))
        record = {"messages": pair["prompt"] + [{"role": "assistant", "content": pair["chosen"]}], "input": None}
        return record | ({"transcript": pair["transcript"]} if "transcript" in pair else {}) | _tools(pair.get("tools"))
    if fmt == "messages":
        tools = parse_tools(row.get("tools"))
        return {"messages": check_messages(row.get("messages"), "messages", tools=tools), "input": None} | _tools(tools)
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


_PAIR_CALLS = ("a final assistant turn that calls tools is not supported in preference pairs yet (only the prompt may "
               "hold tool calls and results); keep such rows out of the pairs")


def _explicit_prompt_pair(row: dict, tools: list[dict] | None) -> tuple[list[dict], str, str]:
    """TRL's explicit-prompt conversational pair: ``prompt`` a message list ending with a user turn (or a string),
    ``chosen`` and ``rejected`` each a list of ONE assistant message (the response to that prompt)."""
    p = row.get("prompt")
    prompt = (check_messages(p, "prompt", end="user", tools=tools) if isinstance(p, list)
              else _user(_text(row, "prompt")))
    out = []
    for key in ("chosen", "rejected"):
        value = row.get(key)
        if not isinstance(value, list) or len(value) != 1:
            n = len(value) if isinstance(value, list) else type(value).__name__
            raise RowError(key, f"with a separate prompt, expected a list of one assistant message, got {n}")
        m = value[0]
        if isinstance(m, dict) and (m.get("tool_calls") is not None or m.get("function_call") is not None):
            raise RowError(f"{key}[0].tool_calls", _PAIR_CALLS)
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
            raise RowError(f"{key}[0]", f"expected {{'role': 'assistant', 'content': str}}, got {str(m)[:60]}")
        out.append(m["content"])
    return prompt, out[0], out[1]


def _preference(row: dict, fmt: str) -> dict:
    transcript, tools = None, parse_tools(row.get("tools")) if fmt == "chat" else None
    if fmt == "chat" and row.get("prompt") is not None:
        prompt, c, r = _explicit_prompt_pair(row, tools)
    elif fmt == "chat":
        chosen = check_messages(row.get("chosen"), "chosen", tools=tools)
        rejected = check_messages(row.get("rejected"), "rejected", tools=tools)
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if "tool_calls" in side[-1]:
                raise RowError(f"{key}[{len(side) - 1}].tool_calls", _PAIR_CALLS)
        n = _common_prefix_len(chosen[:-1], rejected[:-1])
        if n != len(chosen) - 1 or n != len(rejected) - 1:
            raise RowError("rejected", "chosen and rejected must share every message but the final assistant turn")
        prompt, c, r = chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]
        if not prompt or prompt[-1]["role"] not in ("user", "tool"):
            raise RowError("chosen", "expected at least one user message before the final assistant turn")
        _check_prompt_beside_chat(row.get("prompt"), prompt)
    elif fmt == "hh":
        transcript, c, r = split_hh(_text(row, "chosen"), _text(row, "rejected"))
        prompt = hh_turns(transcript)
    else:
        p = row.get("prompt")
        prompt = check_messages(p, "prompt", end="user") if isinstance(p, list) else _user(_text(row, "prompt"))
        c, r = _text(row, "chosen"), _text(row, "rejected")
    margin = row.get("margin")
    margin = None if margin is None else _number(margin, "margin", "a number or null")
    record = {"prompt": prompt, "chosen": c, "rejected": r, "margin": margin}
    if transcript is not None:
        record["transcript"] = transcript
    return record | _tools(tools)


def _check_prompt_beside_chat(text, prompt: list[dict]) -> None:
    """Rule: a ``prompt`` string beside conversational chosen/rejected must be their last user message (then it
    is redundant); one that differs would be silently ignored, so it is refused."""
    if isinstance(text, str) and text.strip() != prompt[-1]["content"].strip():
        raise RowError("prompt", f"differs from the last user message of chosen/rejected "
                                 f"({text[:40]!r} vs {prompt[-1]['content'][:40]!r}); keep one of them")


def _label(row: dict) -> bool:
    """An unpaired example's ``label``: a JSON/Parquet boolean, or the text true/false (CSV cells are text)."""
    value = row.get("label")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        shown = "missing" if value is None else f"got {type(value).__name__} ({repr(value)[:40]})"
        raise RowError("label", f"expected true or false (is the completion desirable?), {shown}")
    return value


def _unpaired(row: dict, fmt: str) -> dict:
    """TRL's unpaired preference row: ``prompt`` (a string, or a message list ending with a user turn),
    ``completion`` (a string, or a list of one assistant message) and ``label`` (true: desirable). A pair of any
    preference format stays a pair record here (`unpair` splits it after the validation split)."""
    if fmt != "unpaired":
        return _preference(row, fmt)
    p, c = row.get("prompt"), row.get("completion")
    prompt = check_messages(p, "prompt", end="user") if isinstance(p, list) else _user(_text(row, "prompt"))
    if isinstance(c, list):
        m = c[0] if len(c) == 1 else None
        if not isinstance(m, dict) or m.get("role") != "assistant" or not isinstance(m.get("content"), str):
            raise RowError("completion", f"expected a string or a list of one {{'role': 'assistant', 'content': str}}"
                                         f" message, got {str(c)[:60]}")
        completion = m["content"]
    else:
        completion = _text(row, "completion")
    return {"prompt": prompt, "completion": completion, "label": _label(row)}


def unpair(records: list[dict], report: DataReport) -> list[dict]:
    """Unpaired records with every pair record split into its desirable (chosen) and undesirable (rejected)
    example, both of the pair's line, in that order (TRL's `unpair_preference_dataset`). ``report`` then counts
    examples: each split pair adds one row read and kept."""
    out = []
    for r in records:
        if "chosen" not in r:
            out.append(r)
            continue
        shared = {k: v for k, v in r.items() if k not in ("chosen", "rejected", "margin")}
        out += [dict(shared, completion=r["chosen"], label=True), dict(shared, completion=r["rejected"], label=False)]
        report.rows_read += 1
        report.rows_kept += 1
    return out


def _prompt(row: dict, fmt: str, answer_field: str | None) -> dict:
    inp, tools = None, parse_tools(row.get("tools"))
    if fmt == "messages":
        msgs = check_messages(row.get("messages"), "messages", end="any", tools=tools)
        prompt = msgs[:-1] if msgs[-1]["role"] == "assistant" else msgs
        if prompt[-1]["role"] not in ("user", "tool"):
            raise RowError("messages", "expected a user turn (or a tool result) to prompt with")
    elif fmt == "preference":
        pair = _preference(row, preference_format(row))
        record = {"prompt": pair["prompt"], "input": None, "answer": _answer(row, answer_field)}
        return record | ({"transcript": pair["transcript"]} if "transcript" in pair else {}) | _tools(pair.get("tools"))
    elif fmt == "instruction":
        prompt, inp = _user(_text(row, "instruction")), _text(row, "input", required=False) or None
    else:
        p = row.get(fmt)
        prompt = check_messages(p, fmt, end="user", tools=tools) if isinstance(p, list) else _user(_text(row, fmt))
    return {"prompt": prompt, "input": inp, "answer": _answer(row, answer_field)} | _tools(tools)


def _answer(row: dict, answer_field: str | None) -> str | None:
    answer = row.get(answer_field) if answer_field else None
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise RowError(answer_field, f"expected a string or number, got {type(answer).__name__} ({answer!r})")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise RowError(answer_field, f"expected a string or number, got {answer} (not finite: no answer to check)")
    return None if answer is None else str(answer)


def responses(record: dict) -> list[str]:
    """Every response text of a canonical record (assistant turns, or the two sides of a pair)."""
    if "messages" in record:  # a turn that only calls tools shows its calls
        return [m["content"] + (json.dumps(m["tool_calls"]) if m.get("tool_calls") else "")
                for m in record["messages"] if m["role"] == "assistant"]
    return [record[k] for k in ("chosen", "rejected", "completion") if k in record]


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


def _group(row: dict, key: str) -> str:
    value = row.get(key)
    if value is None or isinstance(value, (dict, list)) or str(value) == "":
        raise RowError(key, f"expected a subset name (a string or number), got {value!r}")
    return str(value)


def _score(row: dict, score_field: str) -> float:
    return _number(row.get(score_field), score_field, "a number (data.score_field)")


def _prompt_messages(record: dict) -> list[dict]:
    return record["prompt"] if "prompt" in record else record["messages"]


def _spaced(value):
    """`value` with every text's trailing whitespace (of the text and of each line) and line endings made one form:
    rows that differ only there are the same row (a duplicate), and a pair whose sides differ only there prefers
    nothing. Indentation is kept: in code it is meaning."""
    if isinstance(value, str):
        return "\n".join(line.rstrip() for line in value.replace("\r\n", "\n").split("\n")).strip()
    if isinstance(value, dict):
        return {k: _spaced(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_spaced(v) for v in value]
    return value


def _quality_drop(record: dict, kind: Kind, seen: set | None) -> str | None:
    """The reason to drop a well-formed record, or None to keep it.

    One rule for every kind: a row whose user turns (and alpaca input) all show nothing is ``empty_prompt``,
    a response that shows nothing is ``empty_response`` (invisible characters count as nothing).
    """
    if kind != "prompt" and any(is_blank(r) for r in responses(record)):
        return "empty_response"
    users = [m["content"] for m in _prompt_messages(record) if m["role"] == "user"] + [record.get("input") or ""]
    if all(is_blank(u) for u in users):
        return "empty_prompt"  # nothing asked: a rollout has nothing to answer, SFT nothing to condition on
    if "chosen" in record and _spaced(record["chosen"]) == _spaced(record["rejected"]):
        return "chosen_equals_rejected"  # also when they differ in whitespace only: nothing to prefer
    if seen is not None:
        key = json.dumps(_spaced({k: v for k, v in record.items() if k != "line"}), sort_keys=True)
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
    group_field: str | None = None,
    setting: str = "data.train_file",
    subset: str | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[dict], DataReport]:
    """Read, validate, normalise and filter one source into canonical records (see the module docstring).

    Args:
        source: file path or hub dataset name.
        kind: which canonical record to build.
        format: a named input shape (`lit_ft.data.formats`) or ``"auto"`` to detect it from the first row.
        split: hub split to read.
        skip_bad_rows: drop and count malformed rows instead of raising a DataError.
        dedup: drop exact duplicates (same prompt and responses).
        score_field: a numeric column to filter on with ``min_score``.
        min_score: drop rows whose ``score_field`` is below this.
        answer_field: ground-truth answer column of prompt records (None: no answers).
        group_field: a column naming each row's subset, kept as the record's ``group`` (a string).
        setting: the setting that named ``source``, quoted in errors.
        subset: hub dataset configuration name.
        columns: columns renamed {from: to} before the format is detected.
    """
    rows, lines, report = read_rows(source, split, skip_bad_rows, setting, subset, columns)
    if rows and format == "auto":
        try:
            format = detect_format(rows[0], kind)
        except RowError as e:
            raise DataError(e.message, file=source, line=lines[0]) from None
    check_columns(rows, source, kind, format)
    warn_unknown_columns(rows, source, kind, format, {score_field, group_field, answer_field})
    build = {"instruction": _instruction, "preference": _preference, "unpaired": _unpaired,
             "prompt": lambda row, fmt: _prompt(row, fmt, answer_field)}[kind]
    records, seen, errors = [], set() if dedup else None, 0
    for row, line in zip(rows, lines):
        try:
            check_unicode(row)
            record = build(row, format)
            if group_field is not None:
                record["group"] = _group(row, group_field)
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
