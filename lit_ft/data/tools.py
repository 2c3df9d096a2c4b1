"""Tool-calling conversations: the ``tools`` column and the tool-call and tool-result messages of a row, checked and
made one canonical form (`lit_ft.data.records` calls these while building records; `lit_ft.data.templates` renders
them with the chat template's own tool support).

Canonical form:

- ``tools``: a list of ``{"type": "function", "function": {"name", "description", "parameters"}}`` (TRL's and the
  chat templates' form); a bare ``{"name", ...}`` schema (LLaMA-Factory's) is wrapped, a JSON string is parsed.
- an assistant message that calls: ``{"role": "assistant", "content": str ("" when it only calls),
  "tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict}, "id": str (when given)}]}``;
  ``arguments`` given as JSON text is parsed; OpenAI's older ``function_call`` ({name, arguments}) is one call.
- a tool result: ``{"role": "tool", "content": str, "name": str, "tool_call_id": str (when given)}``: it answers a
  call of the assistant turn before it, matched by ``tool_call_id``, else by ``name``, else by position (the k-th
  result answers the k-th call, as in ShareGPT's ``observation`` turns); ``name`` is filled in from its call.
"""

from __future__ import annotations

import json
from typing import Any

from lit_ft.data.readers import RowError


def parse_tools(value: Any, key: str = "tools") -> list[dict] | None:
    """The ``tools`` column in canonical form (None when absent or empty)."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(key, f"expected a list of tool schemas (or its JSON text); not JSON: {e.msg}") from None
    if not isinstance(value, list):
        raise RowError(key, f"expected a list of tool schemas, got {type(value).__name__}")
    out = []
    for i, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(f"{key}[{i}]", "expected {'type': 'function', 'function': {'name': str, 'description', "
                                          f"'parameters'}}}}, got {str(tool)[:60]}")
        out.append({"type": "function", "function": fn})
    return out


def _arguments(value: Any, field: str) -> dict:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise RowError(field, f"the arguments are not JSON ({e.msg} at column {e.colno}): {value[:60]!r}") from None
    if not isinstance(value, dict):
        raise RowError(field, f"the arguments must be a JSON object, got {type(value).__name__} ({str(value)[:40]})")
    return value


def parse_tool_calls(m: dict, field: str, tools: list[dict] | None) -> list[dict]:
    """An assistant message's calls in canonical form (``tool_calls``, or the older single ``function_call``)."""
    calls = m.get("tool_calls")
    key = "tool_calls"
    if calls is None and m.get("function_call") is not None:
        calls, key = m["function_call"], "function_call"
        if isinstance(calls, str):  # ShareGPT's function_call turn: the call(s) as JSON text
            try:
                calls = json.loads(calls)
            except json.JSONDecodeError as e:
                raise RowError(f"{field}.function_call", f"the call is not JSON ({e.msg} at column {e.colno}): "
                                                         f"{calls[:60]!r}") from None
        calls = [{"function": c} for c in (calls if isinstance(calls, list) else [calls])]
    if calls is None:
        return []
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{field}.{key}", f"expected a non-empty list of calls, got {str(calls)[:60]}")
    names = None if tools is None else {t["function"]["name"] for t in tools}
    out = []
    for j, call in enumerate(calls):
        where = f"{field}.{key}" if key == "function_call" else f"{field}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise RowError(f"{where}.function.name" if key == "tool_calls" else where,
                           f"a tool call without a function name: {str(call)[:60]}")
        if names is not None and fn["name"] not in names:
            raise RowError(f"{where}.function.name" if key == "tool_calls" else where,
                           f"calls '{fn['name']}', which is not in the row's tools {sorted(names)}")
        c = {"type": "function", "function": {"name": fn["name"], "arguments": _arguments(
            fn.get("arguments"), f"{where}.function.arguments" if key == "tool_calls" else where)}}
        if isinstance(call.get("id"), str) and call["id"]:
            c["id"] = call["id"]
        out.append(c)
    return out


def match_tool_result(m: dict, field: str, pending: list[dict], answered: int) -> dict:
    """A tool message in canonical form, matched to one of ``pending`` (the calls of the assistant turn before it,
    ``answered`` of them answered by earlier tool messages)."""
    if not pending:
        raise RowError(f"{field}.role", "a tool message without a preceding tool call")
    call_id, name = m.get("tool_call_id"), m.get("name")
    if call_id is not None:
        hit = next((c for c in pending if c.get("id") == call_id), None)
        if hit is None:
            ids = [c["id"] for c in pending if "id" in c]
            raise RowError(f"{field}.tool_call_id", f"{call_id!r} matches no call of the assistant turn before it "
                                                    f"(its ids: {ids})")
    elif name is not None:
        hit = next((c for c in pending if c["function"]["name"] == name), None)
        if hit is None:
            raise RowError(f"{field}.name", f"{name!r} matches no call of the assistant turn before it (it calls "
                                            f"{[c['function']['name'] for c in pending]})")
    else:
        if answered >= len(pending):
            raise RowError(f"{field}.role", f"a tool message without a preceding tool call (the assistant turn "
                                            f"before it made {len(pending)} call(s), all answered)")
        hit = pending[answered]
    out = {"role": "tool", "content": m["content"], "name": hit["function"]["name"]}
    if "id" in hit:
        out["tool_call_id"] = hit["id"]
    return out



# ---------------------------------------------------------------------------------------------- the Hermes fallback

TOOL_FORMATS = ("template", "hermes")
"""`data.tool_format` / `model.episodes.render_tools`: `template` passes tools, calls and results to the chat template
as they are (refused where it drops them); `hermes` writes them into plain messages first (`hermes_messages`)."""

HERMES_TOOLS = ('Tools:\n<tools>\n{tools}\n</tools>\nCall one as <tool_call>\n{{"name": ..., "arguments": {{...}}}}\n'
                "</tool_call>")
"""The system message's tools block under `hermes` (Qwen2.5's and Hermes' layout, shortened: the schemas as one JSON
list inside `<tools>`, then how a call is written)."""


def hermes_call(call: dict) -> str:
    """One canonical call as the Hermes format writes it (what `lit_ft.online.episodes.parse_hermes` reads)."""
    fn = call["function"]
    body = json.dumps({"name": fn["name"], "arguments": fn.get("arguments") or {}}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def hermes_messages(messages: list[dict], tools: list[dict] | None, tool_role: str = "tool") -> list[dict]:
    """Canonical messages with tool parts -> plain chat messages in the Hermes (Qwen2.5) form, for a chat template
    that renders plain role/content turns but not `tools=`, `tool_calls` or the tool role:

    - ``tools``: the `HERMES_TOOLS` block (the schemas as one JSON list) appended to the system message, one made
      when there is none (the first message);
    - an assistant turn that calls: its content, then each call as ``<tool_call>\\n{"name", "arguments"}\\n
      </tool_call>`` (`hermes_call`), one a line;
    - a tool result: a turn of role ``tool_role`` (``tool`` where the template renders that role, else ``user``)
      whose content is ``<tool_response>\\n...\\n</tool_response>``.

    Other turns pass as they are (role and content only). Messages without tool parts and no tools come back
    unchanged, so the same conversation renders the same with or without the fallback."""
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            text = "\n".join([m["content"]] * bool(m.get("content")) + [hermes_call(c) for c in m["tool_calls"]])
            out.append({"role": "assistant", "content": text})
        elif m["role"] == "tool":
            out.append({"role": tool_role, "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        block = HERMES_TOOLS.format(tools=json.dumps(tools, ensure_ascii=False))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{block}" if out[0]["content"] else block
        else:
            out.insert(0, {"role": "system", "content": block})
    return out
