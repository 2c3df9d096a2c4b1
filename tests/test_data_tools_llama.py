"""Tool rows under a second template that supports tools, in the Llama 3.1 form (tools in an `Environment: ipython`
system turn, each call the assistant's whole turn as `{"name": ..., "parameters": {...}}`, results as `ipython`
turns): the row renders as the template renders it with `tools=`, only the assistant turns (the call included) are
trained, and the calls read back through the llama3_json parser the episodes use for this family."""

from __future__ import annotations

import json

import pytest

from lit_ft.data.records import load_records
from lit_ft.data.tokenize import sft_example
from lit_ft.online.toolcalls import parse_llama3_json
from tests.conftest import make_tokenizer
from tests.test_data_tools import OPENAI_ROW, SHAREGPT_ROW, TOOLS, _jsonl, _trained_runs

LLAMA31_TOOL_TEMPLATE = (
    "{%- if tools %}{{ '<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n' }}"
    "{%- for t in tools %}{{ t | tojson }}{{ '\n' }}{%- endfor %}{{ '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- for call in message.tool_calls %}"
    "{{ '{\"name\": \"' + call.function.name + '\", \"parameters\": ' + (call.function.arguments | tojson) + '}' }}"
    "{%- endfor %}{{ '<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}{{ '<|start_header_id|>ipython<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}{{ '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content + '<|eot_id|>' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
CALL_TEXT = '{"name": "add", "parameters": {"a": 2, "b": 3}}'


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = str(tmp_path_factory.mktemp("llama31_tok"))
    tok = make_tokenizer(d)
    tok.chat_template = LLAMA31_TOOL_TEMPLATE
    tok.save_pretrained(d)
    return AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("row", [OPENAI_ROW, SHAREGPT_ROW], ids=["openai", "sharegpt"])
def test_llama31_rendering_and_labels(llama_tok, tmp_path, row):
    (record,), _ = load_records(_jsonl(tmp_path / "r.jsonl", [row]), "instruction")
    out = sft_example(record, llama_tok, "chat", None, 1024, "error", True, "r.jsonl")
    expected = llama_tok.apply_chat_template(record["messages"], tools=TOOLS, tokenize=False)
    assert out["input_ids"] == llama_tok(expected, add_special_tokens=False)["input_ids"]
    assert "Environment: ipython" in expected and "ipython<|end_header_id|>\n\n5<|eot_id|>" in expected
    assert _trained_runs(llama_tok, out) == [CALL_TEXT + "<|eot_id|>", "The answer is 5.<|eot_id|>"]
    # the trained call is what the llama3_json parser reads back as the row's call
    content, calls = parse_llama3_json(CALL_TEXT)
    assert content == "" and [c["function"] for c in calls] == [{"name": "add", "arguments": {"a": 2, "b": 3}}]
    assert json.loads(CALL_TEXT)["parameters"] == record["messages"][2]["tool_calls"][0]["function"]["arguments"]
