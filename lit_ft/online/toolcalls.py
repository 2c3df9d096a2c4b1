"""Tool calls read from the model's text, one parser per family of formats (`TOOL_PARSERS`: text -> (content,
calls) in canonical form, `lit_ft.data.tools`, or None for a malformed call), the parser a chat template implies
(`tool_format`), and the model's turn as an assistant message (`assistant_message`). The episodes
(`lit_ft.online.episodes`) read every model turn through these."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any



def _call(obj: Any, key: str) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"type": "function", "function": {"name": obj["name"], "arguments": args}}


def _calls(texts: list[str], key: str) -> list[dict] | None:
    """Each text one JSON call object (its arguments under `key`), in canonical form; None when any is malformed."""
    calls = []
    for text in texts:
        try:
            call = _call(json.loads(text), key)
        except json.JSONDecodeError:
            return None
        if call is None:
            return None
        calls.append(call)
    return calls


def parse_hermes(text: str) -> tuple[str, list[dict]] | None:
    """`<tool_call>{json}</tool_call>` blocks: (the text outside them, the calls); None when a block is malformed
    (not JSON, no name, arguments not an object, unclosed); ("text", []) when there is no block."""
    if "<tool_call>" not in text:
        return text, []
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S)
    if len(blocks) != text.count("<tool_call>"):
        return None
    calls = _calls(blocks, "arguments")
    return None if calls is None else (re.sub(r"<tool_call>.*?</tool_call>", "", text, flags=re.S).strip(), calls)


def parse_llama3_json(text: str) -> tuple[str, list[dict]] | None:
    """Llama 3.1's JSON tool calls: the turn (after `<|python_tag|>` if present) is one `{"name", "parameters"}`
    object, or several separated by `;`. Text that does not start like a call is plain text; one that does but
    does not parse is malformed (None)."""
    body = text.split("<|python_tag|>", 1)[1] if "<|python_tag|>" in text else text
    body = body.strip()
    if not (body.startswith("{") and '"name"' in body):
        return text, []
    calls = _calls(body.split(";"), "parameters")
    return None if calls is None else ("", calls)


TOOL_PARSERS: dict[str, Callable[[str], tuple[str, list[dict]] | None]] = {
    "hermes": parse_hermes, "llama3_json": parse_llama3_json}
"""One parser per family of tool-call formats: text -> (content, calls), or None for a malformed call."""


def tool_format(tokenizer, setting: str, render_tools: str = "template") -> str:
    """The parser's name for `setting` (`auto`: hermes under `render_tools` hermes, else read from the chat template;
    hermes when it shows nothing)."""
    if setting != "auto":
        return setting
    if render_tools == "hermes":
        return "hermes"
    template = str(getattr(tokenizer, "chat_template", "") or "")
    if "<|python_tag|>" in template or '"parameters"' in template:
        return "llama3_json"
    return "hermes"


def assistant_message(text: str, parser: Callable) -> tuple[dict, bool]:
    """The model's turn as an assistant message, and whether it called a tool. A malformed call is passed on as the
    turn's text, unparsed, for the environment to answer."""
    parsed = parser(text)
    if parsed is None or not parsed[1]:
        return {"role": "assistant", "content": text}, False
    content, calls = parsed
    for i, c in enumerate(calls):
        c["id"] = f"call_{i}"
    return {"role": "assistant", "content": content, "tool_calls": calls}, True
