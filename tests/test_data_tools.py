"""Tool-calling conversations in the DataModules: OpenAI-style and ShareGPT (LLaMA-Factory) rows read to one canonical
form, rendered by a tool-aware chat template with the tools passed, labels on the assistant turns only, bad tool
data named by file, line and field, a template without tool support refused."""

from __future__ import annotations

import json

import pytest

from lit_ft.data.modules import InstructionDataModule, PreferenceDataModule, PromptDataModule
from lit_ft.data.records import load_records
from lit_ft.data.tokenize import IGNORE_INDEX, prompt_example, sft_example
from lit_ft.errors import ConfigError, DataError
from tests.conftest import make_tokenizer

# A Qwen2.5-style tool template, kept short: tools listed in the system turn, calls as <tool_call>{json}</tool_call>,
# each tool result a turn of its own.
TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\n\n' }}{% endif %}"
    "{{ '# Tools\n<tools>\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}{{ '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'tool' %}"
    "{{ '<|im_start|>tool\n<tool_response>' + message.content + '</tool_response><|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{ '<|im_start|>assistant\n' + message.content }}"
    "{%- for call in message.tool_calls or [] %}{{ '<tool_call>' }}{{ call.function | tojson }}{{ '</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}"
    "{%- elif message.role != 'system' %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
OPENAI_ROW = {"tools": TOOLS, "messages": [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    {"role": "assistant", "content": "The answer is 5."}]}
SHAREGPT_ROW = {"tools": json.dumps([t["function"] for t in TOOLS]), "conversations": [
    {"from": "system", "value": "You can call tools."},
    {"from": "human", "value": "What is 2 plus 3?"},
    {"from": "function_call", "value": '{"name": "add", "arguments": {"a": 2, "b": 3}}'},
    {"from": "observation", "value": "5"},
    {"from": "gpt", "value": "The answer is 5."}]}


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tool_tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tool_tok")
    tok = make_tokenizer(str(d))
    tok.chat_template = TOOL_TEMPLATE
    tok.save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def tool_tok(tool_tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tool_tok_dir)


def test_openai_row_is_canonical(tmp_path):
    (record,), report = load_records(_jsonl(tmp_path / "t.jsonl", [OPENAI_ROW]), "instruction")
    assert record["tools"] == TOOLS
    assert record["messages"][2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}, "id": "call_1"}]}
    assert record["messages"][3] == {"role": "tool", "content": "5", "name": "add", "tool_call_id": "call_1"}
    assert report.rows_kept == 1


def test_sharegpt_function_call_equals_openai_form(tmp_path):
    (openai,), _ = load_records(_jsonl(tmp_path / "o.jsonl", [OPENAI_ROW]), "instruction")
    (sharegpt,), _ = load_records(_jsonl(tmp_path / "s.jsonl", [SHAREGPT_ROW]), "instruction")
    # ShareGPT has no call ids: everything else is the same record
    for m in openai["messages"]:
        m.pop("tool_call_id", None)
        for c in m.get("tool_calls", []):
            c.pop("id")
    assert sharegpt == openai


def test_rendering_and_labels(tool_tok, tmp_path):
    (record,), _ = load_records(_jsonl(tmp_path / "r.jsonl", [OPENAI_ROW]), "instruction")
    out = sft_example(record, tool_tok, "chat", None, 512, "error", True, "r.jsonl")
    expected = tool_tok.apply_chat_template(record["messages"], tools=TOOLS, tokenize=False)
    assert tool_tok.decode(out["input_ids"]) == expected
    assert "# Tools" in expected and '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>' in expected
    trained = [t if lab != IGNORE_INDEX else None for t, lab in zip(out["input_ids"], out["labels"])]
    runs, run = [], []
    for t in trained + [None]:
        if t is None and run:
            runs.append(tool_tok.decode(run))
            run = []
        elif t is not None:
            run.append(t)
    assert runs == ['<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call><|im_end|>\n',
                    "The answer is 5.<|im_end|>\n"]


def test_prompt_ending_with_a_tool_result(tool_tok, tmp_path):
    row = {"tools": TOOLS, "messages": OPENAI_ROW["messages"][:4], "answer": "5"}
    (record,), _ = load_records(_jsonl(tmp_path / "p.jsonl", [row]), "prompt")
    out = prompt_example(record, tool_tok, "chat", None, 512, "error", "p.jsonl")
    assert out["prompt"] == tool_tok.apply_chat_template(record["prompt"], tools=TOOLS, tokenize=False,
                                                         add_generation_prompt=True)
    assert out["prompt"].endswith("<tool_response>5</tool_response><|im_end|>\n<|im_start|>assistant\n")


def _msgs(*extra):
    return {"tools": TOOLS, "messages": [{"role": "user", "content": "2+3?"}, *extra]}


def _call(name="add", arguments='{"a": 2, "b": 3}', id="call_1"):
    return {"role": "assistant", "content": "", "tool_calls": [
        {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}]}


ANSWER = {"role": "assistant", "content": "5"}


@pytest.mark.parametrize("row,field,message", [
    (_msgs({"role": "tool", "content": "5"}, ANSWER), "messages[1].role",
     "a tool message without a preceding tool call"),
    (_msgs(_call(), {"role": "tool", "tool_call_id": "call_9", "content": "5"}, ANSWER), "messages[2].tool_call_id",
     "'call_9' matches no call of the assistant turn before it (its ids: ['call_1'])"),
    (_msgs(_call(arguments="{a: 2}"), {"role": "tool", "content": "5"}, ANSWER),
     "messages[1].tool_calls[0].function.arguments",
     "the arguments are not JSON (Expecting property name enclosed in double quotes at column 2): '{a: 2}'"),
    (_msgs(_call(arguments="[2, 3]"), {"role": "tool", "content": "5"}, ANSWER),
     "messages[1].tool_calls[0].function.arguments", "the arguments must be a JSON object, got list ([2, 3])"),
    (_msgs(_call(name="mul"), {"role": "tool", "content": "6"}, ANSWER), "messages[1].tool_calls[0].function.name",
     "calls 'mul', which is not in the row's tools ['add']"),
    (_msgs({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"arguments": {}}}]},
           {"role": "tool", "content": "5"}, ANSWER), "messages[1].tool_calls[0].function.name",
     "a tool call without a function name: {'type': 'function', 'function': {'arguments': {}}}"),
    (_msgs(_call(), {"role": "tool", "content": "5"}, {"role": "tool", "content": "5"}, ANSWER), "messages[3].role",
     "a tool message without a preceding tool call (the assistant turn before it made 1 call(s), all answered)"),
    (_msgs(_call(), ANSWER), "messages[2].role",
     "expected 'tool' (the results of the calls of the assistant turn before it)"),
])
def test_bad_tool_data(tmp_path, row, field, message):
    good = OPENAI_ROW
    f = _jsonl(tmp_path / "bad.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_records(f, "instruction")
    assert str(e.value) == f"{f}:2: field '{field}': {message}"
    records, report = load_records(f, "instruction", skip_bad_rows=True)
    assert len(records) == 1 and report.dropped == {"malformed": 1}


def test_sharegpt_call_that_is_not_json(tmp_path):
    row = json.loads(json.dumps(SHAREGPT_ROW))
    row["conversations"][2]["value"] = "add(2, 3)"
    f = _jsonl(tmp_path / "s.jsonl", [row])
    with pytest.raises(DataError) as e:
        load_records(f, "instruction")
    assert str(e.value) == (f"{f}:1: field 'messages[2].function_call': the call is not JSON (Expecting value at "
                            "column 1): 'add(2, 3)'")


def test_template_without_tool_support_is_refused(tiny_model_dir, tmp_path):
    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "t.jsonl", [OPENAI_ROW] * 4), val_split=0.25,
                               tokenizer=tiny_model_dir, max_length=256, batch_size=2)
    with pytest.raises(ConfigError) as e:
        dm.setup("fit")
    assert str(e.value) == (
        f"data.template='chat': the chat template of {tiny_model_dir} ignores tools (a probe conversation renders "
        "without 'probe_schema_fn'), and this data has them; use a model whose chat template supports tool calling "
        "(as Qwen2.5's and Llama 3.1's do), give the tokenizer such a template, or set data.tool_format hermes "
        "(tools, calls and results written into plain messages in the Hermes form before the chat template renders "
        "them; docs/data.md)")
    no_tools = {"messages": OPENAI_ROW["messages"]}
    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "n.jsonl", [no_tools] * 4), val_split=0.25,
                               tokenizer=tiny_model_dir, max_length=256, batch_size=2)
    with pytest.raises(ConfigError, match="ignores tool_calls .*without 'probe_call_fn'"):
        dm.setup("fit")
    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "a.jsonl", [no_tools] * 4), val_split=0.25,
                               tokenizer=tiny_model_dir, max_length=256, batch_size=2, template="alpaca")
    with pytest.raises(ConfigError, match="data.template='alpaca' cannot render tool_calls, the tool role"):
        dm.setup("fit")


def _variants(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        row = json.loads(json.dumps(OPENAI_ROW))
        row["messages"][1]["content"] = f"What is {i} plus 3?"
        row["messages"][2]["tool_calls"][0]["function"]["arguments"] = {"a": i, "b": 3}
        row["messages"][3]["content"] = str(i + 3)
        row["messages"][4]["content"] = f"The answer is {i + 3}."
        rows.append(row)
    return rows


def test_preference_prompts_with_tool_calls(tool_tok_dir, tmp_path):
    pairs = []
    for row in _variants(6):
        pairs.append({"tools": TOOLS, "chosen": row["messages"], "rejected": row["messages"][:-1] + [
            {"role": "assistant", "content": "I do not know."}]})
    dm = PreferenceDataModule(train_file=_jsonl(tmp_path / "p.jsonl", pairs), val_split=0.34, tokenizer=tool_tok_dir,
                              max_length=256, batch_size=2)
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 6
    prompt, _ = dm.held_out_prompts(1)[0]
    assert "<tool_response>" in prompt and "# Tools" in prompt
    final_call = dict(pairs[0], chosen=pairs[0]["chosen"][:3])
    f = _jsonl(tmp_path / "c.jsonl", [final_call])
    with pytest.raises(DataError) as e:
        load_records(f, "preference")
    assert str(e.value) == (f"{f}:1: field 'chosen[2].tool_calls': a final assistant turn that calls tools is not "
                            "supported in preference pairs yet (only the prompt may hold tool calls and results); "
                            "keep such rows out of the pairs")


def test_prompt_datamodule_with_tool_results(tool_tok_dir, tmp_path):
    rows = [{"tools": TOOLS, "messages": r["messages"][:4], "answer": r["messages"][3]["content"]} for r in _variants(5)]
    dm = PromptDataModule(train_file=_jsonl(tmp_path / "p.jsonl", rows), val_split=0.2, tokenizer=tool_tok_dir,
                          max_length=256, batch_size=2)
    dm.setup("fit")
    prompt, answer = dm.held_out_prompts(1)[0]
    assert prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n") and "<tools>" in prompt


def test_sft_fit_on_tool_rows(tiny_model_dir, tool_tok_dir, tmp_path):
    import lightning as L

    from lit_ft.models.spec import LoraSpec, ModelSpec
    from lit_ft.stages.sft import SFTModule
    from lit_ft.train.optim import OptimSpec

    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "t.jsonl", _variants(8)), val_split=0.25,
                               tokenizer=tool_tok_dir, max_length=256, batch_size=2)
    module = SFTModule(base=ModelSpec(name_or_path=tiny_model_dir), lora=LoraSpec(r=4, alpha=8, dropout=0.0),
                       optim=OptimSpec(lr=1e-2, warmup_ratio=0.0, scheduler="constant"))
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(tmp_path), num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2


# ---------------------------------------------------------------------------------------------- tool_format: hermes
# The fallback for a chat template without tool support (SmolLM2's, the tiny model's): the tools, the calls and the
# results written into plain messages in the Hermes form before the template renders them.

HERMES_SYSTEM = ("You can call tools.\n\nTools:\n<tools>\n" + json.dumps(TOOLS) + "\n</tools>\nCall one as <tool_call>\n"
                 '{"name": ..., "arguments": {...}}\n</tool_call>')
HERMES_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'


def _trained_runs(tok, out) -> list[str]:
    """The decoded runs of consecutive trained tokens (labels != -100), checked to be the input ids there."""
    runs, run = [], []
    for t, lab in zip(out["input_ids"] + [None], out["labels"] + [IGNORE_INDEX]):
        if lab == IGNORE_INDEX:
            if run:
                runs.append(tok.decode(run))
            run = []
        else:
            assert lab == t
            run.append(t)
    return runs


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_hermes_rendering_and_labels_token_by_token(which, request, tmp_path):
    from transformers import AutoTokenizer

    from lit_ft.data.templates import render_segments, tool_role
    from lit_ft.data.tools import hermes_messages

    tok = AutoTokenizer.from_pretrained(request.getfixturevalue("tiny_model_dir" if which == "tiny" else "smollm2_dir"))
    (record,), _ = load_records(_jsonl(tmp_path / "r.jsonl", [OPENAI_ROW]), "instruction")
    assert tool_role(tok) == "tool"  # ChatML writes any role as given
    plain = hermes_messages(record["messages"], TOOLS, "tool")
    assert plain == [{"role": "system", "content": HERMES_SYSTEM},
                     {"role": "user", "content": "What is 2 plus 3?"},
                     {"role": "assistant", "content": HERMES_CALL},
                     {"role": "tool", "content": "<tool_response>\n5\n</tool_response>"},
                     {"role": "assistant", "content": "The answer is 5."}]
    out = sft_example(record, tok, "chat", None, 1024, "error", True, "r.jsonl", tool_format="hermes")
    # the whole row is the chat template's rendering of the plain messages, token for token
    expected = tok.apply_chat_template(plain, tokenize=False)
    assert out["input_ids"] == tok(expected, add_special_tokens=False)["input_ids"]
    # trained: the assistant turns, the call included (with the end-of-turn token); never the system (the tools),
    # the user or the tool result
    assert _trained_runs(tok, out) == [HERMES_CALL + "<|im_end|>\n", "The answer is 5.<|im_end|>\n"]
    segments = render_segments(record["messages"], tok, "chat", None, tools=TOOLS, tool_format="hermes")
    assert [t for t, trained in segments if not trained][1] == (
        "<|im_start|>tool\n<tool_response>\n5\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    # the template's own rendering is refused (it ignores tools); hermes passes the same check
    from lit_ft.data.templates import check_tool_template

    with pytest.raises(ConfigError, match="or set data.tool_format hermes"):
        check_tool_template(tok, "chat", ["tools", "tool_calls", "the tool role"])
    check_tool_template(tok, "chat", ["tools", "tool_calls", "the tool role"], "hermes")


def test_hermes_calls_round_trip_through_the_parser():
    from lit_ft.data.tools import hermes_messages
    from lit_ft.online.toolcalls import parse_hermes

    calls = [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}},
             {"type": "function", "function": {"name": "note", "arguments": {"text": "día \"uno\"\n", "n": [1, 2.5]}}},
             {"type": "function", "function": {"name": "now", "arguments": {}}}]
    for content in ("", "Let me compute."):
        (m,) = hermes_messages([{"role": "assistant", "content": content, "tool_calls": calls}], None)
        assert parse_hermes(m["content"]) == (content, calls)
    assert hermes_messages([{"role": "user", "content": "hi"}], None) == [{"role": "user", "content": "hi"}]


def test_hermes_tool_role_and_system_message(tool_tok):
    from lit_ft.data.templates import tool_role
    from lit_ft.data.tools import hermes_messages

    # a template that wraps tool turns in <tool_response> itself gets them as user turns (no double wrapping)
    assert tool_role(tool_tok) == "user"
    msgs = [{"role": "user", "content": "2+3?"}]
    (system, _) = hermes_messages(msgs, TOOLS)
    assert system["role"] == "system" and system["content"].startswith("Tools:\n<tools>\n[")
    (system, _) = hermes_messages([{"role": "system", "content": ""}] + msgs, TOOLS)
    assert system["content"].startswith("Tools:")


def test_hermes_datamodules_on_the_tiny_model(tiny_model_dir, tmp_path):
    """data.tool_format hermes in SFT and the prompt DataModule with a template that ignores tools; refused with a
    text template."""
    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "t.jsonl", _variants(8)), val_split=0.25,
                               tokenizer=tiny_model_dir, max_length=512, batch_size=2, tool_format="hermes")
    dm.setup("fit")
    assert len(dm.train_dataset) + len(dm.val_dataset) == 8
    prompt, reference = dm.held_out_prompts(1)[0]
    assert "<tools>" in prompt and prompt.endswith("</tool_response><|im_end|>\n<|im_start|>assistant\n")
    rows = [{"tools": TOOLS, "messages": r["messages"][:4], "answer": r["messages"][3]["content"]} for r in _variants(5)]
    pm = PromptDataModule(train_file=_jsonl(tmp_path / "p.jsonl", rows), val_split=0.2, tokenizer=tiny_model_dir,
                          max_length=512, batch_size=2, tool_format="hermes")
    pm.setup("fit")
    prompt, _ = pm.held_out_prompts(1)[0]
    assert "<|im_start|>system\nYou can call tools.\n\nTools:\n<tools>" in prompt and HERMES_CALL in prompt
    with pytest.raises(ConfigError, match=r"^data.tool_format='qwen': expected one of"):
        InstructionDataModule(train_file="x.jsonl", tool_format="qwen")
    dm = InstructionDataModule(train_file=_jsonl(tmp_path / "a.jsonl", _variants(4)), val_split=0.25,
                               tokenizer=tiny_model_dir, max_length=512, batch_size=2, template="alpaca",
                               tool_format="hermes")
    with pytest.raises(ConfigError, match="data.template='alpaca' cannot render tools, tool_calls, the tool role"):
        dm.setup("fit")
