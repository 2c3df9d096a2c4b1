"""Checks between normalising and tokenizing: what the tokenizer and the model's context make of a record.

- Control tokens in user data. The tokenizer encodes a special token's text (``<|im_end|>``) found anywhere in a
  string as that control token, so an instruction holding ``<|im_end|>\\n<|im_start|>assistant\\n...`` would
  become extra turns (a prompt-injection path into the training data) and a response holding the EOS text would
  train two EOS labels. Decided: such rows are dropped and counted (``control_token``), with their lines logged;
  the texts are never re-interpreted.
- Bounded work for long rows. No token decodes to more than ``L`` characters (``L``: the longest vocabulary
  entry), so a text of more than ``max_length * L`` characters cannot fit in ``max_length`` tokens, and every
  message that shows something takes at least one token. Both are decided before tokenizing (a 50 MB line is
  never tokenized; a 2,000-turn conversation is never rendered turn by turn): ``drop`` and ``error`` refuse the
  row at once, ``truncate_prompt`` keeps the end of each prompt text and the last turns, which is all that the
  token-level truncation from the left could keep.
- The model's context: ``data.max_length`` above ``max_position_embeddings`` is clamped, naming both numbers.
- Row checks used while normalising (`lit_ft.data.records`): text that shows nothing, lone surrogates, columns
  a format does not read.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from lit_ft.data.readers import DataReport, RowError
from lit_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# Characters that print nothing: zero-width space/joiners, word joiner, BOM, soft hyphen (all category Cf), the
# Hangul fillers and the braille blank. A response made of these (and whitespace) is empty in effect.
_INVISIBLE = {"\u115f", "\u1160", "\u3164", "\uffa0", "\u2800"}


def is_blank(text: str) -> bool:
    """True when ``text`` shows nothing: whitespace, control and format characters only."""
    import unicodedata

    return all(ch.isspace() or ch in _INVISIBLE or unicodedata.category(ch) in ("Cf", "Cc") for ch in text)


def check_unicode(row: dict) -> None:
    """Refuse lone surrogates (JSON ``"\\ud800"``): Python accepts them, UTF-8 (Arrow, tokenizers) cannot encode them.
    Checked on the raw row, so the error names the field of the file (``output``, ``messages[1]``)."""
    stack = list(row.items())
    while stack:
        name, value = stack.pop()
        if isinstance(value, list):
            stack += [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            stack += [(name, v) for v in value.values()]
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError(name, f"holds a lone surrogate {value[e.start]!r} at character {e.start + 1} "
                                     "(not valid Unicode; fix the escape in the file)") from None


_READS = {"alpaca": {"instruction", "input", "output"}, "prompt_completion": {"prompt", "completion"},
          "question_answer": {"question", "answer"}, "messages": {"messages", "tools"},
          "preference": {"prompt", "chosen", "rejected", "margin"}}


def warn_unknown_columns(rows: list[dict], source: str, kind: str, format: str, settings: set) -> set[str]:
    """Warn once per file about instruction columns the format does not read (a misspelled ``inputs`` would
    otherwise silently lose its context). Returns the unknown column names."""
    if kind != "instruction" or format not in _READS:
        return set()
    unknown = set().union(*(row.keys() for row in rows)) - _READS[format] - settings
    if unknown:
        log.warning("%s: columns %s are not read by the %s format (it reads %s); misspelled?", source,
                    sorted(unknown), format, sorted(_READS[format]))
    return unknown


def control_pattern(tokenizer) -> re.Pattern | None:
    """A regex matching any special token's text (EOS, pad, chat markers), or None when there are none."""
    specials = set(tokenizer.all_special_tokens)
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    specials = sorted((s for s in specials if s), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, specials))) if specials else None


def _texts(record: dict) -> list[tuple[str, str]]:
    """(field, text) of every user-supplied string of a canonical record."""
    out = []
    for key in ("messages", "prompt"):
        out += [(f"{key}[{i}]", m["content"]) for i, m in enumerate(record.get(key) or [])]
    out += [(k, record[k]) for k in ("input", "chosen", "rejected", "completion") if isinstance(record.get(k), str)]
    return out


def drop_control_tokens(records: list[dict], tokenizer, report: DataReport, file: str) -> list[dict]:
    """Drop (and count as ``control_token``) the records whose texts hold a special token's text."""
    pattern = control_pattern(tokenizer)
    if pattern is None:
        return records
    kept, shown = [], 0
    for record in records:
        hit = next(((k, m.group()) for k, t in _texts(record) if (m := pattern.search(t))), None)
        if hit is None:
            kept.append(record)
            continue
        report.drop("control_token")
        shown += 1
        if shown <= 5:
            log.warning("dropping %s:%s: field '%s' holds the control token %r as text", file, record["line"], *hit)
    return kept


def longest_token_chars(tokenizer) -> int:
    """Characters of the longest vocabulary entry: no token decodes to more (byte-level entries are one
    character per byte, so this over-counts multi-byte text: a safe bound)."""
    return max(1, max((len(t) for t in tokenizer.get_vocab()), default=1))


def min_message_tokens(tokenizer, template: str) -> int:
    """A lower bound on the tokens one message that shows something takes: 1, or for a chat template the tokens
    it adds around a one-token message, less a margin of two for merges at the edges (ChatML: about 4)."""
    if template != "chat":
        return 1
    u, a = {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}
    try:
        n = [len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
             for m in ([u], [u, a], [u, a, u])]
    except Exception:  # a template that refuses these is reported by check_template / per row
        return 1
    return max(1, min(n[1] - n[0], n[2] - n[1]) - 2)


def bound_lengths(records: list[dict], kind: str, tokenizer, max_length: int, overlong: str,
                  report: DataReport, file: str, template: str = "chat") -> tuple[list[dict], DataError | None]:
    """Refuse or cut, by characters and message counts, the rows that cannot fit ``max_length`` tokens.

    Returns the records to tokenize and, under ``overlong="error"``, the error of the first refused row (the
    records returned are then the ones before it, so an earlier row that is too long by tokens still raises
    first, in file order).
    """
    limit = max_length * longest_token_chars(tokenizer)
    per = min_message_tokens(tokenizer, template)
    kept = []
    for record in records:
        problem = _bound(record, kind, limit, max_length, per, overlong == "truncate_prompt")
        if problem is None:
            kept.append(record)
        elif overlong == "error":
            return kept, DataError(f"{problem}: more than data.max_length={max_length} tokens can hold; raise "
                                   "data.max_length or set data.overlong to 'drop' or 'truncate_prompt'",
                                   file=file, line=record["line"])
        else:
            report.drop("too_long")
    return kept, None


def _bound(record: dict, kind: str, limit: int, max_length: int, per: int, truncate: bool) -> str | None:
    """Why the record cannot fit (None: it may; then over-long prompt texts were cut when ``truncate``).

    ``per``: tokens each message that shows something takes at least, so a window of ``max_length`` tokens holds
    parts of at most ``max_length // per + 1`` of them."""
    key = "messages" if kind == "instruction" else "prompt"
    messages = record[key]
    responses = [(k, record[k]) for k in ("chosen", "rejected", "completion") if k in record]
    if kind == "instruction":
        responses = [(f"messages[{len(messages) - 1}]", messages[-1]["content"])]
    for name, text in responses:
        if len(text) > limit:
            return f"field '{name}' has {len(text):,} characters"
    shown = sum(not is_blank(m["content"]) for m in messages)
    many = f"{shown:,} messages (each takes at least {per} token{'s' * (per > 1)})"
    if not truncate:
        if shown * per > max_length:
            return many
        long = next((f"{key}[{i}]" for i, m in enumerate(messages) if len(m["content"]) > limit), None)
        if long is None and len(record.get("input") or "") > limit:
            long = "input"
        return f"field '{long}' has more characters than that" if long else None
    keep = max_length // per + 2
    if len(messages) > keep:  # keep the leading system turns and the last turns, starting at a user turn
        system = [m for m in messages if m["role"] == "system"]
        rest = [m for m in messages if m["role"] != "system"][-keep:]
        while rest and rest[0]["role"] != "user":
            rest = rest[1:]
        if not rest:
            return many
        record[key] = messages = system + rest
        if "input" in record:
            record["input"] = None  # it belonged to the first user turn, now cut
    end = len(messages) - 1 if kind == "instruction" else len(messages)
    for m in messages[:end]:
        if len(m["content"]) > limit:
            m["content"] = m["content"][-limit:]
    if record.get("input") and len(record["input"]) > limit:
        record["input"] = record["input"][-limit:]
    return None


def check_context(tokenizer_dir: str | None, max_length: int) -> int:
    """``data.max_length``, clamped (with a warning naming both numbers) to the model's context, read from its
    config.json without loading weights. Clamped, not refused: the default max_length is larger than the context of
    small models, and positions past the context would be garbage rather than an error."""
    if not tokenizer_dir:
        return max_length
    config = Path(tokenizer_dir) / "config.json"
    if not config.is_file():
        return max_length  # a tokenizer-only folder or a hub id: nothing local to compare with
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.base.name_or_path: cannot read {config}: {e}") from e
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    context = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if isinstance(cfg.get(k), int)), None)
    if context is not None and max_length > context:
        log.warning("data.max_length=%d exceeds the model's context (max_position_embeddings=%d in %s): using "
                    "data.max_length=%d", max_length, context, config, context)
        return context
    return max_length
