"""Render canonical records into text segments: ``[(text, trainable), ...]``.

Concatenating the segment texts gives the full training text; ``trainable`` marks the response segments
(every assistant turn). Three templates:

- ``chat``: the tokenizer's own chat template. Turn i's response is render(messages[:i+1]) minus
  render(messages[:i], add_generation_prompt=True), so each segment is exactly what the template emits,
  including its end-of-turn token.
- ``alpaca``: ``### Instruction:\\n...\\n\\n### Input:\\n...\\n\\n### Response:\\n`` (Taori et al. 2023,
  Stanford Alpaca), each response followed by the EOS token. A system prompt, if any, is the preamble.
- ``plain``: prompt + response + EOS, concatenated as is (the data supplies its own separators).

Tool parts (`lit_ft.data.tools`) under ``chat``: ``tool_format='template'`` passes them to the chat template
(``tools=``, assistant ``tool_calls``, the ``tool`` role), refused where a probe shows it drops them
(`check_tool_template`); ``tool_format='hermes'`` first writes them into plain messages in the Hermes form
(`lit_ft.data.tools.hermes_messages`: tools in the system message, ``<tool_call>`` blocks in the assistant's text,
``<tool_response>`` turns), which any chat template renders; the episodes of the online stages render with the same
function, so what SFT trains on is what a rollout shows the model.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Literal

from lit_ft.data.tools import hermes_messages
from lit_ft.errors import ConfigError

TemplateName = Literal["chat", "alpaca", "plain"]
ToolFormat = Literal["template", "hermes"]
Segments = list[tuple[str, bool]]

RENDER_SECONDS = 10.0
"""The longest one chat-template render may take: a template is a program shipped with a model, and one that loops
without end (nested loops over a range) would otherwise hold the run before its first step."""


class TemplateTimeout(Exception):
    pass


@contextlib.contextmanager
def _time_limit(seconds: float):
    """Raise TemplateTimeout in the block after `seconds` (SIGALRM: the main thread of a Unix process, where the
    command renders; elsewhere, a DataLoader worker or a thread, or where the caller already runs a timer of its own,
    which is left alone, the block runs unlimited)."""
    if (threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer")
            or signal.getitimer(signal.ITIMER_REAL)[0] > 0):
        yield
        return

    def expire(signum, frame):
        raise TemplateTimeout(f"rendering took longer than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_template(template: str, tokenizer) -> None:
    """Refuse a template the tokenizer cannot render."""
    if template not in ("chat", "alpaca", "plain"):
        raise ConfigError(f"data.template: unknown template '{template}'; expected chat, alpaca or plain")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.template='chat' but the tokenizer has no chat template; use template 'alpaca' or 'plain', "
            "or a tokenizer (model) that ships one"
        )
    if template == "chat":
        _probe_chat_template(tokenizer)
    if template != "chat" and tokenizer.eos_token is None:
        raise ConfigError(f"data.template='{template}' appends the EOS token but the tokenizer has none")


def _probe_chat_template(tokenizer) -> None:
    """Render one two-turn conversation, so a broken template (a Jinja syntax error, a call it cannot make) is
    one ConfigError before any row is read, with the template engine's error chained."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    problem = (f"data.template='chat': the chat template of {where} (tokenizer_config.json or chat_template.jinja)"
               " {}; fix the template or use data.template 'alpaca' or 'plain'")
    try:
        text = _chat(tokenizer, probe)
        _chat(tokenizer, probe[:1], add_generation_prompt=True)
    except ConfigError:
        raise
    except Exception as e:  # jinja2's TemplateSyntaxError/UndefinedError, TypeError from a bad filter, ...
        raise ConfigError(problem.format(f"fails on a plain two-turn conversation: {type(e).__name__}: {e}")) from e
    if "Hi" not in text or "Hello" not in text:
        raise ConfigError(problem.format(f"leaves the messages out of a two-turn conversation (renders {text[:60]!r})"))


_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_schema_fn", "description": "Looks a word up.",
    "parameters": {"type": "object", "properties": {"word": {"type": "string"}}, "required": ["word"]}}}
_PROBE_CALL = [{"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_probe", "type": "function", "function": {
                   "name": "probe_call_fn", "arguments": {"word": "hi"}}}]},
               {"role": "tool", "tool_call_id": "call_probe", "name": "probe_call_fn", "content": "probe_result_text"}]


def tool_parts(records: list[dict]) -> list[str]:
    """The tool parts canonical records use, in the order a template is probed for them: tools, tool_calls and
    the tool role."""
    msgs = [m for r in records for m in (r.get("messages") or r.get("prompt") or [])]
    return [part for part, used in (("tools", any(r.get("tools") for r in records)),
                                    ("tool_calls", any(m.get("tool_calls") for m in msgs)),
                                    ("the tool role", any(m["role"] == "tool" for m in msgs))) if used]


_FALLBACK = ("set data.tool_format hermes (tools, calls and results written into plain messages in the Hermes form "
             "before the chat template renders them; docs/data.md)")


def check_tool_template(tokenizer, template: str, parts: list[str], tool_format: ToolFormat = "template") -> None:
    """Refuse, before any row is tokenized, a template that would drop the tool parts the data uses: a text
    template (alpaca, plain), or (``tool_format='template'``) a chat template whose rendering of a probe
    conversation leaves out the tool schema's name (``tools``), the called function's name (``tool_calls``) or the
    tool's result (``the tool role``). A template that raises on them is refused the same way, with its error
    chained. Under ``tool_format='hermes'`` any chat template renders them (as plain messages)."""
    if not parts:
        return
    if template != "chat":
        raise ConfigError(f"data.template='{template}' cannot render {', '.join(parts)}; rows with tool calls "
                          "need data.template 'chat' and a chat template that supports tool calling, or "
                          "data.template 'chat' with data.tool_format hermes")
    if tool_format == "hermes":
        return
    where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
    probes = {"tools": (_PROBE_CALL[:1], "probe_schema_fn"), "tool_calls": (_PROBE_CALL[:2], "probe_call_fn"),
              "the tool role": (_PROBE_CALL, "probe_result_text")}
    for part in parts:
        messages, needle = probes[part]
        try:
            text = _chat(tokenizer, messages, add_generation_prompt=part != "tool_calls", tools=[_PROBE_TOOL])
        except ConfigError:
            raise
        except Exception as e:
            text, error = "", e
        else:
            error = None
        if needle not in text:
            raise ConfigError(
                f"data.template='chat': the chat template of {where} ignores {part} (a probe conversation renders "
                f"without {needle!r}{f': {type(error).__name__}: {error}' if error else ''}), and this data has "
                "them; use a model whose chat template supports tool calling (as Qwen2.5's and Llama 3.1's do), "
                f"give the tokenizer such a template, or {_FALLBACK}") from error


_TOOL_ROLES: dict[str, str] = {}


def tool_role(tokenizer) -> str:
    """The role a tool result takes under ``tool_format='hermes'``: ``tool`` where the chat template renders a plain
    turn of that role with its content as given (SmolLM2's writes any role), else ``user`` (as Qwen2.5 does).
    Probed once a template."""
    key = str(getattr(tokenizer, "chat_template", "") or "")
    if key not in _TOOL_ROLES:
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                 {"role": "tool", "content": "probe_result_text"}]
        try:
            text = _chat(tokenizer, probe, add_generation_prompt=True)
        except ConfigError:
            raise
        except Exception:  # a template that refuses the role (raise_exception), or any other failure on it
            text = ""
        # "tool" only where the template writes the content as given (one that wraps it in <tool_response> itself,
        # as Qwen2.5's does, would wrap it twice)
        _TOOL_ROLES[key] = "tool" if "probe_result_text" in text and "<tool_response>" not in text else "user"
    return _TOOL_ROLES[key]


def as_chat(messages: list[dict], tokenizer, tools: list[dict] | None,
            tool_format: ToolFormat) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) as the chat template is given them: unchanged under ``template``; under ``hermes`` the
    plain messages of `lit_ft.data.tools.hermes_messages` and no tools (only when there are tool parts)."""
    if tool_format != "hermes" or not (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)):
        return messages, tools
    return hermes_messages(messages, tools, tool_role(tokenizer)), None


def _prepare(messages: list[dict], system_prompt: str | None, input: str | None) -> list[dict]:
    """Apply the default system prompt (the data's own system turn wins; "" is an empty system turn, which keeps a
    chat template from inserting its own) and append ``input`` to the first user turn."""
    msgs = [dict(m) for m in messages]
    if system_prompt is not None and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    if input:
        first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs[first]["content"] = f"{msgs[first]['content']}\n\n{input}"
    return msgs


def _chat(tokenizer, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None) -> str:
    """The tokenizer's chat template, rendered under `RENDER_SECONDS` (a row that makes it loop is a ConfigError
    naming the template, not a run that hangs); ``tools`` are passed as the template expects them."""
    extra = {"tools": tools} if tools else {}
    try:
        with _time_limit(RENDER_SECONDS):
            return tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt, **extra)
    except TemplateTimeout as e:
        where = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ConfigError(f"data.template='chat': the chat template of {where} {e} for one conversation; fix the "
                          "template or use data.template 'alpaca' or 'plain'") from None


def _chat_segments(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> Segments:
    segments: Segments = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue  # user, system and tool turns are rendered into the prompt before the next assistant turn
        before = _chat(tokenizer, messages[:i], add_generation_prompt=True, tools=tools)
        full = _chat(tokenizer, messages[: i + 1], tools=tools)
        if not before.startswith(done) or not full.startswith(before):
            raise ConfigError(
                "the tokenizer's chat template does not render conversations incrementally (a prefix renders "
                "differently from the whole), so responses cannot be located; use data.template 'alpaca' or 'plain'"
            )
        segments += [(before[len(done):], False), (full[len(before):], True)]
        done = full
    return [s for s in segments if s[0]]


def _alpaca_prompt(user: str, input: str | None, first: bool, preamble: str | None) -> str:
    text = (f"{preamble}\n\n" if preamble and first else "") + ("" if first else "\n\n")
    text += f"### Instruction:\n{user}\n\n"
    if input:
        text += f"### Input:\n{input}\n\n"
    return text + "### Response:\n"


def _text_segments(messages: list[dict], tokenizer, template: str, input: str | None) -> Segments:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [m for m in messages if m["role"] != "system"]
    segments: Segments = []
    for i, m in enumerate(turns):
        if m["role"] == "user":
            if template == "alpaca":
                segments.append((_alpaca_prompt(m["content"], input if i == 0 else None, i == 0, system), False))
            else:
                prefix = f"{system}\n\n" if system and i == 0 else ""
                user = f"{m['content']}\n\n{input}" if input and i == 0 else m["content"]
                segments.append((prefix + user, False))
        else:
            segments.append((m["content"] + tokenizer.eos_token, True))
    return segments


def render_segments(
    messages: list[dict], tokenizer, template: TemplateName = "chat", system_prompt: str | None = None,
    input: str | None = None, generation_prompt: bool = False, tools: list[dict] | None = None,
    tool_format: ToolFormat = "template",
) -> Segments:
    """Segments of a conversation; with ``generation_prompt`` the text ends ready for the next assistant turn.

    Args:
        messages: canonical chat messages (a conversation ending with an assistant turn, or a prompt ending with a user turn).
        tokenizer: a Hugging Face tokenizer (its chat template and EOS token are used).
        template: which template renders the text.
        system_prompt: a system prompt for rows that have none.
        input: the alpaca ``input`` of the first user turn.
        generation_prompt: append the opening of an assistant turn (for prompts).
        tools: the row's tool schemas (`lit_ft.data.tools`), passed to the chat template.
        tool_format: ``template`` (the chat template renders the tool parts) or ``hermes`` (`as_chat`: they are
            written into plain messages first; the assistant turns, their calls included, stay the trained ones).
    """
    if template == "chat":
        msgs, tools = as_chat(_prepare(messages, system_prompt, input), tokenizer, tools, tool_format)
        segments = _chat_segments(msgs, tokenizer, tools)
        if generation_prompt:
            done = "".join(s for s, _ in segments)
            segments.append((_chat(tokenizer, msgs, add_generation_prompt=True, tools=tools)[len(done):], False))
        return [s for s in segments if s[0]]
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise ConfigError(f"data.template='{template}' cannot render tools, tool calls or tool results; rows with "
                          "them need data.template 'chat' and a chat template that supports tool calling, or "
                          "data.template 'chat' with data.tool_format hermes")
    msgs = _prepare(messages, system_prompt, None) if template == "plain" else list(messages)
    if template == "alpaca" and system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return _text_segments(msgs, tokenizer, template, input)


def render_prompt(
    messages: list[dict], tokenizer, template: TemplateName = "chat", system_prompt: str | None = None,
    input: str | None = None, tools: list[dict] | None = None, tool_format: ToolFormat = "template",
) -> str:
    """The prompt text a model continues with its response (chat: with the generation prompt)."""
    return "".join(t for t, _ in render_segments(messages, tokenizer, template, system_prompt, input, True, tools,
                                                 tool_format))


def render_pair(
    prompt: list[dict], response: str, tokenizer, template: TemplateName = "chat", system_prompt: str | None = None,
    tools: list[dict] | None = None, tool_format: ToolFormat = "template",
) -> tuple[str, str]:
    """(prompt_text, response_text) of one prompt and one final response, as the template renders them."""
    segments = render_segments(prompt + [{"role": "assistant", "content": response}], tokenizer, template,
                               system_prompt, tools=tools, tool_format=tool_format)
    return "".join(t for t, _ in segments[:-1]), segments[-1][0]
