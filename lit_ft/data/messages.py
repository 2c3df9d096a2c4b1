"""The chat-message rule every conversation in a data file meets (`lit_ft.data.records` applies it to each row's
message lists): system turns first only, then user and assistant alternating from a user turn; an assistant turn
that calls tools is followed by their results (`lit_ft.data.tools` parses the calls and matches the results)."""

from __future__ import annotations

from typing import Any, Literal

from lit_ft.data.readers import RowError
from lit_ft.data.tools import match_tool_result, parse_tool_calls

ROLES = ("system", "user", "assistant", "tool")


def check_messages(value: Any, key: str, end: Literal["assistant", "user", "any"] = "assistant",
                   tools: list[dict] | None = None) -> list[dict]:
    """Validate a chat message list: system turns only first, then user/assistant alternating from user; an
    assistant turn that calls tools (`lit_ft.data.tools`) is followed by their results (``tool`` turns), then by the
    assistant again. ``end="user"``: a prompt, which ends with a user turn or a tool result."""
    if not isinstance(value, list) or not value:
        raise RowError(key, f"expected a non-empty list of {{role, content}} messages, got {type(value).__name__}")
    out, expected, pending, answered = [], ("user",), [], 0
    for i, m in enumerate(value):
        calls = isinstance(m, dict) and m.get("role") == "assistant" and (
            m.get("tool_calls") is not None or m.get("function_call") is not None)
        if isinstance(m, dict) and calls and m.get("content") is None:
            m = dict(m, content="")  # an assistant turn that only calls: OpenAI's content null
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise RowError(f"{key}[{i}]", f"expected {{'role': one of {list(ROLES)}, 'content': str}}, got {str(m)[:60]}")
        role = m["role"]
        if role == "system" and out and out[-1]["role"] != "system":
            raise RowError(f"{key}[{i}].role", "a system message may only come before the conversation")
        if role == "tool":
            out.append(match_tool_result(m, f"{key}[{i}]", pending, answered))
            answered += 1
            expected = ("tool", "assistant")
            continue
        if role != "system":
            if role not in expected:
                why = {("tool",): "the results of the calls of the assistant turn before it",
                       ("tool", "assistant"): "the assistant answers after the tool results"}.get(
                    expected, "turns alternate, starting with user")
                raise RowError(f"{key}[{i}].role", f"expected '{expected[-1]}' ({why})")
            pending, answered = [], 0
            if role == "assistant":
                pending = parse_tool_calls(m, f"{key}[{i}]", tools)
            expected = ("assistant",) if role == "user" else ("tool",) if pending else ("user",)
        msg = {"role": role, "content": m["content"]}
        if role == "assistant" and pending:
            msg["tool_calls"] = pending
        out.append(msg)
    last = out[-1]["role"]
    if end == "assistant" and last != "assistant" or end == "user" and last not in ("user", "tool"):
        raise RowError(f"{key}[{len(out) - 1}].role", f"expected the last message to be '{end}'"
                       + (" (or a tool result)" if end == "user" else ""))
    return out
