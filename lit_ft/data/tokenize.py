"""Tokenize rendered segments into model inputs, with completion-only labels and an overlong policy.

Labels are aligned with ``input_ids`` (not shifted): the loss shifts them, as Hugging Face models do.
Each segment is tokenized on its own without added special tokens (the rendered chat text already holds
them; alpaca/plain append the EOS token as text), so response boundaries are exact. Because pad == EOS on
many tokenizers (SmolLM2), labels are built from segments, never by masking pad ids: the EOS ending each
response stays in the labels.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import Literal

from lit_ft.data.readers import DataReport
from lit_ft.data.hh import messages_for, prompt_for, response_for
from lit_ft.data.templates import (TemplateName, ToolFormat, check_tool_template, render_pair, render_prompt,
                                   render_segments, tool_parts)
from lit_ft.errors import DataError

IGNORE_INDEX = -100
Overlong = Literal["drop", "truncate_prompt", "error"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _too_long(file: str, line: int, total: int, max_length: int, detail: str) -> DataError:
    return DataError(
        f"{total} tokens exceed data.max_length={max_length} ({detail}); raise data.max_length or set "
        "data.overlong to 'drop' or 'truncate_prompt'", file=file, line=line)


def blame_row(fn):
    """A template that raises on one row (jinja2's ``raise_exception`` in a chat template, an undefined
    variable) becomes a DataError naming that row's file and line, with the template's error chained."""

    @functools.wraps(fn)
    def wrapper(record: dict, tokenizer, *args, **kwargs):
        try:
            return fn(record, tokenizer, *args, **kwargs)
        except DataError:
            raise
        except Exception as e:
            from jinja2.exceptions import TemplateError

            if not isinstance(e, TemplateError):
                raise
            raise DataError(f"the chat template refused this row: {type(e).__name__}: {e}",
                            file=kwargs.get("file"), line=record.get("line")) from e

    return wrapper


def tokenize_segments(
    segments: list[tuple[str, bool]], tokenizer, max_length: int, overlong: Overlong = "drop",
    completion_only: bool = True, file: str = "<data>", line: int = 0,
) -> tuple[list[int], list[int], str]:
    """``(input_ids, labels, drop_reason)``; drop_reason is "" for a kept row (then ids are never empty).

    A kept row has at least one trainable label after position 0 (position 0 is never predicted). Under
    ``truncate_prompt`` the sequence is cut from the left; the row is dropped as ``too_long`` when that
    would cut into the final response. Under ``error`` any overlong row raises a DataError.
    """
    ids: list[int] = []
    labels: list[int] = []
    last_response = 0
    for text, trainable in segments:
        seg = _ids(tokenizer, text)
        ids += seg
        labels += seg if (trainable or not completion_only) else [IGNORE_INDEX] * len(seg)
        if trainable:
            last_response = len(seg)
    if len(ids) > max_length:
        if overlong == "error":
            detail = f"prompt {len(ids) - last_response}, response {last_response}"
            raise _too_long(file, line, len(ids), max_length, detail)
        if overlong == "drop" or last_response >= max_length:
            return [], [], "too_long"
        ids, labels = ids[-max_length:], labels[-max_length:]
    if not any(label != IGNORE_INDEX for label in labels[1:]):
        return [], [], "no_trainable_tokens"
    return ids, labels, ""


@blame_row
def sft_example(
    record: dict, tokenizer, template: TemplateName, system_prompt: str | None, max_length: int,
    overlong: Overlong, completion_only: bool, file: str, tool_format: ToolFormat = "template",
) -> dict:
    """Dataset.map function: an instruction record to ``input_ids``, ``labels`` and ``drop``."""
    segments = render_segments(messages_for(record, template), tokenizer, template, system_prompt, record.get("input"),
                               tools=record.get("tools"), tool_format=tool_format)
    ids, labels, drop = tokenize_segments(segments, tokenizer, max_length, overlong, completion_only, file,
                                          record["line"])
    return {"input_ids": ids, "labels": labels, "drop": drop}


@blame_row
def preference_example(
    record: dict, tokenizer, template: TemplateName, system_prompt: str | None, max_length: int,
    overlong: Overlong, file: str, tool_format: ToolFormat = "template",
) -> dict:
    """Dataset.map function: a preference record to ``chosen_input_ids``, ``rejected_input_ids``,
    ``prompt_length`` (tokens of the shared prompt at the start of both), ``margin``, ``group`` (None without a
    group field), ``drop``.

    Both sides share the prompt tokens; ``truncate_prompt`` cuts the shared prompt from the left so both
    responses keep their ends (at least one prompt token must remain).
    """
    prompt = prompt_for(record, template)
    tools = record.get("tools")
    prompt_text, chosen_text = render_pair(prompt, response_for(record, record["chosen"], template), tokenizer,
                                           template, system_prompt, tools, tool_format)
    _, rejected_text = render_pair(prompt, response_for(record, record["rejected"], template), tokenizer, template,
                                   system_prompt, tools, tool_format)
    prompt, chosen, rejected = (_ids(tokenizer, t) for t in (prompt_text, chosen_text, rejected_text))
    longest = max(len(chosen), len(rejected))
    drop = ""
    if len(prompt) + longest > max_length:
        if overlong == "error":
            detail = f"prompt {len(prompt)}, chosen {len(chosen)}, rejected {len(rejected)}"
            raise _too_long(file, record["line"], len(prompt) + longest, max_length, detail)
        keep = max_length - longest
        if overlong == "drop" or keep < 1:
            drop = "too_long"
        else:
            prompt = prompt[-keep:]
    if drop:
        prompt = chosen = rejected = []
    # prompt_length: the shared prompt tokens, so DPO's labels can mask them (completion-only log-probs).
    return {"chosen_input_ids": prompt + chosen, "rejected_input_ids": prompt + rejected,
            "prompt_length": len(prompt), "margin": record.get("margin"), "group": record.get("group"), "drop": drop}


@blame_row
def unpaired_example(
    record: dict, tokenizer, template: TemplateName, system_prompt: str | None, max_length: int,
    overlong: Overlong, file: str, tool_format: ToolFormat = "template",
) -> dict:
    """Dataset.map function: an unpaired record (KTO) to ``input_ids`` (prompt + completion), ``labels`` (-100 on
    the prompt), ``prompt_length``, ``label`` (True: desirable) and ``drop``.

    The prompt and the completion are tokenized apart, as a pair's sides are, so the collator can put one example's
    completion after another's prompt (KTO's mismatched pairs). ``truncate_prompt`` cuts the prompt from the left
    (at least one prompt token must remain).
    """
    prompt_text, completion_text = render_pair(prompt_for(record, template),
                                               response_for(record, record["completion"], template), tokenizer,
                                               template, system_prompt, record.get("tools"), tool_format)
    prompt, completion = _ids(tokenizer, prompt_text), _ids(tokenizer, completion_text)
    drop = ""
    if len(prompt) + len(completion) > max_length:
        if overlong == "error":
            detail = f"prompt {len(prompt)}, completion {len(completion)}"
            raise _too_long(file, record["line"], len(prompt) + len(completion), max_length, detail)
        keep = max_length - len(completion)
        if overlong == "drop" or keep < 1:
            drop = "too_long"
        else:
            prompt = prompt[-keep:]
    if drop:
        prompt = completion = []
    return {"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion,
            "prompt_length": len(prompt), "label": bool(record["label"]), "drop": drop}


@blame_row
def prompt_example(
    record: dict, tokenizer, template: TemplateName, system_prompt: str | None, max_length: int,
    overlong: Overlong, file: str, tool_format: ToolFormat = "template",
) -> dict:
    """Dataset.map function: a prompt record to ``input_ids``, ``prompt`` (rendered text), ``answer``, ``drop``."""
    text = render_prompt(prompt_for(record, template), tokenizer, template, system_prompt, record.get("input"),
                         record.get("tools"), tool_format)
    ids, drop = _ids(tokenizer, text), ""
    if len(ids) > max_length:
        if overlong == "error":
            raise _too_long(file, record["line"], len(ids), max_length, "prompt only")
        if overlong == "drop":
            ids, text, drop = [], "", "too_long"
        else:  # keep the end of the prompt, next to where the response starts
            ids = ids[-max_length:]
            text = tokenizer.decode(ids)
    return {"input_ids": ids, "prompt": text, "answer": record.get("answer"), "drop": drop}


_EXAMPLE_FNS = {"instruction": sft_example, "preference": preference_example, "prompt": prompt_example,
                "unpaired": unpaired_example}


def _example(row: dict, tokenizer, kind: str, **settings) -> dict:
    """Dataset.map function: one record, stored as its JSON text (so Arrow keeps every message and tool-call
    argument as written: a table of rows would unify their dicts' keys, filling the missing ones with null), through
    its kind's ``*_example`` function."""
    return _EXAMPLE_FNS[kind](json.loads(row["record"]), tokenizer, **settings)


def tokenize_records(records: list[dict], kind: str, report: DataReport, num_proc: int | None = None,
                     **settings) -> "datasets.Dataset":  # noqa: F821
    """Tokenize canonical records with ``datasets.Dataset.map`` and drop (counting into ``report``) what failed.

    ``settings`` are the keyword arguments of the kind's ``*_example`` function after ``tokenizer`` (the
    map fingerprint covers them, so a changed setting re-tokenizes). Returns a Dataset of the output columns.
    """
    import datasets

    if not records:
        return datasets.Dataset.from_dict({})
    check_tool_template(settings["tokenizer"], settings["template"], tool_parts(records),
                        settings.get("tool_format", "template"))
    ds = datasets.Dataset.from_list([{"line": r["line"], "record": json.dumps(r)} for r in records])
    ds = ds.map(
        _example, fn_kwargs={**settings, "kind": kind}, num_proc=num_proc if num_proc and num_proc > 1 else None,
        remove_columns=[c for c in ds.column_names if c != "line"], desc=f"tokenizing {report.source}",
    )
    counts = Counter(ds["drop"])
    for reason, n in counts.items():
        if reason:
            report.drop(reason, n)
    report.check()
    if len(counts) > 1 or "" not in counts:
        ds = ds.select([i for i, d in enumerate(ds["drop"]) if not d])
    ds = ds.remove_columns("drop")
    # The columns in the order a map over the records themselves gives (a record's own keys first, in its order):
    # the resume check digests the table as laid out, and checkpoints written before the JSON storage hold that.
    first = [k for k in records[0] if k in ds.column_names]
    return ds.select_columns(first + [c for c in ds.column_names if c not in first])
